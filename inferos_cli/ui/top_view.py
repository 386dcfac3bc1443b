"""`inferos top`'s view: the numbers of the serve dashboard (``GET /dashboard``) for a terminal.

A :class:`Frame` is one reading of a server's control API (``/v1/metrics``, ``/v1/policy``, ``/v1/health``
and the tail of ``/v1/history``); :func:`kpis` turns it into the dashboard's cards, written the same way,
:func:`render` into a rich renderable and :func:`to_json` into plain data.

The change against the baseline follows the page's rule (:class:`BaselineTracker`): what ran in baseline mode
on this server against what ran with the current policy version, each reduced the same way (median, p95 or
peak); "no baseline measured" until both exist, never a comparison with a constant.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from rich.console import Group
from rich.table import Table
from rich.text import Text

from inferos_cli.events import percentile
from inferos_cli.units import format_bytes, format_value

#: Requests and samples kept for the baseline comparison; the RSS peak's window (seconds).
KEEP = 500
RSS_WINDOW_S = 300.0
DEVICES = ("cpu", "gpu", "npu")
#: Why a device's use is n/a: /v1/metrics gives null where the server's sampler has no counter for it.
UTIL_NA = "not measured: the server read no counter for it"


@dataclass
class Frame:
    """One reading of the control API."""

    url: str
    metrics: dict[str, Any]
    policy: dict[str, Any]
    health: dict[str, Any]
    history: list[dict[str, Any]]
    at: float = field(default_factory=time.time)


@dataclass
class Kpi:
    """One card: its name, value, a detail line and the change against the baseline (or why there is none)."""

    name: str
    value: str
    detail: str = ""
    change: str = ""
    better: str = ""  # "higher", "lower" or "" (no direction)
    delta_pct: float | None = None


def median(values: list[float]) -> float | None:
    """The p50 of :func:`percentile`."""
    return percentile(values, 50)


def peak(values: list[float]) -> float | None:
    """The largest value, None for none."""
    return max(values) if values else None


@dataclass
class Comparison:
    """A change against the baseline, or ``note`` saying why there is none."""

    note: str = ""
    current: float | None = None
    baseline: float | None = None
    counts: tuple[int, int] = (0, 0)

    @property
    def change_pct(self) -> float | None:
        """(current - baseline) / baseline in percent."""
        if self.note or self.current is None or not self.baseline:
            return None
        return (self.current - self.baseline) / self.baseline * 100.0


class BaselineTracker:
    """Finished requests (``last_request`` of each reading) and device samples, with their baseline flag and
    policy version, for the change against the baseline."""

    def __init__(self) -> None:
        self.requests: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.samples: deque[dict[str, Any]] = deque(maxlen=KEEP)

    def observe(self, metrics: dict[str, Any]) -> None:
        """Take one ``/v1/metrics`` document."""
        last = metrics.get("last_request")
        if last and last.get("error") is None and last["id"] not in self.requests:
            kv = last.get("kv") or {}
            ttft = last.get("ttft_s")
            self.requests[last["id"]] = {"baseline": last["baseline"], "version": last["policy_version"],
                                         "tps": last.get("decode_tps"), "kv": kv.get("total_bytes"),
                                         "ttft": None if ttft is None else ttft * 1000.0}
            while len(self.requests) > KEEP:
                self.requests.popitem(last=False)
        self.samples.append({"baseline": metrics["baseline_mode"], "version": metrics["policy_version"],
                             **metrics.get("util", {})})


def compare(items: list[dict[str, Any]], key: str, reduce: Callable[[list[float]], float | None],
            metrics: dict[str, Any], unit: str) -> Comparison:
    """Baseline-mode items against current-policy items, both reduced by ``reduce``."""
    base = [i[key] for i in items if i.get("baseline") and i.get(key) is not None]
    version = metrics["policy_version"]
    cur = [i[key] for i in items if not i.get("baseline") and i.get("version") == version and i.get(key) is not None]
    if not base:
        return Comparison("no baseline measured yet: turn baseline mode on and send requests")
    if metrics["baseline_mode"]:
        return Comparison(f"baseline mode on: measuring the baseline ({len(base)} {unit})")
    if not cur:
        return Comparison(f"baseline measured; waiting for {unit} with policy v{version}")
    b, c = reduce(base), reduce(cur)
    if not b:
        return Comparison("baseline value is 0: no ratio")
    return Comparison(current=c, baseline=b, counts=(len(cur), len(base)))


def change_text(cmp: Comparison, fmt: Callable[[float | None], str], unit: str) -> str:
    """``+12.3 % vs baseline (cur vs base; n vs m unit)`` or the reason there is no change."""
    pct = cmp.change_pct
    if pct is None:
        return cmp.note or "no ratio"
    return (f"{pct:+.1f} % vs baseline ({fmt(cmp.current)} vs {fmt(cmp.baseline)}; "
            f"{cmp.counts[0]} vs {cmp.counts[1]} {unit})")


def _gb(value: float | None) -> str:
    return format_bytes(None if value is None else value * 1e9)


def _rate(value: float | None) -> str:
    return format_value(value, ".1f")


def _ms(value: float | None) -> str:
    return format_value(value, ".1f", " ms")


def _pct(value: float | None) -> str:
    return format_value(value, ".1f", " %")


def kpis(frame: Frame, tracker: BaselineTracker) -> list[Kpi]:
    """The dashboard's cards for one frame."""
    m = frame.metrics
    reqs = list(tracker.requests.values())
    out: list[Kpi] = []

    def card(name: str, value: str, detail: str, cmp: Comparison | None, fmt: Callable[[float | None], str],
             unit: str, better: str) -> None:
        text = change_text(cmp, fmt, unit) if cmp is not None else "load, not a result: no baseline comparison"
        out.append(Kpi(name, value, detail, text, better, cmp.change_pct if cmp is not None else None))

    card("decode tok/s", format_value(m["tps"], ".1f", " tok/s"),
         f"all requests together: {format_value(m['tps_aggregate'], '.1f', ' tok/s')} (last 10 s)",
         compare(reqs, "tps", median, m, "requests"), _rate, "requests seen", "higher")
    card("TTFT p50 / p95", f"{_ms(m['ftl_ms'])} / {_ms(m['p95_ms'])}", "time to first token over the recent requests",
         compare(reqs, "ttft", median, m, "requests"), _ms, "requests seen, p50", "lower")
    r = m["requests"]
    card("in flight / queued", f"{r['active']} / {r['queued']}", f"{r['completed']} completed, {r['failed']} failed",
         None, _ms, "", "")
    newest = max((h["t"] for h in frame.history), default=frame.at)
    snaps = [h for h in frame.history if h.get("type") == "metrics"]
    in_window = [h["rss_gb"] for h in snaps if h["t"] >= newest - RSS_WINDOW_S and h.get("rss_gb") is not None]
    rss_items = [{"baseline": h["baseline_mode"], "version": h["policy_version"], "rss": h["rss_gb"]} for h in snaps]
    now_rss = m["mem"]["rss_gb"]
    card("peak RSS", _gb(peak(in_window + ([now_rss] if now_rss is not None else []))),
         f"now {_gb(now_rss)}; VRAM {_gb(m['mem']['vram_gb'])}",
         compare(rss_items, "rss", peak, m, "samples"), _gb, "samples, peak", "lower")
    kv_mb = m["mem"]["kv_mb"]
    ratio = m["mem"]["kv_ratio_vs_fp16"]
    card("KV held", format_bytes(None if kv_mb is None else kv_mb * 1e6),
         "vs fp16: n/a (no request yet)" if ratio is None else f"{ratio:.3f} × the fp16 size",
         compare(reqs, "kv", median, m, "requests"), format_bytes, "requests seen", "lower")
    q = m["quality"]
    est = q["delta_ppl_est"]
    source = (f"n/a: no estimate (the auto-tuner, serve --auto-tune, measures it); budget {q['max_delta_ppl']}"
              if est is None else f"{q.get('source') or 'auto-tuner'}; budget {q['max_delta_ppl']}")
    out.append(Kpi("quality delta-PPL", format_value(est, ".3f"), source,
                   "delta-PPL is itself the change against the baseline cache"))
    samples = list(tracker.samples)
    for dev in DEVICES:
        value = m["util"].get(dev)
        reason = "" if value is not None else UTIL_NA
        card(f"{dev.upper()} use", _pct(value), reason,
             compare(samples, dev, median, m, "samples"), _pct, "samples, median", "lower")
    return out


