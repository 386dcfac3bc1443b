"""Pure renderers for ``inferos bench``: the result snapshot (``BenchResult.to_json()``) in, a rich Table,
plain lines, Markdown, CSV or JSON lines out. Every printed number carries its unit; rows other than the
reference config show ``(xR)``: their mean divided by the reference's mean in the same cell."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rich.table import Table
from rich.text import Text

from inferos_cli.units import GiB, MiB

# (metric, column header with unit, format of one value)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ttft_ms", "TTFT ms", "{:.1f}"),
    ("prefill_tps", "prefill tok/s", "{:.0f}"),
    ("decode_tps", "decode tok/s", "{:.1f}"),
    ("e2e_ms", "e2e ms", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MiB", "{:.1f}"),
    ("kv_bytes", "KV MiB", "{:.2f}"),
    ("kv_ratio_vs_fp16", "KV/fp16 x", "{:.2f}"),
)
QUALITY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ppl", "PPL", "{:.3f}"),
    ("delta_ppl", "delta PPL", "{:+.3f}"),
    ("kl_mean", "KL mean nats", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
)


def display_value(metric: str, value: float | None) -> float | None:
    """A metric in the unit its column shows (``kv_bytes`` in MiB; the others as measured)."""
    if value is None:
        return None
    return value / MiB if metric == "kv_bytes" else value


def fmt_stat(metric: str, stat: dict[str, Any], fmt: str) -> str:
    """``mean ± sd`` of a metric (``n/a`` when nothing was measured)."""
    mean = display_value(metric, stat.get("mean"))
    if mean is None:
        return "n/a"
    sd = display_value(metric, stat.get("sd"))
    text = fmt.format(mean)
    if sd is not None and stat.get("n", 0) > 1:
        text += " ± " + fmt.format(sd).lstrip("+")
    return text


def fmt_ratio(value: float | None) -> str:
    """``(x1.02)`` or empty."""
    return f" (x{value:.2f})" if value is not None else ""


def providers_text(providers: dict[str, str]) -> str:
    """One phase label when both phases match, else ``prefill: A; decode: B``."""
    if not providers:
        return "n/a"
    pre, dec = providers.get("prefill"), providers.get("decode")
    if pre == dec:
        return str(pre)
    return f"prefill: {pre}; decode: {dec}"


def short_providers(providers: dict[str, str]) -> str:
    """``cpu*`` style: the device each phase really ran on, ``*`` marking a fallback, ``prefill/decode``
    when they differ. The full labels are listed under the table."""
    def short(label: str | None) -> str:
        if not label:
            return "n/a"
        final = label.split("->")[-1].split("(")[0].strip() or label
        return final + ("*" if "->" in label else "")

    pre, dec = short(providers.get("prefill")), short(providers.get("decode"))
    return pre if pre == dec else f"{pre}/{dec}"


def provider_notes(snapshot: dict[str, Any]) -> list[str]:
    """``providers baseline: <full labels>`` once per config (``*`` = fallback, with the reason)."""
    seen: dict[str, str] = {}
    for row in snapshot["rows"]:
        if row["status"] == "ok" and row["providers"] and row["config"] not in seen:
            seen[row["config"]] = providers_text(row["providers"])
    return [f"providers {name}: {text}" for name, text in seen.items()]


def cell_texts(row: dict[str, Any], sep: str = " ") -> list[str]:
    """The metric columns of one row as text (values with ratios, or the skip/error reason)."""
    if row["status"] != "ok":
        return ["n/a"] * len(COLUMNS)
    ratios = row.get("ratios") or {}
    out = []
    for m, _, f in COLUMNS:
        r = fmt_ratio(ratios.get(m)).strip()
        out.append(fmt_stat(m, row["metrics"][m], f) + (sep + r if r else ""))
    return out


def title(snapshot: dict[str, Any]) -> str:
    """``inferos bench: MODEL, gen 64 tokens, 3 repeats (+1 warmup), ratios vs baseline``."""
    grid = snapshot["grid"]
    model = (snapshot["host"].get("model") or {}).get("name", "?")
    ref = snapshot.get("reference")
    partial = "" if snapshot.get("complete", True) else " [PARTIAL: interrupted or still running]"
    return (f"inferos bench: {model}, {grid['gen_tokens']} generated tokens, {grid['repeats']} repeats "
            f"(+{grid['warmup']} warmup), mean ± sd" + (f", (xR) = ratio vs {ref}" if ref else "") + partial)


def host_line(snapshot: dict[str, Any]) -> str:
    """One line describing the machine and software."""
    h = snapshot["host"]
    ram = f"{h['ram_bytes'] / GiB:.1f} GiB RAM" if h.get("ram_bytes") else "RAM n/a"
    return (f"{snapshot.get('started', '')} | {h.get('cpu') or 'CPU n/a'} | {h.get('cores_physical')} physical / "
            f"{h.get('cores_logical')} logical cores | {ram} | {h.get('os')} | onnxruntime {h.get('onnxruntime')}"
            f" | onnxruntime-genai {h.get('onnxruntime_genai') or 'n/a'} | inferos {h.get('inferos')}"
            f" | load avg {h.get('load_avg_1_5_15')}")


def skip_lines(snapshot: dict[str, Any]) -> list[str]:
    """``skipped ort-genai: reason`` for every config that could not run."""
    return [f"skipped {s['config']}: {s['reason']}" for s in snapshot.get("skipped", [])]


COMPACT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ttft_ms", "TTFT\nms", "{:.1f}"),
    ("prefill_tps", "prefill\ntok/s", "{:.0f}"),
    ("decode_tps", "decode\ntok/s", "{:.1f}"),
    ("peak_rss_mb", "RSS\nMiB", "{:.0f}"),
    ("kv_bytes", "KV\nMiB", "{:.2f}"),
)


def compact_table(snapshot: dict[str, Any]) -> Table:
    """The comparison for narrow terminals (~80 columns): cell as ``BxSEQ``, five metrics, each value as
    mean / ±sd / xratio on its own line; e2e, KV/fp16 and full device labels are in the caption / JSON."""
    from rich import box

    caption = "\n".join([host_line(snapshot), *provider_notes(snapshot), "e2e ms and KV/fp16: --format md or json"])
    table = Table(title=title(snapshot), title_justify="left", caption=caption, caption_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("batch\nx seq", no_wrap=True)
    table.add_column("config", no_wrap=True)
    for _, header, _ in COMPACT_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("dev", no_wrap=False)
    previous = None
    for row in snapshot["rows"]:
        key = (row["batch"], row["seq"])
        name = Text(row["config"], style="bold" if row["config"] == snapshot.get("reference") else "")
        label = f"{row['batch']}x{row['seq']}" if key != previous else ""
        if row["status"] != "ok":
            table.add_row(label, name, *(["n/a"] * len(COMPACT_COLUMNS)), Text(short_reason(row, 80), style="dim"))
        else:
            ratios = row.get("ratios") or {}
            cells = []
            for m, _, f in COMPACT_COLUMNS:
                stat = row["metrics"][m]
                text = fmt_stat(m, stat, f).replace(" ± ", "\n±")
                r = ratios.get(m)
                cells.append(text + (f"\nx{r:.2f}" if r is not None else ""))
            table.add_row(label, name, *cells, short_providers(row["providers"]))
        previous = key
    return table


def bench_table(snapshot: dict[str, Any], *, width: int | None = None) -> Table:
    """The comparison as a rich Table: one row per (batch, seq, config); :func:`compact_table` when the
    terminal is narrower than 150 columns."""
    if width is not None and width < 150:
        return compact_table(snapshot)
    caption = "\n".join([host_line(snapshot), *provider_notes(snapshot)])
    table = Table(title=title(snapshot), title_justify="left", caption=caption, caption_justify="left")
    table.add_column("batch", justify="right", no_wrap=True)
    table.add_column("seq tok", justify="right", no_wrap=True)
    table.add_column("config", no_wrap=True)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("device / note", overflow="fold")
    previous = None
    for row in snapshot["rows"]:
        key = (row["batch"], row["seq"])
        texts = cell_texts(row, sep="\n")
        note = short_providers(row["providers"]) if row["status"] == "ok" else short_reason(row)
        style = "" if row["status"] == "ok" else "dim"
        table.add_row(
            str(row["batch"]) if key != previous else "", str(row["seq"]) if key != previous else "",
            Text(row["config"], style="bold" if row["config"] == snapshot.get("reference") else ""),
            *texts, Text(note, style=style), end_section=bool(snapshot["rows"]) and row is not snapshot["rows"][-1]
            and _next_key(snapshot, row) != key,
        )
        previous = key
    return table


def _next_key(snapshot: dict[str, Any], row: dict[str, Any]) -> tuple[int, int] | None:
    rows = snapshot["rows"]
    i = next(i for i, r in enumerate(rows) if r is row)
    return (rows[i + 1]["batch"], rows[i + 1]["seq"]) if i + 1 < len(rows) else None


def quality_table(snapshot: dict[str, Any]) -> Table | None:
    """``--quality`` numbers per config, or None when quality was not asked for."""
    quality = snapshot.get("quality") or {}
    if not quality:
        return None
    table = Table(title="quality vs baseline (eval machinery, same text)", title_justify="left")
    table.add_column("config", no_wrap=True)
    for _, header, _ in QUALITY_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("note", overflow="fold")
    for name, q in quality.items():
        table.add_row(name, *quality_texts(q), q.get("reason") or "")
    return table


def quality_texts(q: dict[str, Any]) -> list[str]:
    """The quality columns of one config as text."""
    return ["n/a" if q.get(m) is None else f.format(q[m]) for m, _, f in QUALITY_COLUMNS]


def bench_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain lines for pipes: a title, the host, one line per row, quality, skips."""
    lines = [title(snapshot), host_line(snapshot)]
    for row in snapshot["rows"]:
        head = f"batch {row['batch']} seq {row['seq']} tok {row['config']}:"
        if row["status"] != "ok":
            lines.append(f"{head} {row['status']}: {row['reason']}")
            continue
        parts = [f"{header} {text}" for (_, header, _), text in zip(COLUMNS, cell_texts(row))]
        lines.append(f"{head} " + ", ".join(parts) + f", providers {providers_text(row['providers'])}")
    for name, q in (snapshot.get("quality") or {}).items():
        parts = [f"{header} {text}" for (_, header, _), text in zip(QUALITY_COLUMNS, quality_texts(q))]
        lines.append(f"quality {name}: " + ", ".join(parts) + (f" ({q['reason']})" if q.get("reason") else ""))
    lines.extend(skip_lines(snapshot))
    return lines


