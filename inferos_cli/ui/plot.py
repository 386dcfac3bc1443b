"""``inferos bench --plot FILE``: decode tokens/s, TTFT and memory against prompt length, one line per config
(error bars = sd over repeats), one row of panels per batch size. ``.png`` / ``.svg`` via matplotlib (the
``plot`` extra, imported lazily), ``.html`` = a self-contained page with the SVG inlined (no CDN, no script)."""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from inferos_cli import paths
from inferos_cli.errors import UsageError
from inferos_cli.ui.bench_table import bench_markdown, display_value, host_line, title

PANELS: tuple[tuple[str, str], ...] = (
    ("decode_tps", "decode tokens/s"),
    ("ttft_ms", "TTFT (ms)"),
    ("peak_rss_mb", "peak RSS (MiB)"),
    ("kv_bytes", "KV cache (MiB)"),
)
SUFFIXES = (".png", ".svg", ".html", ".htm")


def check_plot_path(path: Path) -> None:
    """Fail early (before measuring) on an unsupported suffix or a missing matplotlib."""
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--plot {path}: unknown image type {path.suffix or '(none)'}",
                         "use a .png, .svg or .html file name")
    _matplotlib()


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         "pip install 'inferos[plot]' (or drop --plot)") from None
    return matplotlib


def series(snapshot: dict[str, Any], batch: int, metric: str) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """``{config: (seq lengths, means, sds)}`` of one metric at one batch size (measured cells only)."""
    out: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for row in snapshot["rows"]:
        if row["batch"] != batch or row["status"] != "ok":
            continue
        stat = row["metrics"][metric]
        if stat["mean"] is None:
            continue
        xs, ys, sds = out.setdefault(row["config"], ([], [], []))
        xs.append(row["seq"])
        ys.append(display_value(metric, stat["mean"]))
        sds.append(display_value(metric, stat["sd"] or 0.0))
    return out


def figure(snapshot: dict[str, Any]) -> Any:
    """The matplotlib Figure (no pyplot global state)."""
    _matplotlib()
    from matplotlib.figure import Figure

    batches = sorted({r["batch"] for r in snapshot["rows"]})
    configs = [c["name"] for c in snapshot["configs"]]
    fig = Figure(figsize=(4.2 * len(PANELS), 3.2 * max(1, len(batches))), layout="constrained")
    axes = fig.subplots(max(1, len(batches)), len(PANELS), squeeze=False)
    colors = {name: f"C{i % 10}" for i, name in enumerate(configs)}
    markers = {name: "osD^vP*X"[i % 8] for i, name in enumerate(configs)}
    styles = {name: ("-", "--", ":", "-.")[i % 4] for i, name in enumerate(configs)}
    seqs = sorted({row["seq"] for row in snapshot["rows"]})
    for r, batch in enumerate(batches):
        for c, (metric, label) in enumerate(PANELS):
            ax = axes[r][c]
            data = series(snapshot, batch, metric)
            for name in configs:
                if name not in data:
                    continue
                xs, ys, sds = data[name]
                ax.errorbar(xs, ys, yerr=sds, marker=markers[name], linestyle=styles[name], capsize=3, label=name,
                            color=colors[name], alpha=0.85)
            if not data:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_title(f"{label}, batch {batch}", fontsize=10)
            ax.set_xlabel("prompt length (tokens)")
            ax.grid(True, alpha=0.3)
            if len(seqs) > 1 and seqs[-1] / seqs[0] >= 4:
                ax.set_xscale("log", base=2)  # 128, 512, 1024 evenly readable
            if seqs:
                ax.set_xticks(seqs)
                ax.set_xticklabels([str(s) for s in seqs])
                ax.minorticks_off()
            ax.set_ylim(bottom=0)
            if r == 0 and c == 0 and data:
                ax.legend(fontsize=8)
    model = (snapshot["host"].get("model") or {}).get("name", "?")
    fig.suptitle(f"inferos bench: {model}, {snapshot['grid']['gen_tokens']} generated tokens, "
                 f"mean ± sd over {snapshot['grid']['repeats']} repeats", fontsize=11)
    return fig


def render_bytes(snapshot: dict[str, Any], fmt: str) -> bytes:
    """The plot as ``png`` / ``svg`` bytes, or a self-contained ``html`` page."""
    fig = figure(snapshot)
    buf = io.BytesIO()
    fig.savefig(buf, format="png" if fmt == "png" else "svg", dpi=110)
    if fmt != "html":
        return buf.getvalue()
    svg = buf.getvalue().decode("utf-8")
    svg = svg[svg.find("<svg"):]  # drop the XML prolog and doctype for inlining
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title(snapshot))}</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em}pre{font-size:12px;overflow-x:auto}</style>"
        f"</head><body><h1>{html.escape(title(snapshot))}</h1><p>{html.escape(host_line(snapshot))}</p>\n"
        f"{svg}\n<h2>Table (Markdown)</h2><pre>{html.escape(bench_markdown(snapshot))}</pre></body></html>\n"
    )
    return page.encode("utf-8")


def write_plot(snapshot: dict[str, Any], path: Path) -> Path:
    """Write the plot atomically; the format follows the suffix."""
    suffix = path.suffix.lower()
    check_plot_path(path)
    fmt = {".png": "png", ".svg": "svg"}.get(suffix, "html")
    paths.atomic_write_bytes(path, render_bytes(snapshot, fmt))
    return path