def policy_rows(frame: Frame) -> list[tuple[str, str]]:
    """The active policy as (name, value) rows, as the page shows it."""
    doc = frame.policy
    p, eff = doc["policy"], doc["effective"]
    kv, th, sched = p["kv"], p["kv"]["level_thresholds"], p["scheduler"]
    providers = ", ".join(f"{k}: {v}" for k, v in (frame.metrics.get("provider") or {}).items())
    return [
        ("profile", frame.health.get("profile") or "(none: defaults)"),
        ("model", str(frame.health.get("model"))),
        ("baseline mode", f"on (requests run with KV mode {eff['kv']['mode']})" if doc["baseline_mode"] else "off"),
        ("KV mode / preset", f"{kv['mode']} / {kv['quant']}"),
        ("recent window / sinks", f"{kv['recent_window']} / {kv['sink_tokens']} tokens"),
        ("thresholds", f"L1 int8 {th['L1_int8']} · L2 int4 {th['L2_int4']} · L3 evict {th['L3_evict']}"),
        ("max delta-PPL", str(p["quality"]["max_delta_ppl"])),
        ("devices", f"{sched['mode']}: prefill {sched['prefill_device']} · decode {sched['decode_device']}"),
        ("providers in use", providers or "n/a (no request yet)"),
        ("policy version", str(doc["version"])),
    ]


