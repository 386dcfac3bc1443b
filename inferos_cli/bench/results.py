"""What ``inferos bench`` keeps: every sample of every (batch, seq, config) row, their statistics (mean, sd
(sample, n-1), median, min, max, n), ratios against the reference config, and the host the run measured on.
:meth:`BenchResult.to_json` is the documented schema (``benchmarks/README.md``).
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from inferos_cli.bench.configs import ConfigSpec
from inferos_cli.bench.grid import METRICS, Grid

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

SCHEMA = "inferos.bench/1"
# Units of every metric (JSON keeps the names; tables print the units).
UNITS: dict[str, str] = {
    "ttft_ms": "ms", "prefill_tps": "tok/s", "decode_tps": "tok/s", "e2e_ms": "ms",
    "peak_rss_mb": "MiB", "kv_bytes": "B", "kv_ratio_vs_fp16": "x",
}


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

    def measured_rss_method(self) -> str:
        """How peak RSS was measured, as the first row that ran says."""
        for c in self.cells:
            if c.extra.get("rss_method"):
                return str(c.extra["rss_method"])
        return "n/a (no run completed)"

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
            "rss_method": self.rss_method or self.measured_rss_method(),
            "skipped": self.skipped,
            "order": self.order,
            "rows": self.rows(),
            "quality": self.quality,
        }


# ------------------------------------------------------------------------------------------------- host
def host_record(info: "ModelInfo | None" = None) -> dict[str, Any]:
    """CPU, cores, RAM, OS, Python, onnxruntime (+ genai) and inferos versions, load, model facts."""
    import importlib.metadata as md

    import psutil

    from inferos_cli import __version__
    from inferos_cli.machine.host import cpu_model

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
