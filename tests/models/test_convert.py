"""The converter on the real stories260K checkpoint: exact logits, greedy sample, quantized variants, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _llama_ref import forward as ref_forward
from conftest import STORIES_SAMPLE

PROMPT = [1, 403, 407, 261, 378, 275, 307, 268, 261, 440, 297]  # BOS + a TinyStories-like prefix


def session(folder: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def run(sess, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
    outs = sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, outs))
    new_past = {n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")}
    return res["logits"], new_past


def empty_past(cfg: dict, batch: int = 1) -> dict:
    kvh, d = cfg["num_key_value_heads"], cfg["head_dim"]
    return {f"past_key_values.{i}.{k}": np.zeros((batch, kvh, 0, d), np.float32)
            for i in range(cfg["num_hidden_layers"]) for k in ("key", "value")}


def full_logits(sess, cfg: dict, ids: list[int]) -> np.ndarray:
    t = len(ids)
    logits, _ = run(sess, np.array([ids], np.int64), np.ones((1, t), np.int64), np.arange(t)[None], empty_past(cfg))
    return logits[0]


def load_src(stories_src: Path) -> tuple[dict, dict]:
    from inferos_cli.models.hf import read_safetensors

    return read_safetensors(stories_src), json.loads((stories_src / "config.json").read_text())


def test_folder_layout_and_modelinfo(stories_onnx: Path) -> None:
    from inferos_cli.models.manifest import check_manifest
    from inferos_cli.models.info import inspect_folder

    for name in ("model.onnx", "model.onnx.data", "config.json", "inferos.json", "tokenizer.json", "tokenizer_config.json"):
        assert (stories_onnx / name).is_file(), name
    info = inspect_folder(stories_onnx)
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim, info.vocab_size) == (5, 8, 4, 8, 512)
    assert info.source_format == "inferos" and info.has_position_ids and not info.uses_gqa_op
    assert info.bos_token_id == 1 and info.eos_token_ids == [2] and info.add_bos
    meta = json.loads((stories_onnx / "inferos.json").read_text())
    assert meta["dtype"] == "fp32" and meta["param_count"] == info.param_count
    assert 250_000 < meta["param_count"] < 270_000  # 260K, tied embeddings counted once
    assert check_manifest(stories_onnx, deep=True) == []


def test_fp32_logits_match_numpy_reference(stories_src: Path, stories_onnx: Path) -> None:
    tensors, cfg = load_src(stories_src)
    got = full_logits(session(stories_onnx), cfg, PROMPT)
    want = ref_forward(tensors, cfg, PROMPT)
    assert np.abs(got - want).max() < 1e-4


def test_greedy_decode_reproduces_published_sample(stories_onnx: Path) -> None:
    from tokenizers import Tokenizer

    sess = session(stories_onnx)
    cfg = json.loads((stories_onnx / "config.json").read_text())
    ids, past, total, cur = [1], empty_past(cfg), 0, [1]
    for _ in range(40):
        n = len(cur)
        logits, past = run(sess, np.array([cur], np.int64), np.ones((1, total + n), np.int64),
                           np.arange(total, total + n)[None], past)
        total += n
        cur = [int(logits[0, -1].argmax())]
        ids.append(cur[0])
    text = Tokenizer.from_file(str(stories_onnx / "tokenizer.json")).decode(ids)
    assert text.startswith(STORIES_SAMPLE), text


def test_cache_chunks_and_left_padding_match_full_forward(stories_onnx: Path) -> None:
    """Prefill in chunks + decode with the KV cache, and a left-padded batch row, equal the one-shot forward."""
    sess = session(stories_onnx)
    cfg = json.loads((stories_onnx / "config.json").read_text())
    want = full_logits(sess, cfg, PROMPT)
    past, got = empty_past(cfg), []
    for start, end in ((0, 4), (4, 9), (9, 10), (10, 11)):
        logits, past = run(sess, np.array([PROMPT[start:end]], np.int64), np.ones((1, end), np.int64),
                           np.arange(start, end)[None], past)
        got.append(logits[0])
    assert np.abs(np.concatenate(got) - want).max() < 1e-4
    # batch of two: row 0 is the prompt, row 1 the prompt's last 6 tokens left-padded with 5 masked slots
    short = PROMPT[5:]
    ids = np.array([PROMPT, [0] * 5 + short], np.int64)
    mask = np.array([[1] * 11, [0] * 5 + [1] * 6], np.int64)
    pos = np.array([list(range(11)), [0] * 5 + list(range(6))], np.int64)
    logits, _ = run(sess, ids, mask, pos, empty_past(cfg, 2))
    assert np.abs(logits[0] - want).max() < 1e-4
    assert np.abs(logits[1, 5:] - full_logits(sess, cfg, short)).max() < 1e-4


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_logits_match_dequantized_reference(stories_src: Path, tmp_path: Path, dtype: str) -> None:
    """MatMulNBits logits equal the numpy forward over the very same dequantized weights."""
    from inferos_cli.models.convert import convert_hf_folder
    from inferos_cli.models.weights import QuantWeight, store, store_embedding

    tensors, cfg = load_src(stories_src)
    fast = convert_hf_folder(stories_src, tmp_path / f"{dtype}-fast", dtype=dtype)  # int8 activations
    out = convert_hf_folder(stories_src, tmp_path / dtype, dtype=dtype, accuracy_level=0)
    deq = {}
    for name, arr in tensors.items():
        w = store_embedding(arr, dtype) if "embed_tokens" in name else store(arr, dtype) if arr.ndim == 2 else arr
        deq[name] = w.dequantize() if isinstance(w, QuantWeight) else np.asarray(w, np.float32)
    got = full_logits(session(out), cfg, PROMPT)
    want = ref_forward(deq, cfg, PROMPT)
    assert np.abs(got - want).max() < 1e-3
    fast_logits = full_logits(session(fast), cfg, PROMPT)  # int8 activations: close, not exact
    assert np.abs(fast_logits - want).max() < 0.5
    assert (fast_logits.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # and the quantization is real but close to the fp32 model
    exact = ref_forward(tensors, cfg, PROMPT)
    assert 0 < np.abs(got - exact).max() < 5.0
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.7
    meta = json.loads((out / "inferos.json").read_text())
    assert meta["dtype"] == dtype and any("bit" in k for k in meta["storage"])
    data = (out / "model.onnx.data").stat().st_size
    assert data < 0.6 * 260_000 * 4


def test_fp16_storage_halves_the_file(stories_src: Path, stories_onnx: Path, tmp_path: Path) -> None:
    from inferos_cli.models.convert import convert_hf_folder

    tensors, cfg = load_src(stories_src)
    out = convert_hf_folder(stories_src, tmp_path / "fp16", dtype="fp16")
    assert (out / "model.onnx.data").stat().st_size < 0.6 * (stories_onnx / "model.onnx.data").stat().st_size
    got = full_logits(session(out), cfg, PROMPT)
    assert np.abs(got - ref_forward(tensors, cfg, PROMPT)).max() < 0.05


def test_manifest_detects_truncation(stories_onnx: Path, tmp_path: Path) -> None:
    import shutil

    from inferos_cli.models.manifest import check_manifest

    copy = tmp_path / "copy"
    shutil.copytree(stories_onnx, copy)
    data = copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    problems = check_manifest(copy)
    assert problems and "model.onnx.data" in problems[0]


def test_bad_sources_give_one_line_errors(tmp_path: Path, stories_src: Path) -> None:
    import shutil

    from inferos_cli.errors import ConversionError, ModelError
    from inferos_cli.models.convert import convert_hf_folder

    with pytest.raises(ModelError, match="config.json"):
        convert_hf_folder(tmp_path, tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(stories_src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").chmod(0o644)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="unsupported architecture 'gpt_neox'"):
        convert_hf_folder(bad, tmp_path / "out")
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    st = bad / "model.safetensors"
    st.chmod(0o644)
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ConversionError, match="truncated"):
        convert_hf_folder(bad, tmp_path / "out")
    with pytest.raises(ConversionError, match="unknown dtype"):
        convert_hf_folder(stories_src, tmp_path / "out", dtype="int3")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ GGUF
def gguf_logits(folder: Path, ids: list[int], layers: int = 2, kvh: int = 2, d: int = 16) -> np.ndarray:
    cfg = {"num_key_value_heads": kvh, "head_dim": d, "num_hidden_layers": layers}
    return full_logits(session(folder), cfg, ids)


TINY_IDS = [0, 5, 70, 100, 200, 30, 31, 260, 3]


@pytest.mark.parametrize("linear,embed,arch,tied,kept", [
    ("Q4_1", "Q8_0", "llama", True, {"Q4_1->4bit": 14, "Q8_0->8bit": 1}),
    ("Q4_0", "Q4_0", "llama", False, {"Q4_0->4bit": 16}),
    ("Q8_0", "Q4_1", "qwen2", True, {"Q8_0->8bit": 14, "Q4_1->4bit": 1}),
    ("Q5_0", "F16", "llama", True, {"Q5_0->8bit": 14, "fp16": 1}),
])
def test_gguf_blocks_kept_losslessly(tmp_path: Path, linear: str, embed: str, arch: str, tied: bool, kept: dict) -> None:
    """GGUF blocks go into MatMulNBits without re-quantization: logits equal the numpy forward over the
    file's own dequantized weights (llama.cpp Q/K permutation undone, Q4_1 minimum exact, qwen2 biases)."""
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    hf, cfg = write_tiny_gguf(src, linear=linear, embed=embed, arch=arch, tied=tied)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0)
    meta = json.loads((out / "inferos.json").read_text())
    assert meta["storage"] == kept and meta["dtype"] == "native"
    want = ref_forward(hf, cfg, TINY_IDS)
    assert np.abs(gguf_logits(out, TINY_IDS) - want).max() < 1e-4
    # the default fast kernel (int8 activations) stays close
    fast = convert_gguf(src, tmp_path / "fast")
    got = gguf_logits(fast, TINY_IDS)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
    assert np.abs(got - want).max() < 0.15 * np.abs(want).max()


