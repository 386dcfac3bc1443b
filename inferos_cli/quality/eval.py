"""`inferos eval`: teacher-forced perplexity through the real cache path, per KV configuration.

For each window of ``ctx`` tokens of the text, every configuration prefills the first ``prefix`` tokens
and is then fed the rest one token at a time (``Engine.forward`` with its own cache: the rewritten graph
and segmented cache for KV presets, the original graph and plain cache for ``baseline``), scoring each
next-token log-likelihood. All configurations advance in lockstep on the same tokens, so the KL
divergence and top-1 agreement against the baseline are exact (no logits stored).

Per configuration: perplexity, delta vs baseline, mean KL(baseline || config) of next-token
distributions, top-1 agreement with the baseline, mean and peak KV bytes (used columns of the cache
arrays) and their ratio to the same tokens in fp16, and peak RSS. Peak RSS is per configuration: each one
runs the first window alone in a fresh subprocess (``python -m inferos_cli.quality.eval``) so no
other configuration's sessions are resident; the value is the highest RSS sampled after each step (the
transient peak of loading the model, the same for every configuration, is left out).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from inferos_cli.errors import InferosError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import ModelInfo

BASELINE = "baseline"


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
            "results": [asdict(r) for r in self.results],
        }


def parse_compare(spec: str | None) -> list[str]:
    """``"baseline,int8,chat+int4"`` -> config names; ``baseline`` always first (the reference)."""
    names = [n.strip() for n in (spec or "baseline,int8,int4").split(",") if n.strip()]
    if not names:
        raise UsageError("--compare is empty", "e.g. --compare baseline,int8,int4")
    if len(set(names)) != len(names):
        raise UsageError("--compare lists a configuration twice", "name each configuration once")
    names = [n for n in names if n != BASELINE]
    return [BASELINE] + names


def profile_of(config: str) -> str:
    """``chat+int4`` -> ``chat,int4`` (profiles merged left to right)."""
    return ",".join(p.strip() for p in config.split("+") if p.strip())


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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


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


def load_engines(model: str | None, configs: list[str], threads: int | None,
                 info: "ModelInfo | None" = None,
                 flags: dict[str, Any] | None = None) -> tuple["ModelInfo", list["Engine"]]:
    """One engine per configuration, all on the same resolved model; ``flags`` (nested policy values,
    e.g. a KV budget) apply to every configuration except ``baseline``."""
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.resolve import resolve_model

    info = info or resolve_model(model, progress=True)
    engines = []
    for cfg in configs:
        resolved = resolve_settings(profile_of(cfg), param_count=info.param_count,
                                    flags=None if cfg == BASELINE else flags)
        engines.append(Engine(info, resolved, threads=threads))
    return info, engines


def read_tokens(engine: "Engine", text: Path) -> list[int]:
    """The whole text as token ids (no BOS; windows add it)."""
    try:
        raw = Path(text).read_text(encoding="utf-8")
    except OSError as exc:
        raise InferosError(f"cannot read --text {text}: {exc.strerror or exc}", "pass a UTF-8 text file") from None
    return engine.tokenizer.encode(raw, add_bos=False)


def run_eval(
    model: str | None,
    text: Path,
    *,
    ctx: int = 512,
    prefix: int = 64,
    max_tokens: int | None = None,
    compare: str | None = None,
    threads: int | None = None,
    measure_rss: bool = True,
    progress: Callable[[int, int], None] | None = None,
    flags: dict[str, Any] | None = None,
    exact: bool = True,
) -> EvalReport:
    """Score every configuration of ``compare`` on the same windows of ``text`` (see module doc).
    ``exact`` (default): score on the exact-compute twin of the graph, so the KV cache's own error is not
    buried under int8-activation rounding noise (:mod:`inferos_cli.graphs.exact`)."""
    configs = parse_compare(compare)
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.graphs.exact import exact_info

    info = resolve_model(model, progress=True)
    info, exact_used = exact_info(info) if exact else (info, False)
    info, engines = load_engines(model, configs, threads, info=info, flags=flags)
    if ctx > info.context_length:
        raise UsageError(f"--ctx {ctx} exceeds the model's context of {info.context_length} tokens",
                         f"use --ctx {info.context_length} or less")
    tokens = read_tokens(engines[0], text)
    bos = info.bos_token_id if info.add_bos else None
    windows = make_windows(tokens, ctx, prefix, max_tokens, bos)
    total = sum(len(w) - prefix for w in windows)
    accs = [_Acc() for _ in configs]
    done = 0
    for win in windows:
        caches = [eng.new_cache(1) for eng in engines]
        ids = np.asarray([win[:prefix]], dtype=np.int64)
        last = [eng.forward(ids, cache, phase="prefill")[0, -1] for eng, cache in zip(engines, caches)]
        step = np.empty((1, 1), dtype=np.int64)
        for i in range(prefix, len(win)):
            target = win[i]
            base_lp = _log_softmax(last[0])
            base_top = int(np.argmax(last[0]))
            for k, acc in enumerate(accs):
                lp = base_lp if k == 0 else _log_softmax(last[k])
                acc.nll -= float(lp[target])
                if k:
                    p = np.exp(base_lp)
                    acc.kl += float(np.sum(p * (base_lp - lp)))
                    acc.agree += int(int(np.argmax(last[k])) == base_top)
                else:
                    acc.agree += 1
                acc.n += 1
                acc.kv(caches[k])
            done += 1
            if progress is not None:
                progress(done, total)
            if i + 1 < len(win):
                step[0, 0] = target
                last = [eng.forward(step, cache, phase="decode")[0, -1] for eng, cache in zip(engines, caches)]
    results = []
    base_ppl = float(np.exp(accs[0].nll / accs[0].n))
    for cfg, eng, acc, cache in zip(configs, engines, accs, caches):
        ppl = float(np.exp(acc.nll / acc.n))
        mean_kv = acc.kv_sum / acc.kv_steps if acc.kv_steps else None
        mean_fp16 = acc.kv_fp16_sum / acc.kv_steps if acc.kv_steps else None
        results.append(ConfigResult(
            config=cfg,
            kv=eng.backend.describe(),
            ppl=ppl,
            delta_ppl=ppl - base_ppl,
            kl_mean=acc.kl / acc.n if cfg != BASELINE else 0.0,
            top1_agreement=acc.agree / acc.n,
            kv_bytes=mean_kv,
            kv_bytes_peak=acc.kv_peak,
            kv_bytes_fp16=mean_fp16,
            kv_ratio_vs_fp16=(acc.kv_sum / acc.kv_fp16_sum) if acc.kv_fp16_sum else None,
            tokens_scored=acc.n,
            notes=list(getattr(cache, "notes", [])),
        ))
    del engines
    rss_note = "not measured (--no-rss)"
    if measure_rss:
        rss_note = (f"highest RSS sampled after each step of a fresh process running the first window "
                    f"({len(windows[0])} tokens) alone; model loading peaks are excluded")
        for res in results:
            res.peak_rss_mb = rss_probe(str(info.path), res.config, windows[0], prefix, threads, flags, exact_used)
    return EvalReport(model=info.name, text=str(text), ctx=ctx, prefix=prefix, tokens_scored=total,
                      windows=len(windows), results=results, rss_note=rss_note, exact_matmul=exact_used)


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process: ``ru_maxrss`` (POSIX) or ``peak_wset`` (Windows)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except ImportError:  # Windows
        try:
            import psutil

            return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None
        except Exception:
            return None


def rss_probe(model: str, config: str, window: list[int], prefix: int, threads: int | None,
              flags: dict[str, Any] | None = None, exact: bool = False) -> float | None:
    """Peak RSS (MiB) of a fresh subprocess that runs ``window`` teacher-forced with ``config``."""
    args = {"model": model, "config": config, "window": window, "prefix": prefix, "threads": threads,
            "flags": flags, "exact": exact}
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
    args = json.loads(sys.stdin.read())
    from inferos_cli.models.info import inspect_folder

    info = inspect_folder(Path(args["model"]))
    if args.get("exact"):
        from inferos_cli.graphs.exact import exact_info

        info, _ = exact_info(info)
    _, engines = load_engines(None, [args["config"]], args.get("threads"), info=info, flags=args.get("flags"))
    eng = engines[0]
    win, prefix = args["window"], int(args["prefix"])
    import psutil

    proc = psutil.Process()
    loaded = proc.memory_info().rss
    cache = eng.new_cache(1)
    eng.forward(np.asarray([win[:prefix]], dtype=np.int64), cache, phase="prefill")
    peak = proc.memory_info().rss
    step = np.empty((1, 1), dtype=np.int64)
    for tok in win[prefix:-1]:
        step[0, 0] = tok
        eng.forward(step, cache, phase="decode")
        peak = max(peak, proc.memory_info().rss)
    print(json.dumps({"peak_rss_bytes": peak, "rss_after_load_bytes": loaded,
                      "process_peak_rss_bytes": peak_rss_bytes(), "kv_bytes": cache.stats().total_bytes}))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through rss_probe
    raise SystemExit(_probe_main())
