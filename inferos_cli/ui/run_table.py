"""Pure renderers for ``inferos run``: a :class:`RunSnapshot` in, a rich Table or one plain line out.

The snapshot folds the engine's events through :class:`~inferos_cli.events.RunStats` (the one fold every
view shares: :meth:`RunSnapshot.update`) and keeps the telemetry sampler's latest values
(:meth:`RunSnapshot.update_telemetry`); every value that could not be read stays None and renders as ``n/a``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from inferos_cli.events import Event, RunStats
from inferos_cli.units import format_bytes, format_ms, format_value


@dataclass
class RunSnapshot:
    """What the live table shows: labels, the run's :class:`RunStats`, and the latest telemetry; every
    measured value is read from the stats (or the sampler) and is None until measured."""

    model: str = ""
    profile: str = ""
    kv_backend: str = ""
    providers: dict[str, str] = field(default_factory=dict)
    rows: int = 1
    cpu_percent: float | None = None
    process_cpu_percent: float | None = None
    gpu_percent: float | None = None
    vram_bytes: int | None = None
    npu_percent: float | None = None
    pressure: float | None = None  # memory pressure 0..1 (machine.pressure), None when unknown
    pressure_reason: str = ""
    reasons: dict[str, str] = field(default_factory=dict)
    stats: RunStats = field(default_factory=RunStats)
    telemetry_rss_bytes: int | None = None
    _finish_reason: str | None = field(default=None, init=False, repr=False)

    def update(self, event: Event) -> None:
        """Fold one engine event in: into the stats, and the providers and utilisation it reports."""
        self.stats.add(event)
        if event.provider:
            self.providers = dict(self.stats.providers)
        if event.util:  # the latest reading wins, whether from an event or the sampler
            util = self.stats.util
            self.cpu_percent = util.get("cpu", self.cpu_percent)
            self.gpu_percent = util.get("gpu", self.gpu_percent)
            self.npu_percent = util.get("npu", self.npu_percent)

    def update_telemetry(self, snap: dict[str, Any]) -> None:
        """Fold a ``TelemetrySampler.snapshot()`` in (values or None, plus reasons)."""
        self.cpu_percent = snap.get("cpu")
        self.process_cpu_percent = snap.get("process_cpu")
        self.gpu_percent = snap.get("gpu")
        vram = snap.get("vram_bytes")
        self.vram_bytes = int(vram) if vram is not None else None
        self.npu_percent = snap.get("npu")
        if snap.get("rss_bytes") is not None:
            self.telemetry_rss_bytes = int(snap["rss_bytes"])
        self.reasons = dict(snap.get("reasons") or {})
        pressure = snap.get("pressure")
        if isinstance(pressure, dict):
            self.pressure = pressure.get("level")
            self.pressure_reason = str(pressure.get("reason") or "")

    # -- the measured values, as RunStats defines them --------------------------------------------------
    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over all rows."""
        return self.stats.prompt_tokens

    @property
    def generated(self) -> int:
        """Generated tokens over all rows."""
        return self.stats.generated

    @property
    def ttft_s(self) -> float | None:
        """Prompt handed over -> first token."""
        return self.stats.ttft_s

    @property
    def prefill_tps(self) -> float | None:
        """Prompt tokens / TTFT."""
        return self.stats.prefill_tps

    @property
    def decode_tps(self) -> float | None:
        """Per-stream decode rate."""
        return self.stats.decode_tps

    @property
    def aggregate_tps(self) -> float | None:
        """A batch's tokens/s over all its rows, as the batch reports it."""
        return self.stats.batch_tps

    @property
    def rss_bytes(self) -> int | None:
        """The process RSS: the latest event's, else the sampler's."""
        return self.stats.rss_bytes if self.stats.rss_bytes is not None else self.telemetry_rss_bytes

    @property
    def kv_bytes(self) -> dict[str, int]:
        """Resident KV bytes per tier (empty before the first KV snapshot)."""
        return dict(self.stats.kv.bytes) if self.stats.kv is not None else {}

    @property
    def kv_total(self) -> int | None:
        """Resident KV bytes over tiers, None before the first KV snapshot."""
        kv = self.stats.kv
        return kv.total_bytes if kv is not None and kv.bytes else None

    @property
    def kv_ratio(self) -> float | None:
        """Resident / fp16 bytes of the same tokens."""
        return self.stats.kv.ratio_vs_fp16 if self.kv_total is not None else None

    @property
    def finish_reason(self) -> str | None:
        """Why generation ended (the view sets ``interrupted`` on Ctrl-C), None while it runs."""
        return self._finish_reason or self.stats.finish_reason

    @finish_reason.setter
    def finish_reason(self, reason: str | None) -> None:
        self._finish_reason = reason


def _tok_s(value: float | None) -> str:
    return format_value(value, ".1f", " tok/s")


def _percent(value: float | None) -> str:
    return format_value(value, ".0f", " %")


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
        ("first-token latency", format_ms(snap.ttft_s)),
        ("prefill", _tok_s(snap.prefill_tps)),
        ("decode", _tok_s(snap.decode_tps)),
    ]
    if snap.rows > 1:
        rows.append(("batch aggregate", _tok_s(snap.aggregate_tps) + f" over {snap.rows} prompts"))
    rows += [
        ("KV bytes", kv_text(snap)),
        ("RSS", format_bytes(snap.rss_bytes)),
        ("CPU", _percent(snap.cpu_percent)),
        ("GPU", _percent(snap.gpu_percent)),
        ("VRAM", format_bytes(snap.vram_bytes)),
        ("NPU", _percent(snap.npu_percent)),
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
        f"TTFT {format_ms(snap.ttft_s)}",
        f"prefill {_tok_s(snap.prefill_tps)}",
        f"decode {_tok_s(snap.decode_tps)}",
    ]
    if snap.rows > 1:
        parts.append(f"aggregate {_tok_s(snap.aggregate_tps)} over {snap.rows} prompts")
    parts += [
        f"KV {kv_text(snap)}",
        f"RSS {format_bytes(snap.rss_bytes)}",
        f"CPU {_percent(snap.cpu_percent)}",
        f"GPU {_percent(snap.gpu_percent)}",
        f"NPU {_percent(snap.npu_percent)}",
        f"memory pressure {'n/a' if snap.pressure is None else format(snap.pressure, '.2f')} (0-1)",
        f"prefill on {snap.providers.get('prefill', 'n/a')}",
        f"decode on {snap.providers.get('decode', 'n/a')}",
        f"profile {snap.profile or 'default'}",
    ]
    if snap.finish_reason:
        parts.append(f"finish {snap.finish_reason}")
    return ", ".join(parts)
