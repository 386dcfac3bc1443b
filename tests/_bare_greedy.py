"""Greedy decoding with a bare onnxruntime loop (no inferos engine), to check a model folder on its own."""

from __future__ import annotations

import numpy as np

CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def bare_greedy_text(info, prompt: str = CHAT_PROMPT, steps: int = 8) -> str:
    """Decode ``steps`` greedy tokens of ``prompt`` with a plain session.run loop and return the text."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(info.onnx_path), opts, providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(info.tokenizer_path))
    empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
    past = {f"past_key_values.{i}.{k}": empty for i in range(info.num_layers) for k in ("key", "value")}
    names = [o.name for o in sess.get_outputs()]
    out: list[int] = []
    cur, total = tok.encode(prompt).ids, 0
    for _ in range(steps):
        feeds = {"input_ids": np.array([cur], np.int64),
                 "attention_mask": np.ones((1, total + len(cur)), np.int64), **past}
        if info.has_position_ids:
            feeds["position_ids"] = np.arange(total, total + len(cur))[None]
        res = dict(zip(names, sess.run(None, feeds)))
        total += len(cur)
        past = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
        cur = [int(res["logits"][0, -1].argmax())]
        out.append(cur[0])
    return tok.decode(out)