def short_reason(row: dict[str, Any], limit: int = 160) -> str:
    """``status: reason`` cut to ``limit`` characters, start and end kept, for tables (the JSON keeps it all)."""
    text = f"{row['status']}: {row['reason']}"
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " ... " + text[-(limit - head - 5):]  # keep the start and the cause at the end


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def bench_markdown(snapshot: dict[str, Any]) -> str:
    """Paste-ready GitHub Markdown: a heading line, the host, the table, quality and skips."""
    out = [f"**{_md_escape(title(snapshot))}**", "", f"Host: {_md_escape(host_line(snapshot))}", ""]
    headers = ["batch", "seq tok", "config", *(h for _, h, _ in COLUMNS), "device / note"]
    out.append("| " + " | ".join(headers) + " |")
    out.append("|" + "|".join("---:" if i < 2 or 2 < i < 3 + len(COLUMNS) else "---" for i in range(len(headers))) + "|")
    for row in snapshot["rows"]:
        note = short_providers(row["providers"]) if row["status"] == "ok" else short_reason(row)
        cells = [str(row["batch"]), str(row["seq"]), row["config"], *cell_texts(row), note]
        out.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    notes = provider_notes(snapshot)
    if notes:
        out += ["", "Devices (`*` = fallback):"] + [f"- {_md_escape(n)}" for n in notes]
    quality = snapshot.get("quality") or {}
    if quality:
        out += ["", "| config | " + " | ".join(h for _, h, _ in QUALITY_COLUMNS) + " | note |",
                "|---|" + "---:|" * len(QUALITY_COLUMNS) + "---|"]
        for name, q in quality.items():
            out.append("| " + " | ".join([name, *quality_texts(q), _md_escape(q.get("reason") or "")]) + " |")
    skips = skip_lines(snapshot)
    if skips:
        out += [""] + [f"- {_md_escape(s)}" for s in skips]
    return "\n".join(out) + "\n"