def decisions(frame: Frame, count: int = 5) -> list[str]:
    """The latest decisions (policy changes, baseline toggles, auto-tuner steps), newest first."""
    items = [h for h in frame.history if h.get("type") == "decision"][-count:]
    return [f"{time.strftime('%H:%M:%S', time.localtime(h['t']))} {h['kind']}: {h['reason']}" for h in reversed(items)]


def render(frame: Frame, tracker: BaselineTracker, error: str | None = None) -> Group:
    """The live view: a header, the KPI table, the policy and the latest decisions."""
    stamp = time.strftime("%H:%M:%S", time.localtime(frame.at))
    header = Text.assemble(("inferos top ", "bold"), f"{frame.url} · {frame.health.get('model')} · {stamp}")
    if error:
        header.append(f"\n{error}", style="bold red")
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for column in ("KPI", "value", "detail", "vs baseline"):
        table.add_column(column, overflow="fold")
    for k in kpis(frame, tracker):
        style = ""
        if k.delta_pct is not None and k.better and abs(k.delta_pct) >= 0.05:
            style = "green" if (k.delta_pct > 0) == (k.better == "higher") else "red"
        table.add_row(k.name, Text(k.value, style="bold"), Text(k.detail, style="dim"), Text(k.change, style=style))
    pol = Table(box=None, show_header=False, pad_edge=False)
    pol.add_column(style="dim")
    pol.add_column(overflow="fold")
    for name, value in policy_rows(frame):
        pol.add_row(name, value)
    parts: list[Any] = [header, table, Text("active policy", style="bold"), pol]
    latest = decisions(frame)
    if latest:
        parts += [Text("decisions", style="bold"), Text("\n".join(latest), style="dim")]
    return Group(*parts)


def lines(frame: Frame, tracker: BaselineTracker) -> list[str]:
    """Plain lines (pipes and files): one per KPI, then the policy."""
    out = [f"inferos top {frame.url} · {frame.health.get('model')}"]
    out += [f"{k.name}: {k.value}" + (f" ({k.detail})" if k.detail else "") + f"; {k.change}" for k in kpis(frame, tracker)]
    out += [f"{name}: {value}" for name, value in policy_rows(frame)]
    return out


def to_json(frame: Frame, tracker: BaselineTracker) -> dict[str, Any]:
    """Plain data: the KPIs as shown, and the server's documents they were read from."""
    return {
        "url": frame.url, "at": frame.at,
        "kpis": [{"name": k.name, "value": k.value, "detail": k.detail, "vs_baseline": k.change,
                  "vs_baseline_pct": k.delta_pct} for k in kpis(frame, tracker)],
        "metrics": frame.metrics, "policy": frame.policy, "health": frame.health,
        "decisions": decisions(frame),
    }
