"""`inferos bench`: a grid of (batch, prompt length) cells, several configs per cell, interleaved repeats.

How it measures (also written into every result under ``method``):

- **Isolation.** For every cell, each in-process config (``baseline``, ``inferos``, profiles, presets,
  ``ort-genai``) runs in its *own fresh worker subprocess* (:mod:`inferos_cli.bench.worker`) that
  loads the model once for that cell. Workers of one cell stay alive together and take turns, so repeats
  are interleaved A B A B ... and machine drift hits every config alike. Warmup runs go first (A B) and
  are discarded.
- **Peak RSS** is per run, of the worker process, which holds only its own config's model: on Linux the
  kernel high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` before each run and read
  after it (exact); elsewhere RSS is sampled every 2 ms and at every event (may miss sub-2 ms spikes).
- **Timing** is taken by the consumer of the engine's event iterator (``time.perf_counter``):
  TTFT = call -> first token event; prefill tok/s = batch x prompt tokens / TTFT; decode tok/s =
  (all token events - batch) / (last token - first token); e2e = call -> iterator exhausted.
- **KV bytes** are the engine's own :class:`~inferos_cli.events.KVStats` (largest resident total seen
  during the run, with its fp16 reference for the ratio).
- **Prompts** are windows of real text with exact token counts (BOS included when the model adds one);
  each batch row gets a different window. Generation is greedy with EOS ignored, so every row makes
  exactly ``gen_tokens`` tokens.

Every sample is kept; cells report mean, sd (sample, n-1), median, min, max and n.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from inferos_cli.errors import BackendError, InferosError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

SCHEMA = "inferos.bench/1"
METRICS: tuple[str, ...] = (
    "ttft_ms", "prefill_tps", "decode_tps", "e2e_ms", "peak_rss_mb", "kv_bytes", "kv_ratio_vs_fp16",
)
# Units of every metric (JSON keeps the names; tables print the units).
UNITS: dict[str, str] = {
    "ttft_ms": "ms", "prefill_tps": "tok/s", "decode_tps": "tok/s", "e2e_ms": "ms",
    "peak_rss_mb": "MiB", "kv_bytes": "B", "kv_ratio_vs_fp16": "x",
}
QUALITY_METRICS: tuple[str, ...] = ("ppl", "delta_ppl", "kl_mean", "top1_agreement")
PEER_NAMES = ("ort-genai", "lemonade")
DEFAULT_TEXT = Path("data") / "wikitext2-raw-test.txt"


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


@dataclass
class ConfigSpec:
    """One column of the comparison: an engine config (profile list), or a peer."""

    name: str
    kind: str  # "engine" | "ort-genai" | "lemonade"
    profile: str | None = None  # comma list handed to resolve_settings (engine configs)
    profiles: list[str] = field(default_factory=list)  # as resolved (size class first)
    kv: dict[str, Any] = field(default_factory=dict)  # the resolved KV policy
    scheduler: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None
    url: str | None = None
    server_model: str | None = None
    model_path: str | None = None  # the folder a peer loads when it is not the model's own

    def to_json(self) -> dict[str, Any]:
        """Plain data for results."""
        return asdict(self)


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``; a one-line UsageError for anything else."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma list of integers, got {text!r}", f"e.g. {what} 1,4,8") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} needs positive integers, got {text!r}", f"e.g. {what} 1,4,8")
    return list(dict.fromkeys(values))


def parse_compare(text: str) -> list[str]:
    """``"baseline,inferos,7b+chat"`` -> names in order, duplicates dropped."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise UsageError("--compare is empty", "e.g. --compare baseline,inferos")
    return list(dict.fromkeys(names))


