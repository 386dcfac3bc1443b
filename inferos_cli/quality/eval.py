"""`inferos eval`: teacher-forced perplexity through the real cache path, per KV configuration.

For each window of ``ctx`` tokens of the text, every configuration prefills the first ``prefix`` tokens
and is then fed the rest one token at a time (:func:`inferos_cli.quality.perplexity.teacher_forced`:
each engine with its own cache, the rewritten graph and segmented cache for KV presets, the original
graph and plain cache for ``baseline``), scoring each next-token log-likelihood. All configurations advance in lockstep on the same tokens, so the KL
divergence and top-1 agreement against the baseline are exact (no logits stored).

Per configuration: perplexity, delta vs baseline, mean KL(baseline || config) of next-token
distributions, top-1 agreement with the baseline, mean and peak KV bytes (used columns of the cache
arrays) and their ratio to the same tokens in fp16, and peak RSS. Peak RSS is per configuration: each one
runs the first window alone in a fresh subprocess (``python -m inferos_cli.quality.eval``) so no
other configuration's sessions are resident; the value is the highest RSS sampled after each step (the
transient peak of loading the model, the same for every configuration, is left out).

By default (``exact``) every configuration is scored on the exact-compute twin of the graph
(:mod:`inferos_cli.graphs.exact`: float activations in every matmul, so the KV cache's own error is not
buried under int8-activation rounding noise); ``exact=False`` scores the graph as shipped. The report names
the graph it scored.

Settings are resolved by the command (:func:`resolve_configs`); the engines and the probe get them
resolved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from inferos_cli.profiles import profile_of
from inferos_cli.settings import resolved_from_json, resolved_to_json
from inferos_cli.errors import InferosError, UsageError
from inferos_cli.quality.perplexity import log_softmax, teacher_forced

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Resolved

BASELINE = "baseline"
EXACT_DEFAULT = True  # the exact-compute twin (8-bit heads dequantized once, so it costs about the graph as shipped)
GRAPH_AS_SHIPPED = "as shipped"
GRAPH_EXACT = "exact-compute twin"

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: stage ``"score"`` after each scored token (done/total tokens), stage
``"rss"`` before each peak-RSS probe and once after the last (done/total configurations)."""


@dataclass
class EvalConfig:
    """One ``--compare`` configuration with its resolved settings."""

    name: str
    resolved: "Resolved"


@dataclass
class ConfigResult:
    """Scores of one configuration (``config`` is its name in ``--compare``)."""

    config: str
    kv: str = ""
    ppl: float | None = None
    delta_ppl: float | None = None
    kl_mean: float | None = None
    top1_agreement: float | None = None
    kv_bytes: float | None = None
    kv_bytes_peak: int | None = None
    kv_bytes_fp16: float | None = None
    kv_ratio_vs_fp16: float | None = None
    peak_rss_mb: float | None = None
    tokens_scored: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class EvalReport:
    """What ``inferos eval --format json`` prints."""

    model: str
    text: str
    ctx: int
    prefix: int
    tokens_scored: int
    windows: int
    results: list[ConfigResult]
    rss_note: str = ""
    exact_matmul: bool = False  # MatMulNBits ran at accuracy_level 0 (inferos_cli/graphs/exact.py)
    graph: str = GRAPH_AS_SHIPPED  # which graph was scored: GRAPH_AS_SHIPPED or GRAPH_EXACT

    def to_json(self) -> dict[str, Any]:
        """The issue's JSON shape (plus a few extra keys)."""
        return {
            "model": self.model,
            "text": self.text,
            "ctx": self.ctx,
            "prefix": self.prefix,
            "tokens_scored": self.tokens_scored,
            "windows": self.windows,
            "rss_note": self.rss_note,
            "exact_matmul": self.exact_matmul,
            "graph": self.graph,
            "results": [asdict(r) for r in self.results],
        }