def test_gguf_fp32_dequantizes_everything(tmp_path: Path) -> None:
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    hf, cfg = write_tiny_gguf(src)
    out = convert_gguf(src, tmp_path / "fp32", dtype="fp32")
    assert json.loads((out / "inferos.json").read_text())["storage"] == {"fp32": 15}
    assert np.abs(gguf_logits(out, TINY_IDS) - ref_forward(hf, cfg, TINY_IDS)).max() < 1e-4


def test_gguf_head_bits_requantizes_only_the_logits_projection(tmp_path: Path) -> None:
    """head_bits=4 stores the tied Q8_0 head as its own 4-bit RTN MatMulNBits (integer zero points); the
    embedding gather and the Q4_1 layers keep the file's blocks; logits equal the numpy forward over exactly
    those weights; the choice is recorded in inferos.json and the logical parameter count does not change."""
    import gguf
    import onnx
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf
    from inferos_cli.models.weights import quantize_rtn
    from inferos_cli.models.quants import blocks_weight

    src = tmp_path / "tiny.gguf"
    hf, cfg = write_tiny_gguf(src)  # Q4_1 linears, tied Q8_0 embedding / head
    default = convert_gguf(src, tmp_path / "default", accuracy_level=0)
    out = convert_gguf(src, tmp_path / "head4", accuracy_level=0, head_bits=4)
    meta, base_meta = (json.loads((f / "inferos.json").read_text()) for f in (out, default))
    assert meta["storage"] == {"Q4_1->4bit": 14, "Q8_0->8bit": 1, "rtn->4bit": 1}
    assert meta["head_bits"] == 4 and base_meta["head_bits"] is None
    assert meta["param_count"] == base_meta["param_count"]

    embd = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "token_embd.weight")
    k, n = (int(d) for d in embd.shape)
    head = quantize_rtn(blocks_weight(embd.data, embd.tensor_type.name, n, k).dequantize(), 4)
    assert head.zero_points is not None and head.mins is None
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    assert dims["lm_head.qweight"] == [vocab, hidden // 32, 16]
    assert dims["lm_head.scales"] == [vocab * hidden // 32]
    assert dims["embed_tokens.qweight"] == [vocab, hidden // 32, 32]  # the gather keeps the 8-bit table

    want = ref_forward({**hf, "lm_head.weight": head.dequantize()}, cfg, TINY_IDS)
    got = gguf_logits(out, TINY_IDS)
    assert np.abs(got - want).max() < 1e-4
    exact = gguf_logits(default, TINY_IDS)
    assert 0 < np.abs(got - exact).max() < 0.1 * np.abs(exact).max()  # re-quantized for real, and close
    assert (got.argmax(-1) == exact.argmax(-1)).mean() >= 0.75


def test_gguf_head_bits_keeps_narrow_heads_and_rejects_bad_values(tmp_path: Path) -> None:
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.errors import ConversionError
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, linear="Q4_0", embed="Q4_0", tied=False)  # untied Q4_0 output.weight
    out = convert_gguf(src, tmp_path / "q4", head_bits=4)
    assert json.loads((out / "inferos.json").read_text())["storage"] == {"Q4_0->4bit": 16}  # kept, not re-quantized
    q8 = tmp_path / "q8.gguf"
    write_tiny_gguf(q8)
    out8 = convert_gguf(q8, tmp_path / "q8", head_bits=8)  # the Q8_0 head already fits in 8 bits
    assert json.loads((out8 / "inferos.json").read_text())["storage"] == {"Q4_1->4bit": 14, "Q8_0->8bit": 1}
    with pytest.raises(ConversionError, match="head_bits"):
        convert_gguf(src, tmp_path / "bad", head_bits=3)
    assert not (tmp_path / "bad").exists()


def test_hf_head_bits_caps_an_fp32_head(stories_src: Path, tmp_path: Path) -> None:
    """The safetensors path takes the option too: a tied fp32 head becomes 8-bit, the embedding stays fp32."""
    from inferos_cli.models.convert import convert_hf_folder
    from inferos_cli.models.weights import QuantWeight, store

    tensors, cfg = load_src(stories_src)
    out = convert_hf_folder(stories_src, tmp_path / "h8", dtype="fp32", head_bits=8, accuracy_level=0)
    meta = json.loads((out / "inferos.json").read_text())
    assert meta["storage"]["rtn->8bit"] == 1 and meta["head_bits"] == 8
    head = store(np.asarray(tensors["model.embed_tokens.weight"], np.float32), "int8")
    assert isinstance(head, QuantWeight)
    want = ref_forward({**tensors, "lm_head.weight": head.dequantize()}, cfg, PROMPT)
    assert np.abs(full_logits(session(out), cfg, PROMPT) - want).max() < 1e-3


def test_gguf_plain_attention_matches_the_attention_op(tmp_path: Path) -> None:
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    hf, cfg = write_tiny_gguf(src, linear="Q4_0")
    plain = convert_gguf(src, tmp_path / "plain", accuracy_level=0, attention="plain")
    assert json.loads((plain / "inferos.json").read_text())["attention"] == "plain"
    assert np.abs(gguf_logits(plain, TINY_IDS) - ref_forward(hf, cfg, TINY_IDS)).max() < 1e-4


def test_gguf_default_is_group_query_attention_and_decodes_like_the_attention_op(tmp_path: Path) -> None:
    """head_dim 16: the default graph uses GroupQueryAttention (RoPE inside the op from position_ids); its
    logits match the numpy forward, and the engine decodes in place (shared past/present buffers) to the
    same greedy tokens and cached-step logits as the ONNX Attention graph."""
    import onnx
    from _tiny_gguf import write_tiny_gguf
    from conftest import make_engine

    from inferos_cli.models.convert import convert_gguf
    from inferos_cli.engine.sampling import GenerationConfig

    src = tmp_path / "tiny.gguf"
    hf, cfg = write_tiny_gguf(src, linear="Q4_0")
    gqa = convert_gguf(src, tmp_path / "gqa", accuracy_level=0)
    op = convert_gguf(src, tmp_path / "op", accuracy_level=0, attention="op")
    assert json.loads((gqa / "inferos.json").read_text())["attention"] == "gqa"
    nodes = onnx.load(str(gqa / "model.onnx"), load_external_data=False).graph.node
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == 2
    assert not any(n.op_type in ("Attention", "Softmax") for n in nodes)
    assert np.abs(gguf_logits(gqa, TINY_IDS) - ref_forward(hf, cfg, TINY_IDS)).max() < 1e-4
    e_gqa, e_op = make_engine(gqa), make_engine(op)
    assert e_gqa.uses_gqa and not e_op.uses_gqa
    ids = TINY_IDS[:5]
    c_gqa, c_op = e_gqa.new_cache(1, capacity=16), e_op.new_cache(1)
    assert c_gqa.shares_buffers
    l_gqa = e_gqa.forward(np.asarray([ids]), c_gqa, phase="prefill")
    l_op = e_op.forward(np.asarray([ids]), c_op, phase="prefill")
    for tok in TINY_IDS[5:]:
        assert np.abs(l_gqa[0, -1] - l_op[0, -1]).max() < 1e-4
        l_gqa = e_gqa.forward(np.asarray([[tok]]), c_gqa, phase="decode")
        l_op = e_op.forward(np.asarray([[tok]]), c_op, phase="decode")
    config = GenerationConfig(max_tokens=12)

    def greedy(engine):
        return [e.token_id for e in engine.generate(ids, config) if e.kind == "token"]

    assert greedy(e_gqa) == greedy(e_op)


def test_small_head_dims_keep_the_attention_op(stories_onnx: Path) -> None:
    """onnxruntime's CPU GroupQueryAttention needs head_dim % 16 == 0: stories260K (head_dim 8) gets the
    ONNX Attention op."""
    from inferos_cli.models.convert import default_attention

    assert json.loads((stories_onnx / "inferos.json").read_text())["attention"] == "op"
    assert default_attention(8) == "op" and default_attention(64) == "gqa"


def test_gguf_tokenizer_and_chat_template(tmp_path: Path) -> None:
    from _tiny_gguf import write_tiny_gguf
    from tokenizers import Tokenizer

    from inferos_cli.models.convert import convert_gguf
    from inferos_cli.models.info import inspect_folder

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = convert_gguf(src, tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>the cat<|im_end|>")
    assert enc.tokens[0] == "<|im_start|>" and enc.tokens[-1] == "<|im_end|>"
    assert "Ġthe" not in enc.tokens and "the" not in enc.tokens[:2]  # no leading space: t+he merge, then Ġ-less
    assert tok.decode(tok.encode("naïve 123 ok").ids) == "naïve 123 ok"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and "<|im_start|>" in cfg["chat_template"]
    info = inspect_folder(out)
    assert info.chat_template and info.bos_token_id == 0 and info.eos_token_ids == [2] and not info.add_bos


def test_gguf_sentencepiece_vocabulary_matches_hf_tokenizer(tmp_path: Path, stories_src: Path, tinystories_text: Path) -> None:
    """A llama (SentencePiece) GGUF vocabulary becomes the same tokenizer HF built for stories260K."""
    import gguf
    from tokenizers import Tokenizer

    from inferos_cli.models.gguf_tokenizer import build_tokenizer

    hf_tok = Tokenizer.from_file(str(stories_src / "tokenizer.json"))
    vocab = json.loads((stories_src / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1 for t in tokens]
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = build_tokenizer(gguf.GGUFReader(str(path)))
    text = tinystories_text.read_text(encoding="utf-8")[:20000] + " zebra 42 ✓"
    assert tok.encode(text).ids == hf_tok.encode(text).ids
    assert tok.encode("Once").ids[0] == 1  # BOS added like the HF tokenizer
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == hf_tok.decode(ids)


def test_bad_gguf_files_give_one_line_errors(tmp_path: Path) -> None:
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.errors import ConversionError, ModelError
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size - 5000])
    with pytest.raises(ConversionError, match="truncated"):
        convert_gguf(cut, tmp_path / "o1")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf(junk, tmp_path / "o2")
    with pytest.raises(ModelError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o3")
    for err in (ConversionError, ModelError):
        assert "\n" not in str(err("x"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_tied_embeddings_are_stored_once(stories_onnx: Path) -> None:
    import onnx

    model = onnx.load(str(stories_onnx / "model.onnx"), load_external_data=False)
    big = [i for i in model.graph.initializer if 512 in i.dims and 64 in i.dims]
    assert len(big) == 1  # the embedding table, also used (transposed in the kernel) as the lm_head
    data = (stories_onnx / "model.onnx.data").stat().st_size
    assert data < 260_032 * 4 * 1.05 + 512 * 4 * 2 * 10  # params once (+ rope tables and small constants)


def test_llama3_rope_scaling_matches_gguf_frequency_factors() -> None:
    """HF ``rope_scaling: llama3`` and llama.cpp's ``rope_freqs.weight`` factors give the same tables."""
    from inferos_cli.models.builders.base import rope_tables
    from inferos_cli.models.weights import DecoderSpec

    base = dict(arch="llama", hidden_size=2048, num_layers=1, num_heads=32, num_kv_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=10, context_length=4096, rope_theta=500000.0)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cos_hf, sin_hf = rope_tables(DecoderSpec(**base, rope_scaling=scaling), 4096)
    cos_plain, _ = rope_tables(DecoderSpec(**base), 4096)
    inv = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64))
    wavelen = 2 * np.pi / inv
    # llama.cpp's generate_extra_tensors (llama3): the per-frequency divisors it stores as rope_freqs.weight
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 8192 / 4.0, 1.0, np.where(wavelen > 8192 / 1.0, 32.0, 1 / ((1 - smooth) / 32.0 + smooth)))
    cos_ff, sin_ff = rope_tables(DecoderSpec(**base, rope_scaling={"rope_type": "freq_factors", "factors": factors.tolist()}), 4096)
    assert np.abs(cos_hf - cos_ff).max() < 1e-5 and np.abs(sin_hf - sin_ff).max() < 1e-5
    assert np.abs(cos_hf - cos_plain).max() > 0.1  # scaling really changes the long wavelengths


def test_builders_pick_the_family_by_architecture() -> None:
    from inferos_cli.errors import ConversionError
    from inferos_cli.models import builders
    from inferos_cli.models.builders.gemma import GemmaBuilder
    from inferos_cli.models.builders.llama import LlamaBuilder
    from inferos_cli.models.builders.phi3 import Phi3Builder
    from inferos_cli.models.builders.qwen3 import Qwen3Builder

    assert builders.BUILDERS == {"llama": LlamaBuilder, "mistral": LlamaBuilder, "qwen2": LlamaBuilder,
                                 "qwen3": Qwen3Builder, "phi3": Phi3Builder, "gemma2": GemmaBuilder,
                                 "gemma3": GemmaBuilder}
    with pytest.raises(ConversionError, match="no graph builder for architecture 'gpt_neox'"):
        builders.builder_for("gpt_neox")