def build_configs(
    names: Sequence[str],
    info: "ModelInfo",
    *,
    profile: str | None,
    config_path: Path | None,
    url: str | None = None,
    server_model: str | None = None,
) -> list[ConfigSpec]:
    """Resolve every ``--compare`` name before anything runs (an unknown profile fails here, in one line).

    - ``baseline``: the ``--profile`` stack plus the ``baseline`` preset (KV off, same devices);
    - ``inferos``: the ``--profile`` stack (default: the model's size class);
    - any other name, or names joined with ``+``: the ``--profile`` stack plus those profiles/presets;
    - ``ort-genai`` / ``lemonade``: peers, skipped with a reason when they cannot run.
    """
    from inferos_cli.profiles import resolve_settings, split_names

    base = split_names(profile)
    out: list[ConfigSpec] = []
    for name in names:
        if name == "ort-genai":
            from inferos_cli.bench.peers import genai_folder, genai_skip_reason

            reason = genai_skip_reason(info)
            spec = ConfigSpec(name=name, kind="ort-genai", skip_reason=reason)
            if reason is None:
                spec.model_path = str(genai_folder(info))
            out.append(spec)
            continue
        if name == "lemonade":
            from inferos_cli.bench.peers import default_url, lemonade_skip_reason

            out.append(ConfigSpec(name=name, kind="lemonade", url=url or default_url(), server_model=server_model,
                                  skip_reason=lemonade_skip_reason(url)))
            continue
        if name == "inferos":
            stack = list(base)
        elif name == "baseline":
            stack = [n for n in base if n != "baseline"] + ["baseline"]
        else:
            stack = base + [p.strip() for p in name.split("+") if p.strip()]
        joined = ",".join(stack) or None
        resolved = resolve_settings(joined, param_count=info.param_count, config_path=config_path)
        out.append(
            ConfigSpec(
                name=name,
                kind="engine",
                profile=joined,
                profiles=list(resolved.profiles),
                kv=resolved.policy.kv.model_dump(mode="json"),
                scheduler=resolved.policy.scheduler.model_dump(mode="json"),
            )
        )
    return out


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
    if dtype is not None:
        try:
            from inferos_cli.models.resolve import resolve_model
        except ImportError:
            raise UsageError("--dtype needs the model registry (inferos_cli.models.resolve)",
                             "pass an already converted ONNX folder") from None
        return resolve_model(model, dtype=dtype, progress=True)
    from inferos_cli.models.resolve import resolve_model

    return resolve_model(model, progress=True)


# ---------------------------------------------------------------------------------------------- prompts
def default_text() -> Path:
    """The prompt text when ``--text`` is not given: ``INFEROS_BENCH_TEXT``, else wikitext-2 from the
    shared data folder (``INFEROS_SHARED`` or ``../shared`` beside the checkout)."""
    env = os.environ.get("INFEROS_BENCH_TEXT")
    if env:
        return Path(env)
    roots = [Path(os.environ["INFEROS_SHARED"])] if os.environ.get("INFEROS_SHARED") else []
    roots.append(Path(__file__).resolve().parents[2].parent / "shared")
    for root in roots:
        candidate = root / DEFAULT_TEXT
        if candidate.is_file():
            return candidate
    raise UsageError("no prompt text found (wikitext-2 is not beside this checkout)",
                     "pass --text FILE with a few KB of real prose (or set INFEROS_BENCH_TEXT)")


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


# -------------------------------------------------------------------------------------------- statistics
def summarize(samples: Sequence[float | None]) -> dict[str, Any]:
    """mean / sd (n-1) / median / min / max / n of the non-None samples; every sample kept."""
    vals = [float(v) for v in samples if v is not None]
    out: dict[str, Any] = {"mean": None, "sd": None, "median": None, "min": None, "max": None,
                           "n": len(vals), "samples": [None if v is None else float(v) for v in samples]}
    if vals:
        out.update(mean=statistics.fmean(vals), median=statistics.median(vals), min=min(vals), max=max(vals),
                   sd=statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------------------------------------------- host
def cpu_model() -> str | None:
    """The CPU's marketing name, read from the OS; None when it cannot be read."""
    system = platform.system()
    try:
        if system == "Linux":
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
        elif system == "Windows":  # pragma: no cover - Windows only
            import winreg

            key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0")
            return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
        elif system == "Darwin":  # pragma: no cover - macOS only
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5, check=False)
            return out.stdout.strip() or None
    except Exception:
        return None
    return platform.processor() or None