CSV_FIELDS_HEAD = ("batch", "seq", "gen_tokens", "config", "status", "reason")


def bench_csv(snapshot: dict[str, Any]) -> str:
    """One CSV row per (batch, seq, config): mean, sd, n and ratio of every metric, providers, samples."""
    from inferos_cli.bench.grid import METRICS

    fields = list(CSV_FIELDS_HEAD)
    for m in METRICS:
        fields += [f"{m}_mean", f"{m}_sd", f"{m}_n", f"{m}_ratio"]
    fields += ["ratio_vs", "prefill_provider", "decode_provider", "kv_backend", "samples_json"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in snapshot["rows"]:
        rec: dict[str, Any] = {k: row.get(k) for k in CSV_FIELDS_HEAD}
        for m in METRICS:
            stat = row["metrics"][m]
            rec[f"{m}_mean"], rec[f"{m}_sd"], rec[f"{m}_n"] = stat["mean"], stat["sd"], stat["n"]
            rec[f"{m}_ratio"] = (row.get("ratios") or {}).get(m)
        rec["ratio_vs"] = row.get("ratio_vs")
        rec["prefill_provider"] = row["providers"].get("prefill")
        rec["decode_provider"] = row["providers"].get("decode")
        rec["kv_backend"] = row.get("kv_backend")
        rec["samples_json"] = json.dumps({m: row["metrics"][m]["samples"] for m in METRICS})
        writer.writerow(rec)
    return buf.getvalue()


def bench_jsonl(snapshot: dict[str, Any]) -> str:
    """JSON lines: a ``run`` record (everything but the rows), then one ``row`` record per row."""
    head = {k: v for k, v in snapshot.items() if k != "rows"}
    lines = [json.dumps({"type": "run", **head}, default=str)]
    lines += [json.dumps({"type": "row", **row}, default=str) for row in snapshot["rows"]]
    return "\n".join(lines) + "\n"


def bench_json(snapshot: dict[str, Any]) -> str:
    """The whole snapshot as indented JSON."""
    return json.dumps(snapshot, indent=2, default=str) + "\n"


def render_text(snapshot: dict[str, Any], fmt: str) -> str:
    """The snapshot as text in one of ``json jsonl csv md table`` (``table``: the plain lines)."""
    if fmt == "json":
        return bench_json(snapshot)
    if fmt == "jsonl":
        return bench_jsonl(snapshot)
    if fmt == "csv":
        return bench_csv(snapshot)
    if fmt == "md":
        return bench_markdown(snapshot)
    return "\n".join(bench_lines(snapshot)) + "\n"
