"""Bench peers that are not the inferos engine: onnxruntime-genai running the same ONNX graph, and a
Lemonade / OpenAI-compatible server measured from the client side.

onnxruntime-genai runs in a bench worker (:mod:`inferos_cli.bench.worker`). It loads folders with a
``genai_config.json``; for an inferos-converted or optimum folder with the standard decoder I/O,
:func:`genai_folder` writes one into a linked copy of the folder (cached), so the peer runs the very same
``model.onnx`` as the engine.

The server peer streams ``POST {url}/completions`` (falling back to ``/chat/completions`` when the server
has no text-completion route) through the one Lemonade client and URL rule
(:mod:`inferos_cli.backends.lemonade`) and times the text chunks as they arrive. A batch of B is B
concurrent streams; each stream's first and last text chunk are folded as token events
(:class:`inferos_cli.events.RunStats`), with the completion tokens from the server's usage chunk when it
sends one, else the number of text chunks: aggregate decode tok/s = all decode tokens / (latest last
chunk - earliest first chunk). TTFT = request sent -> the slowest stream's first text chunk (every row
has started). ``GET {url}/stats`` is recorded after each run when the server has it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferos_cli.backends.lemonade import ServerHTTPError, default_url, get_json, stream_completion
from inferos_cli.bench.runner import Runner
from inferos_cli.errors import BackendError
from inferos_cli.events import Event, RunStats

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo


def genai_skip_reason(info: "ModelInfo") -> str | None:
    """Why onnxruntime-genai cannot run this model, or None when it can (directly or via :func:`genai_folder`)."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime_genai is not installed (pip install onnxruntime-genai)"
    if (Path(info.path) / "genai_config.json").is_file():
        return None
    needed = {"input_ids", "attention_mask", info.past_key_fmt % 0, info.past_value_fmt % 0}
    missing = sorted(needed - set(info.input_names))
    if missing or "logits" not in info.output_names:
        return (f"onnxruntime-genai needs the standard decoder inputs/outputs; {info.name} lacks "
                f"{', '.join(missing) or 'a logits output'}")
    return None


def genai_config(info: "ModelInfo") -> dict[str, Any]:
    """A ``genai_config.json`` for a standard-I/O decoder folder (greedy search, no shared buffer: the
    graph concatenates past and new keys itself)."""
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": info.past_key_fmt, "past_value_names": info.past_value_fmt}
    if "position_ids" in info.input_names:
        inputs["position_ids"] = "position_ids"
    eos = info.eos_token_ids or [2]
    return {
        "model": {
            "bos_token_id": info.bos_token_id if info.bos_token_id is not None else eos[0],
            "context_length": int(info.context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": info.onnx_path.name,
                "head_size": info.head_dim, "hidden_size": info.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": info.present_key_fmt,
                            "present_value_names": info.present_value_fmt},
                "num_attention_heads": info.num_heads, "num_hidden_layers": info.num_layers,
                "num_key_value_heads": info.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": info.pad_token_id if info.pad_token_id is not None else eos[0],
            "type": info.architecture or "llama",
            "vocab_size": info.vocab_size,
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": int(info.context_length),
                   "past_present_share_buffer": False},
    }


def genai_folder(info: "ModelInfo") -> Path:
    """The folder onnxruntime-genai loads: the model's own when it has ``genai_config.json``, else a cached
    copy made of links to the model's files (hard links, symlinks, or copies where neither works) plus a
    generated ``genai_config.json``."""
    import hashlib
    import shutil
    from pathlib import Path

    from inferos_cli import paths

    folder = Path(info.path)
    if (folder / "genai_config.json").is_file():
        return folder
    onnx = Path(info.onnx_path)
    stamp = f"{onnx.resolve()}|{onnx.stat().st_mtime_ns}|{onnx.stat().st_size}"
    target = paths.cache_dir() / "bench" / f"genai-{info.name}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    if (target / "genai_config.json").is_file():
        return target
    with paths.atomic_dir(target) as tmp:
        for item in onnx.parent.iterdir():
            if not item.is_file() or item.name == "genai_config.json":
                continue
            dest = tmp / item.name
            try:
                os.link(item, dest)
            except OSError:
                try:
                    dest.symlink_to(item.resolve())
                except OSError:
                    shutil.copy2(item, dest)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(info), indent=2), encoding="utf-8")
    return target


def server_models(url: str, timeout: float = 5.0) -> list[str]:
    """Model ids a server lists at ``GET {url}/models`` (OpenAI ``{"data": [{"id"}]}`` shape)."""
    data = get_json(url.rstrip("/") + "/models", timeout)
    items = data.get("data", []) if isinstance(data, dict) else data
    return [str(m.get("id")) for m in items if isinstance(m, dict) and m.get("id")]


def lemonade_skip_reason(url: str | None, timeout: float = 5.0) -> str | None:
    """Why the server peer cannot run (unreachable, no models), or None when it answers ``/models``."""
    base = default_url(url)
    try:
        models = server_models(base, timeout)
    except ServerHTTPError as exc:
        return f"server at {base} answered /models with HTTP {exc.status}"
    except BackendError as exc:
        return f"no Lemonade/OpenAI-compatible server at {base} ({exc.message}); start one or pass --url"
    if not models:
        return f"server at {base} lists no models at /models"
    return None