def host_record(info: "ModelInfo | None" = None) -> dict[str, Any]:
    """CPU, cores, RAM, OS, Python, onnxruntime (+ genai) and inferos versions, load, model facts."""
    import importlib.metadata as md

    import psutil

    from inferos_cli import __version__

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    ort_version = next((v for v in (version(p) for p in (
        "onnxruntime", "onnxruntime-directml", "onnxruntime-gpu", "onnxruntime-openvino")) if v), None)
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
    except Exception:
        providers = []
    try:
        load = [round(x, 2) for x in psutil.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        load = None
    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "onnxruntime_providers": providers,
        "onnxruntime_genai": version("onnxruntime-genai"),
        "inferos": __version__,
        "load_avg_1_5_15": load,
    }
    if info is not None:
        record["model"] = model_facts(info)
    return record


def model_facts(info: "ModelInfo") -> dict[str, Any]:
    """The facts of the benchmarked model that matter to a reader of the numbers."""
    data = info.to_json()
    keep = ("name", "path", "source_format", "architecture", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "hidden_size", "vocab_size", "context_length", "param_count", "kv_dtype",
            "uses_gqa_op", "has_position_ids", "size_class")
    facts = {k: data.get(k) for k in keep}
    try:
        facts["onnx_bytes"] = sum(p.stat().st_size for p in Path(info.path).iterdir()
                                  if p.is_file() and (p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")))
    except OSError:
        facts["onnx_bytes"] = None
    return facts


# --------------------------------------------------------------------------------------------- workers
class Runner:
    """Something that can run one measured generation for a config: a worker subprocess or a peer."""

    def load(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        pass


class WorkerProcess(Runner):
    """A fresh ``python -m inferos_cli.bench.worker`` subprocess holding one config's model.

    Requests and replies are JSON lines over the worker's stdin/stdout; its stderr goes to a temp file
    whose last line is quoted when it fails.
    """

    def __init__(self, spec: ConfigSpec, model_path: Path, *, threads: int | None,
                 config_path: Path | None, strict_devices: bool = False) -> None:
        self.spec = spec
        self._err = tempfile.TemporaryFile(mode="w+b")
        env = dict(os.environ)
        env.setdefault("PYTHONIOENCODING", "utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferos_cli.bench.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env,
        )
        self._load_msg = {
            "op": "load", "kind": spec.kind, "model": str(model_path), "profile": spec.profile,
            "threads": threads, "config": str(config_path) if config_path else None,
            "strict_devices": strict_devices,
        }
        self._sent_load = False

    def send_load(self) -> None:
        """Start loading without waiting (workers of one cell load side by side)."""
        self._send(self._load_msg)
        self._sent_load = True

    def load(self) -> dict[str, Any]:
        if not self._sent_load:
            self.send_load()
        return self._recv()

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:
        self._send({"op": "run", "prompts": prompts, "gen_tokens": gen_tokens})
        return self._recv()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self._send({"op": "exit"})
                self.proc.wait(timeout=30)
        except Exception:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
            self._err.close()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BackendError(f"bench worker for {self.spec.name} exited: {self._stderr_tail()}") from None

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise BackendError(
                f"bench worker for {self.spec.name} exited (code {self.proc.returncode}): {self._stderr_tail()}"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise BackendError(f"{self.spec.name}: {reply.get('error', 'worker failed')}")
        return reply

    def _stderr_tail(self) -> str:
        try:
            self._err.seek(0)
            lines = [ln for ln in self._err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            return lines[-1].strip() if lines else "no message"
        except OSError:  # pragma: no cover
            return "no message"


def make_runner(spec: ConfigSpec, info: "ModelInfo", *, threads: int | None, config_path: Path | None,
                strict_devices: bool = False) -> Runner:
    """The runner of one config for one cell."""
    if spec.kind == "lemonade":
        from inferos_cli.bench.peers import LemonadePeer

        return LemonadePeer(spec.url, info, server_model=spec.server_model)
    return WorkerProcess(spec, Path(spec.model_path or info.path), threads=threads, config_path=config_path,
                         strict_devices=strict_devices)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class CellResult:
    """One (batch, seq, config) row: its samples, statistics and status."""

    batch: int
    seq: int
    config: str
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None
    samples: dict[str, list[float | None]] = field(default_factory=lambda: {m: [] for m in METRICS})
    providers: dict[str, str] = field(default_factory=dict)
    kv_backend: str | None = None
    load_s: float | None = None
    rss_after_load_mb: float | None = None
    generated_per_row: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> dict[str, Any]:
        """Statistics of one metric."""
        return summarize(self.samples.get(name, []))


@dataclass
class BenchResult:
    """Everything a bench run measured; :meth:`to_json` is the documented schema."""

    host: dict[str, Any]
    grid: Grid
    configs: list[ConfigSpec]
    text: str
    cells: list[CellResult] = field(default_factory=list)
    order: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    wall_s: float | None = None
    rss_method: str = ""
    complete: bool = False
    config_file: str | None = None

    def cell(self, batch: int, seq: int, config: str) -> CellResult | None:
        """The row of one config in one cell."""
        return next((c for c in self.cells if (c.batch, c.seq, c.config) == (batch, seq, config)), None)

    def reference(self) -> str | None:
        """The config ratios are taken against: ``baseline`` when compared, else the first config."""
        names = [c.name for c in self.configs if c.skip_reason is None]
        if "baseline" in names:
            return "baseline"
        return names[0] if names else None

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per (batch, seq, config): stats, ratios vs the reference, providers, status."""
        ref = self.reference()
        out = []
        for c in self.cells:
            metrics = {m: c.metric(m) for m in METRICS}
            base = self.cell(c.batch, c.seq, ref) if ref and ref != c.config else None
            ratios = None
            if base is not None and base.status == "ok" and c.status == "ok":
                ratios = {m: ratio(metrics[m]["mean"], base.metric(m)["mean"]) for m in METRICS}
            out.append({
                "batch": c.batch, "seq": c.seq, "gen_tokens": self.grid.gen_tokens, "config": c.config,
                "status": c.status, "reason": c.reason, "metrics": metrics,
                "ratio_vs": ref if ratios is not None else None, "ratios": ratios,
                "providers": c.providers, "kv_backend": c.kv_backend, "load_s": c.load_s,
                "rss_after_load_mb": c.rss_after_load_mb, "generated_per_row": c.generated_per_row,
                "extra": c.extra,
            })
        return out

    def to_json(self) -> dict[str, Any]:
        """The whole result as plain JSON data (schema in benchmarks/README.md)."""
        return {
            "schema": SCHEMA,
            "complete": self.complete,
            "started": self.started,
            "finished": self.finished,
            "wall_s": self.wall_s,
            "host": self.host,
            "grid": asdict(self.grid),
            "text": self.text,
            "config_file": self.config_file,
            "units": UNITS,
            "method": {
                "isolation": "one fresh worker subprocess per (config, cell); the workers of a cell take turns",
                "interleave": "per cell: warmups A B .. (discarded), then repeats A B A B ..",
                "rss": self.rss_method,
                "timing": "perf_counter at the consumer of the event iterator; TTFT = call -> first token; "
                          "prefill tok/s = batch*seq/TTFT; decode tok/s = (token events - batch)/(last - first token)",
                "kv": "the engine's KVStats: largest resident total during the run; ratio vs the same tokens in fp16",
                "prompts": "windows of real text with exact token counts, one window per batch row; greedy, EOS ignored",
            },
            "configs": [c.to_json() for c in self.configs],
            "reference": self.reference(),
            "rss_method": self.rss_method or _rss_method_from(self),
            "skipped": self.skipped,
            "order": self.order,
            "rows": self.rows(),
            "quality": self.quality,
        }


# ------------------------------------------------------------------------------------------------- run
@dataclass
class Progress:
    """What the progress callback receives after each step."""

    done_weight: int
    total_weight: int
    step: Step | None
    message: str = ""
    elapsed_s: float = 0.0
    cell_done: tuple[int, int] | None = None

    @property
    def eta_s(self) -> float | None:
        """Time left, extrapolated from the cost done so far (steps weighted by batch x tokens)."""
        if self.done_weight <= 0:
            return None
        return self.elapsed_s / self.done_weight * (self.total_weight - self.done_weight)


def run_bench(
    info: "ModelInfo",
    grid: Grid,
    configs: list[ConfigSpec],
    *,
    text_path: Path,
    config_path: Path | None = None,
    strict_devices: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    on_cell: Callable[[BenchResult], None] | None = None,
    runner_factory: Callable[..., Runner] | None = None,
) -> BenchResult:
    """Run the whole grid, interleaved, and return every sample. ``on_cell`` sees the partial result
    after each cell (``complete`` False until the end), e.g. to save it so an interrupted run keeps
    what it measured."""
    started = time.perf_counter()
    result = BenchResult(
        host=host_record(info), grid=grid, configs=configs, text=str(text_path),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config_file=str(config_path) if config_path else None,
    )
    factory = runner_factory or make_runner
    for spec in configs:
        if spec.skip_reason:
            result.skipped.append({"config": spec.name, "reason": spec.skip_reason})
    live = [c for c in configs if not c.skip_reason]
    if not live:
        raise UsageError("nothing to compare: every config was skipped",
                         "; ".join(f"{s['config']}: {s['reason']}" for s in result.skipped))
    ctx = int(info.context_length)
    fitting = [(b, s) for b, s in grid.cells() if s + grid.gen_tokens <= ctx]
    ids = corpus_ids(info, text_path, need=max((b * s for b, s in fitting), default=1) + 1)
    bos = info.bos_token_id if info.add_bos else None
    steps = schedule(fitting, [c.name for c in live], grid.repeats, grid.warmup, grid.gen_tokens)
    total = sum(s.weight for s in steps) or 1
    done = 0
    if on_progress:
        on_progress(Progress(0, total, None, "starting"))
    for batch, seq in grid.cells():
        if (batch, seq) not in fitting:
            reason = f"{seq}+{grid.gen_tokens} tokens exceed the model's context of {ctx}"
            for spec in live:
                result.cells.append(CellResult(batch, seq, spec.name, status="skipped", reason=reason))
            continue
        prompts = make_prompts(ids, batch, seq, bos)
        rows = {spec.name: CellResult(batch, seq, spec.name) for spec in live}
        runners: dict[str, Runner] = {}
        try:
            runners = _start_cell(live, info, grid, config_path, factory, rows, strict_devices)
            cell_steps = [s for s in steps if (s.batch, s.seq) == (batch, seq)]
            for step in cell_steps:
                row = rows[step.config]
                runner = runners.get(step.config)
                if runner is not None and row.status == "ok":
                    t_step = time.perf_counter()
                    entry = {"index": len(result.order), "batch": batch, "seq": seq, "config": step.config,
                             "repeat": step.repeat, "warmup": step.warmup, "t_s": round(t_step - started, 4),
                             "ok": True}
                    result.order.append(entry)
                    try:
                        sample = runner.run(prompts, grid.gen_tokens)
                    except InferosError as exc:
                        entry["ok"] = False
                        row.status, row.reason = "error", exc.one_line()
                        runner.close()
                        runners.pop(step.config, None)
                    else:
                        if not step.warmup:
                            _record(row, sample)
                        elif sample.get("rss_method"):
                            result.rss_method = sample["rss_method"]
                done += step.weight
                if on_progress:
                    on_progress(Progress(done, total, step, f"batch {batch} seq {seq} {step.config}",
                                         time.perf_counter() - started))
        finally:
            for runner in runners.values():
                runner.close()
        result.cells.extend(rows[spec.name] for spec in live)
        if on_cell:
            on_cell(result)
        if on_progress:
            on_progress(Progress(done, total, None, f"batch {batch} seq {seq} done", time.perf_counter() - started,
                                 cell_done=(batch, seq)))
    if not result.rss_method:
        result.rss_method = _rss_method_from(result)
    result.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.wall_s = round(time.perf_counter() - started, 3)
    result.complete = True
    try:
        import psutil

        result.host["load_avg_1_5_15_end"] = [round(x, 2) for x in psutil.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        pass
    return result


def _start_cell(live: list[ConfigSpec], info: "ModelInfo", grid: Grid, config_path: Path | None,
                factory: Callable[..., Runner], rows: dict[str, CellResult],
                strict_devices: bool = False) -> dict[str, Runner]:
    """Start every config's runner for one cell (loads side by side), recording load facts or errors."""
    runners: dict[str, Runner] = {}
    for spec in live:
        try:
            runner = factory(spec, info, threads=grid.threads, config_path=config_path, strict_devices=strict_devices)
            if isinstance(runner, WorkerProcess):
                runner.send_load()
            runners[spec.name] = runner
        except InferosError as exc:
            rows[spec.name].status, rows[spec.name].reason = "error", exc.one_line()
    for name, runner in list(runners.items()):
        row = rows[name]
        try:
            loaded = runner.load()
        except InferosError as exc:
            row.status, row.reason = "error", exc.one_line()
            runner.close()
            runners.pop(name)
            continue
        row.providers = dict(loaded.get("providers") or {})
        row.kv_backend = loaded.get("kv_backend")
        row.load_s = loaded.get("load_s")
        rss = loaded.get("rss_bytes")
        row.rss_after_load_mb = round(rss / 2**20, 2) if rss else None
        if loaded.get("extra"):
            row.extra.update(loaded["extra"])
    return runners


def _record(row: CellResult, sample: dict[str, Any]) -> None:
    """Append one measured run's numbers to a row."""
    for m in METRICS:
        row.samples[m].append(sample.get(m))
    if sample.get("providers"):
        row.providers = dict(sample["providers"])
    row.generated_per_row = list(sample.get("generated_per_row") or row.generated_per_row)
    for key in ("rss_method", "kv_note", "kv_tiers", "server_stats", "endpoint", "server_prompt_tokens"):
        if sample.get(key) is not None:
            row.extra[key] = sample[key]


def _rss_method_from(result: BenchResult) -> str:
    for c in result.cells:
        if c.extra.get("rss_method"):
            return str(c.extra["rss_method"])
    return "n/a (no run completed)"


def quality_for(
    info: "ModelInfo", configs: list[ConfigSpec], *, text_path: Path, config_path: Path | None, max_tokens: int,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``--quality``: perplexity, delta vs ``baseline`` (KV off), mean KL and top-1 agreement of every engine
    config, from the eval machinery (:func:`inferos_cli.quality.eval.run_eval`: teacher-forced through
    the real cache path, all configs in lockstep on the same windows of ``text_path``). Peers and skipped
    configs get a ``reason`` instead."""
    out: dict[str, dict[str, Any]] = {}
    entries: dict[str, str] = {}
    for c in configs:
        if c.skip_reason:
            out[c.name] = {"reason": f"skipped: {c.skip_reason}"}
        elif c.kind != "engine":
            out[c.name] = {"reason": f"{c.kind} is a peer: quality is scored for in-process engine configs"}
        else:
            stack = c.profile or info.size_class
            if stack:
                entries[c.name] = stack.replace(",", "+")
            else:
                out[c.name] = {"reason": "no profile and no size class to resolve for the eval"}
    if not entries:
        return out
    try:
        from inferos_cli.quality import eval as evaluate
    except ImportError:  # pragma: no cover - the eval machinery ships with inferos
        return out | {n: {"reason": "inferos_cli.quality.eval is not available"} for n in entries}
    ctx = min(512, int(info.context_length))
    compare = ",".join(dict.fromkeys(["baseline", *(e for e in entries.values() if e != "baseline")]))
    try:
        report = evaluate.run_eval(str(info.path), text_path, ctx=ctx, prefix=min(64, ctx // 4),
                                   max_tokens=max_tokens, compare=compare, threads=threads, measure_rss=False)
    except InferosError as exc:
        return out | {n: {"reason": exc.one_line()} for n in entries}
    by_entry = {r.config: r for r in report.results}
    for name, entry in entries.items():
        r = by_entry.get(entry)
        if r is None:
            out[name] = {"reason": f"the eval returned no result for {entry}"}
            continue
        out[name] = {"ppl": r.ppl, "delta_ppl": r.delta_ppl, "kl_mean": r.kl_mean,
                     "top1_agreement": r.top1_agreement, "tokens_scored": r.tokens_scored, "kv": r.kv,
                     "eval_config": entry, "ctx": report.ctx, "prefix": report.prefix}
    return {c.name: out[c.name] for c in configs if c.name in out}