def make_windows(tokens: list[int], ctx: int, prefix: int, max_tokens: int | None,
                 bos: int | None) -> list[list[int]]:
    """Consecutive windows of ``ctx`` tokens (BOS first when the model uses one), trimmed so at most
    ``max_tokens`` tokens are scored (each window scores ``len - prefix``)."""
    if ctx < 2 or prefix < 1 or prefix >= ctx:
        raise UsageError(f"need 1 <= --prefix < --ctx, got prefix {prefix}, ctx {ctx}", "e.g. --ctx 512 --prefix 64")
    body = ctx - 1 if bos is not None else ctx
    out: list[list[int]] = []
    scored = 0
    for start in range(0, len(tokens) - (body - 1) if len(tokens) >= body else 0, body):
        win = tokens[start: start + body]
        if len(win) < body:
            break
        if bos is not None:
            win = [bos] + win
        if max_tokens is not None and scored + len(win) - prefix > max_tokens:
            keep = max_tokens - scored + prefix
            if keep > prefix:
                out.append(win[:keep])
            break
        out.append(win)
        scored += len(win) - prefix
    if not out:
        raise UsageError(
            f"the text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}",
            "use a longer text or a smaller --ctx",
        )
    return out


class _Acc:
    """Running sums of one configuration."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.n = 0
        self.kv_sum = 0.0
        self.kv_fp16_sum = 0.0
        self.kv_steps = 0
        self.kv_peak = 0

    def kv(self, cache: Any) -> None:
        st = cache.stats()
        self.kv_sum += st.total_bytes
        self.kv_fp16_sum += st.bytes_fp16
        self.kv_steps += 1
        self.kv_peak = max(self.kv_peak, st.total_bytes)


def resolve_configs(names: list[str], info: "ModelInfo", flags: dict[str, Any] | None = None) -> list[EvalConfig]:
    """Each configuration's settings, resolved once for the model (``chat+int4`` merges ``chat`` and
    ``int4``); ``flags`` (nested policy values, e.g. a KV budget) apply to every configuration except
    ``baseline``. Called by the commands, before anything loads."""
    from inferos_cli.profiles import resolve_settings

    return [EvalConfig(name, resolve_settings(profile_of(name), param_count=info.param_count,
                                              flags=None if name == BASELINE else flags))
            for name in names]


def load_engines(info: "ModelInfo", configs: list[EvalConfig], threads: int | None) -> list["Engine"]:
    """One engine per configuration, all on the same model."""
    from inferos_cli.engine.engine import Engine

    return [Engine(info, cfg.resolved, threads=threads) for cfg in configs]


def read_tokens(engine: "Engine", text: Path) -> list[int]:
    """The whole text as token ids (no BOS; windows add it)."""
    try:
        raw = Path(text).read_text(encoding="utf-8")
    except OSError as exc:
        raise InferosError(f"cannot read --text {text}: {exc.strerror or exc}", "pass a UTF-8 text file") from None
    return engine.tokenizer.encode(raw, add_bos=False)


def run_eval(
    info: "ModelInfo",
    configs: list[EvalConfig],
    text: Path,
    *,
    ctx: int = 512,
    prefix: int = 64,
    max_tokens: int | None = None,
    threads: int | None = None,
    measure_rss: bool = True,
    progress: Progress | None = None,
    exact: bool = EXACT_DEFAULT,
) -> EvalReport:
    """Score every configuration (``baseline``, the reference, first) on the same windows of ``text``
    (see module doc). ``exact``: score the exact-compute twin of the graph instead of the graph as
    shipped (a graph that already computes in float is its own twin)."""
    from inferos_cli.graphs.exact import exact_info

    info, exact_used = exact_info(info) if exact else (info, False)
    engines = load_engines(info, configs, threads)
    if ctx > info.context_length:
        raise UsageError(f"--ctx {ctx} exceeds the model's context of {info.context_length} tokens",
                         f"use --ctx {info.context_length} or less")
    tokens = read_tokens(engines[0], text)
    bos = info.bos_token_id if info.add_bos else None
    windows = make_windows(tokens, ctx, prefix, max_tokens, bos)
    total = sum(len(w) - prefix for w in windows)
    accs = [_Acc() for _ in configs]
    done = 0
    caches: list[Any] = []
    for win in windows:
        for st in teacher_forced(engines, win, prefix):
            caches = st.caches
            base_lp = log_softmax(st.logits[0])
            base_top = int(np.argmax(st.logits[0]))
            for k, acc in enumerate(accs):
                lp = base_lp if k == 0 else log_softmax(st.logits[k])
                acc.nll -= float(lp[st.target])
                if k:
                    p = np.exp(base_lp)
                    acc.kl += float(np.sum(p * (base_lp - lp)))
                    acc.agree += int(int(np.argmax(st.logits[k])) == base_top)
                else:
                    acc.agree += 1
                acc.n += 1
                acc.kv(caches[k])
            done += 1
            if progress is not None:
                progress("score", done, total)
    results = []
    base_ppl = float(np.exp(accs[0].nll / accs[0].n))
    for cfg, eng, acc, cache in zip(configs, engines, accs, caches):
        ppl = float(np.exp(acc.nll / acc.n))
        mean_kv = acc.kv_sum / acc.kv_steps if acc.kv_steps else None
        mean_fp16 = acc.kv_fp16_sum / acc.kv_steps if acc.kv_steps else None
        results.append(ConfigResult(
            config=cfg.name,
            kv=eng.layout.describe(),
            ppl=ppl,
            delta_ppl=ppl - base_ppl,
            kl_mean=acc.kl / acc.n if cfg.name != BASELINE else 0.0,
            top1_agreement=acc.agree / acc.n,
            kv_bytes=mean_kv,
            kv_bytes_peak=acc.kv_peak,
            kv_bytes_fp16=mean_fp16,
            kv_ratio_vs_fp16=(acc.kv_sum / acc.kv_fp16_sum) if acc.kv_fp16_sum else None,
            tokens_scored=acc.n,
            notes=list(getattr(cache, "notes", [])),
        ))
    del engines, caches
    rss_note = "not measured (--no-rss)"
    if measure_rss:
        rss_note = (f"highest RSS sampled after each step of a fresh process running the first window "
                    f"({len(windows[0])} tokens) alone; model loading peaks are excluded")
        by_name = {cfg.name: cfg for cfg in configs}
        for i, res in enumerate(results):
            if progress is not None:
                progress("rss", i, len(results))
            res.peak_rss_mb = rss_probe(str(info.path), by_name[res.config], windows[0], prefix, threads, exact_used)
        if progress is not None:
            progress("rss", len(results), len(results))
    return EvalReport(model=info.name, text=str(text), ctx=ctx, prefix=prefix, tokens_scored=total,
                      windows=len(windows), results=results, rss_note=rss_note, exact_matmul=exact_used,
                      graph=GRAPH_EXACT if exact else GRAPH_AS_SHIPPED)


def rss_probe(model: str, config: EvalConfig, window: list[int], prefix: int, threads: int | None,
              exact: bool = False) -> float | None:
    """Peak RSS (MiB) of a fresh subprocess that runs ``window`` teacher-forced with ``config``."""
    args = {"model": model, "config": config.name, "settings": resolved_to_json(config.resolved),
            "window": window, "prefix": prefix, "threads": threads, "exact": exact}
    try:
        proc = subprocess.run([sys.executable, "-m", "inferos_cli.quality.eval"], input=json.dumps(args),
                              capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        peak = json.loads(proc.stdout.strip().splitlines()[-1]).get("peak_rss_bytes")
    except (ValueError, IndexError):
        return None
    return peak / 2**20 if peak else None


def _probe_main() -> int:
    """Child side of :func:`rss_probe`: JSON args on stdin, ``{"peak_rss_bytes": N}`` on stdout."""
    from inferos_cli.machine.rss import current_rss, process_peak_rss
    from inferos_cli.models.info import inspect_folder

    args = json.loads(sys.stdin.read())
    info = inspect_folder(Path(args["model"]))
    if args.get("exact"):
        from inferos_cli.graphs.exact import exact_info

        info, _ = exact_info(info)
    config = EvalConfig(args["config"], resolved_from_json(args["settings"]))
    eng = load_engines(info, [config], args.get("threads"))[0]
    loaded = current_rss()
    peak, cache = 0, None
    for st in teacher_forced([eng], args["window"], int(args["prefix"])):
        peak = max(peak, current_rss() or 0)
        cache = st.caches[0]
    print(json.dumps({"peak_rss_bytes": peak, "rss_after_load_bytes": loaded,
                      "process_peak_rss_bytes": process_peak_rss(),
                      "kv_bytes": cache.stats().total_bytes if cache is not None else None}))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through rss_probe
    raise SystemExit(_probe_main())
