"""What ``inferos bench`` measures: the grid of (batch, prompt length) cells, the metrics of each run,
the interleaved run order, and the prompts (windows of real text with exact token counts).

Each batch row gets a different window of the text, BOS included when the model adds one; generation is
greedy with EOS ignored, so every row makes exactly ``gen_tokens`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from inferos_cli.errors import InferosError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

METRICS: tuple[str, ...] = (
    "ttft_ms", "prefill_tps", "decode_tps", "e2e_ms", "peak_rss_mb", "kv_bytes", "kv_ratio_vs_fp16",
)


# ---------------------------------------------------------------------------------------------- specs
@dataclass
class Grid:
    """What to measure: cells are every (batch, seq) pair."""

    batch_sizes: list[int]
    seq_lengths: list[int]
    gen_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None

    def cells(self) -> list[tuple[int, int]]:
        """(batch, seq) pairs, batch-major, in run order."""
        return [(b, s) for b in self.batch_sizes for s in self.seq_lengths]


# -------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Step:
    """One run in the interleaved order."""

    batch: int
    seq: int
    config: str
    repeat: int  # 0-based; warmups count separately
    warmup: bool
    gen_tokens: int = 0

    @property
    def weight(self) -> int:
        """Relative cost for the progress bar's time-left estimate: prompt tokens, plus generated tokens
        counted 4x (a decode step costs far more per token than prefill)."""
        return self.batch * (self.seq + 4 * self.gen_tokens)


def schedule(cells: Iterable[tuple[int, int]], configs: Sequence[str], repeats: int, warmup: int,
             gen_tokens: int = 0) -> list[Step]:
    """The run order: per cell, warmups ``A B A B`` (discarded), then repeats ``A B A B``."""
    steps: list[Step] = []
    for batch, seq in cells:
        for w in range(warmup):
            steps.extend(Step(batch, seq, c, w, True, gen_tokens) for c in configs)
        for r in range(repeats):
            steps.extend(Step(batch, seq, c, r, False, gen_tokens) for c in configs)
    return steps


# ------------------------------------------------------------------------------------------------ model
def resolve_info(model: str | None, *, dtype: str | None = None) -> "ModelInfo":
    """``--model`` (+ ``--dtype``) to a ready ONNX folder, converting on first use (the workers load the
    folder, never convert)."""
    from inferos_cli.models.resolve import resolve_model

    return resolve_model(model, dtype=dtype, progress=True)


# ---------------------------------------------------------------------------------------------- prompts
def corpus_ids(info: "ModelInfo", text_path: Path, need: int) -> list[int]:
    """Token ids of the text (no special tokens), enough for ``need`` tokens; repeats the text if short."""
    from inferos_cli.models.tokenizer import Tokenizer

    try:
        text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read --text {text_path}: {exc.strerror}", "pass a UTF-8 text file") from None
    tok = Tokenizer.from_model(info)
    ids: list[int] = []
    # Tokenize in paragraph chunks so huge files are not encoded at once; stop when we have enough.
    chunk: list[str] = []
    for line in text.splitlines(keepends=True):
        chunk.append(line)
        if sum(len(c) for c in chunk) > 20_000:
            ids.extend(tok.encode("".join(chunk), add_bos=False))
            chunk = []
            if len(ids) >= need:
                break
    if chunk and len(ids) < need:
        ids.extend(tok.encode("".join(chunk), add_bos=False))
    if not ids:
        raise UsageError(f"--text {text_path} holds no text", "pass a file with real prose")
    while len(ids) < need:
        ids = ids + ids
    return ids


def make_prompts(ids: Sequence[int], batch: int, seq: int, bos: int | None) -> list[list[int]]:
    """``batch`` prompts of exactly ``seq`` tokens each, from different windows of ``ids``."""
    body = seq - 1 if bos is not None else seq
    prompts = []
    for row in range(batch):
        start = (row * body) % max(1, len(ids) - body)
        window = list(ids[start:start + body])
        prompts.append(([int(bos)] if bos is not None else []) + [int(t) for t in window])
    for p in prompts:
        if len(p) != seq:  # pragma: no cover - guarded by corpus_ids' length
            raise InferosError(f"internal: prompt of {len(p)} tokens, wanted {seq}")
    return prompts