class LemonadePeer(Runner):
    """A Lemonade or any OpenAI-compatible streaming server, timed client-side."""

    def __init__(self, url: str | None, info: "ModelInfo", *, server_model: str | None = None,
                 timeout: float = 600.0) -> None:
        from inferos_cli.models.tokenizer import Tokenizer

        self.url = default_url(url)
        self.info = info
        self.model = server_model
        self.timeout = timeout
        self.tokenizer = Tokenizer.from_model(info)
        self.endpoint = "/completions"

    def load(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            models = server_models(self.url)
        except BackendError as exc:
            raise BackendError(f"server at {self.url} did not answer /models: {exc.message}", "check --url") from None
        if self.model is None:
            if not models:
                raise BackendError(f"server at {self.url} lists no models", "load one or pass --server-model")
            self.model = models[0]
        label = f"server {self.url} ({self.model})"
        return {"providers": {"prefill": label, "decode": label}, "kv_backend": "server-side (not visible)",
                "load_s": round(time.perf_counter() - t0, 3), "rss_bytes": None,
                "extra": {"server_model": self.model, "server_models": models}}

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:
        texts = [self.tokenizer.decode(p, skip_special=True) for p in prompts]
        results: list[dict[str, Any] | None] = [None] * len(texts)
        errors: list[str] = []
        start = threading.Barrier(len(texts))

        def one(i: int) -> None:
            try:
                start.wait()
                results[i] = self._stream(texts[i], gen_tokens)
            except Exception as exc:  # surfaced below as one line
                errors.append(str(getattr(exc, "message", exc)))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_end = time.perf_counter()
        if errors or any(r is None for r in results):
            raise BackendError(f"server at {self.url}: {errors[0] if errors else 'no answer'}")
        rows = [r for r in results if r is not None]
        stats = RunStats(t0=t0)
        tokens: list[tuple[float, Event]] = []
        for row, (prompt, r) in enumerate(zip(prompts, rows)):
            stats.add(Event("prefill", t=t0, seq=row, prompt_tokens=len(prompt)))
            if r["t_first"] is not None:
                tokens.append((r["t_first"], Event("token", t=r["t_first"], seq=row, generated=1)))
                if r["tokens"] > 1:
                    tokens.append((r["t_last"], Event("token", t=r["t_last"], seq=row, generated=r["tokens"])))
        for _, ev in sorted(tokens, key=lambda item: item[0]):
            stats.add(ev)
        firsts = [r["t_first"] for r in rows if r["t_first"] is not None]
        ttft = (max(firsts) - t0) if len(firsts) == len(rows) else None
        return {
            "ttft_ms": ttft * 1e3 if ttft is not None else None,
            "prefill_tps": stats.prompt_tokens / ttft if ttft else None,
            "decode_tps": stats.aggregate_decode_tps,
            "e2e_ms": (t_end - t0) * 1e3,
            "peak_rss_mb": None, "kv_bytes": None, "kv_ratio_vs_fp16": None,
            "kv_note": "the server's KV cache is not visible to a client",
            "rss_method": "n/a for a server peer (another process, measured client-side)",
            "generated_per_row": [r["tokens"] for r in rows],
            "server_prompt_tokens": [r["prompt_tokens"] for r in rows],
            "endpoint": self.endpoint,
            "server_stats": self._stats(),
            "providers": {"prefill": f"server {self.url} ({self.model})", "decode": f"server {self.url} ({self.model})"},
        }

    def _stats(self) -> dict[str, Any] | None:
        """The server's ``GET /stats`` after a run (two tries, 15 s each), None when it has none."""
        for _ in range(2):
            try:
                data = get_json(self.url + "/stats", 15.0)
            except ServerHTTPError:
                return None
            except BackendError:
                continue
            return data if isinstance(data, dict) else None
        return None

    def _stream(self, text: str, gen_tokens: int) -> dict[str, Any]:
        """One streamed completion through the Lemonade client: its first and last text chunk times, the
        completion tokens (the server's usage, else the chunks) and the prompt tokens the server counted."""
        request: dict[str, Any] = ({"prompt": text} if self.endpoint == "/completions"
                                   else {"messages": [{"role": "user", "content": text}]})
        try:
            stream = stream_completion(self.url, self.model, max_tokens=gen_tokens, temperature=0.0,
                                       timeout=self.timeout, **request)
        except ServerHTTPError as exc:
            if exc.status in (404, 405) and self.endpoint == "/completions":
                self.endpoint = "/chat/completions"
                return self._stream(text, gen_tokens)
            raise BackendError(f"{self.endpoint} answered HTTP {exc.status}") from None
        t_first = t_last = None
        for chunk in stream:
            t_first = t_first or chunk.t
            t_last = chunk.t
        return {"t_first": t_first, "t_last": t_last, "tokens": stream.completion_tokens, "chunks": stream.chunks,
                "prompt_tokens": stream.prompt_tokens}
