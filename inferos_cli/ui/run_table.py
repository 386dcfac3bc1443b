"""Pure renderers for ``inferos run``: a :class:`RunSnapshot` in, a rich Table or one plain line out.

The snapshot is folded from the engine's events (:meth:`RunSnapshot.update`) and the telemetry
sampler's snapshot (:meth:`RunSnapshot.update_telemetry`); every value that could not be read stays
None and renders as ``n/a``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

from inferos_cli.events import Event
from inferos_cli.settings import format_bytes


@dataclass
class RunSnapshot:
    """What the live table shows, all values measured (or None)."""

    model: str = ""
    profile: str = ""
    kv_backend: str = ""
    providers: dict[str, str] = field(default_factory=dict)
    rows: int = 1
    prompt_tokens: int = 0
    generated: int = 0
    ttft_s: float | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    aggregate_tps: float | None = None
    kv_bytes: dict[str, int] = field(default_factory=dict)
    kv_tokens: dict[str, int] = field(default_factory=dict)
    kv_bytes_fp16: int | None = None
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    process_cpu_percent: float | None = None
    gpu_percent: float | None = None
    vram_bytes: int | None = None
    npu_percent: float | None = None
    pressure: float | None = None  # memory pressure 0..1 (runtime.pressure), None when unknown
    pressure_reason: str = ""
    finish_reason: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def update(self, event: Event) -> None:
        """Fold one engine event in (the latest values win; batch events sum their rows)."""
        if event.provider:
            self.providers = dict(event.provider)
        if event.kind == "prefill":
            self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens) if self.rows == 1 else (
                self.prompt_tokens + event.prompt_tokens)
        if event.ttft_s is not None:
            self.ttft_s = event.ttft_s
        if event.prefill_tps is not None:
            self.prefill_tps = event.prefill_tps
        if event.decode_tps is not None:
            self.decode_tps = event.decode_tps
        if event.kind == "token":
            self.generated += 1
        if event.kv is not None:
            self.kv_bytes = dict(event.kv.bytes)
            self.kv_tokens = dict(event.kv.tokens)
            self.kv_bytes_fp16 = event.kv.bytes_fp16
        if event.rss_bytes is not None:
            self.rss_bytes = event.rss_bytes
        if event.util:
            self.cpu_percent = event.util.get("cpu", self.cpu_percent)
            self.gpu_percent = event.util.get("gpu", self.gpu_percent)
            self.npu_percent = event.util.get("npu", self.npu_percent)
        batch = event.extra.get("batch") if event.extra else None
        if isinstance(batch, dict) and batch.get("tokens_per_s") is not None:
            self.aggregate_tps = batch["tokens_per_s"]
        if event.kind == "done" and event.finish_reason:
            self.finish_reason = event.finish_reason
        if event.kind == "done" and self.rows == 1:  # remote backends learn the counts only from the usage/stats
            self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
            self.generated = max(self.generated, event.generated)

    def update_telemetry(self, snap: dict[str, Any]) -> None:
        """Fold a ``TelemetrySampler.snapshot()`` in (values or None, plus reasons)."""
        self.cpu_percent = snap.get("cpu")
        self.process_cpu_percent = snap.get("process_cpu")
        self.gpu_percent = snap.get("gpu")
        vram = snap.get("vram_bytes")
        self.vram_bytes = int(vram) if vram is not None else None
        self.npu_percent = snap.get("npu")
        if snap.get("rss_bytes") is not None and self.rss_bytes is None:
            self.rss_bytes = int(snap["rss_bytes"])
        self.reasons = dict(snap.get("reasons") or {})
        pressure = snap.get("pressure")
        if isinstance(pressure, dict):
            self.pressure = pressure.get("level")
            self.pressure_reason = str(pressure.get("reason") or "")

    @property
    def kv_total(self) -> int | None:
        """Resident KV bytes over tiers, None before the first event."""
        return sum(self.kv_bytes.values()) if self.kv_bytes else None

    @property
    def kv_ratio(self) -> float | None:
        """Resident / fp16 bytes of the same tokens."""
        total = self.kv_total
        return total / self.kv_bytes_fp16 if total is not None and self.kv_bytes_fp16 else None

    def to_json(self) -> dict[str, Any]:
        """Plain data (for ``--format json`` style consumers)."""
        data = asdict(self)
        data["kv_total_bytes"] = self.kv_total
        data["kv_ratio_vs_fp16"] = self.kv_ratio
        return data


def _num(value: float | None, fmt: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{fmt}} {unit}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f} ms"


def kv_text(snap: RunSnapshot) -> str:
    """``1.2 MiB (fp 1.2 MiB; 2.00x fp16)`` or ``n/a``."""
    if snap.kv_total is None:
        return "n/a"
    tiers = ", ".join(f"{tier} {format_bytes(n)}" for tier, n in snap.kv_bytes.items())
    ratio = f"; {snap.kv_ratio:.2f}x fp16" if snap.kv_ratio is not None else ""
    return f"{format_bytes(snap.kv_total)} ({tiers}{ratio})"


def run_rows(snap: RunSnapshot) -> list[tuple[str, str]]:
    """(metric, value with unit) pairs, in table order."""
    prov = snap.providers
    rows = [
        ("model", snap.model or "n/a"),
        ("profile", snap.profile or "default"),
        ("provider prefill", prov.get("prefill", "n/a")),
        ("provider decode", prov.get("decode", "n/a")),
        ("KV cache", snap.kv_backend or "n/a"),
        ("prompt", f"{snap.prompt_tokens} tokens"),
        ("generated", f"{snap.generated} tokens"),
        ("first-token latency", _ms(snap.ttft_s)),
        ("prefill", _num(snap.prefill_tps, ".1f", "tok/s")),
        ("decode", _num(snap.decode_tps, ".1f", "tok/s")),
    ]
    if snap.rows > 1:
        rows.append(("batch aggregate", _num(snap.aggregate_tps, ".1f", "tok/s") + f" over {snap.rows} prompts"))
    rows += [
        ("KV bytes", kv_text(snap)),
        ("RSS", format_bytes(snap.rss_bytes)),
        ("CPU", _num(snap.cpu_percent, ".0f", "%")),
        ("GPU", _num(snap.gpu_percent, ".0f", "%")),
        ("VRAM", format_bytes(snap.vram_bytes)),
        ("NPU", _num(snap.npu_percent, ".0f", "%")),
        ("memory pressure", "n/a" if snap.pressure is None else f"{snap.pressure:.2f} (0-1)"),
    ]
    if snap.finish_reason:
        rows.append(("finish", snap.finish_reason))
    return rows


def run_table(snap: RunSnapshot) -> Table:
    """The live table: one metric per row, units in the values, ``n/a`` for what cannot be read."""
    table = Table(title="inferos run", title_justify="left", show_header=True, expand=False)
    table.add_column("metric", no_wrap=True, style="bold")
    table.add_column("value", overflow="fold")
    for name, value in run_rows(snap):
        table.add_row(name, value)
    return table


def summary_line(snap: RunSnapshot) -> str:
    """One line for pipes and the end of a run."""
    parts = [
        f"{snap.generated} tokens",
        f"prompt {snap.prompt_tokens} tokens",
        f"TTFT {_ms(snap.ttft_s)}",
        f"prefill {_num(snap.prefill_tps, '.1f', 'tok/s')}",
        f"decode {_num(snap.decode_tps, '.1f', 'tok/s')}",
    ]
    if snap.rows > 1:
        parts.append(f"aggregate {_num(snap.aggregate_tps, '.1f', 'tok/s')} over {snap.rows} prompts")
    parts += [
        f"KV {kv_text(snap)}",
        f"RSS {format_bytes(snap.rss_bytes)}",
        f"CPU {_num(snap.cpu_percent, '.0f', '%')}",
        f"GPU {_num(snap.gpu_percent, '.0f', '%')}",
        f"NPU {_num(snap.npu_percent, '.0f', '%')}",
        f"memory pressure {'n/a' if snap.pressure is None else format(snap.pressure, '.2f')} (0-1)",
        f"prefill on {snap.providers.get('prefill', 'n/a')}",
        f"decode on {snap.providers.get('decode', 'n/a')}",
        f"profile {snap.profile or 'default'}",
    ]
    if snap.finish_reason:
        parts.append(f"finish {snap.finish_reason}")
    return ", ".join(parts)
