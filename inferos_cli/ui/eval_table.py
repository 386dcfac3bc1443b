"""Renderers of `inferos eval`: a report snapshot (``EvalReport.to_json()``) in, a rich Table / lines out;
and the plain progress lines written to stderr when it is not a terminal."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.table import Table

from inferos_cli.units import format_bytes, format_value


def eval_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    """Cells of each configuration row (shared by the table and the plain lines)."""
    rows = []
    for r in snapshot["results"]:
        rows.append([
            r["config"],
            format_value(r["ppl"], ".3f"),
            format_value(r["delta_ppl"], "+.4f"),
            format_value(r["kl_mean"], ".5f", " nats"),
            format_value(None if r["top1_agreement"] is None else 100 * r["top1_agreement"], ".2f", " %"),
            format_bytes(r["kv_bytes"]),
            format_bytes(r["kv_bytes_peak"]),
            format_value(r["kv_ratio_vs_fp16"], ".3f", "x"),
            format_value(r["peak_rss_mb"], ".1f", " MiB"),
            str(r["tokens_scored"]),
        ])
    return rows


HEADERS = ["config", "PPL", "ΔPPL", "KL mean", "top-1 agree", "KV mean", "KV peak", "KV vs fp16",
           "peak RSS", "tokens"]


def eval_table(snapshot: dict[str, Any]) -> Table:
    """The comparison table of one eval run."""
    table = Table(title=f"inferos eval: {snapshot['model']} on {snapshot['text']} "
                        f"(ctx {snapshot['ctx']} tokens, prefix {snapshot['prefix']}, "
                        f"{snapshot['tokens_scored']} tokens scored in {snapshot['windows']} windows)")
    for i, head in enumerate(HEADERS):
        table.add_column(head, justify="left" if i == 0 else "right")
    for row in eval_rows(snapshot):
        table.add_row(*row)
    notes = [f"{r['config']}: {r['kv']}" for r in snapshot["results"]]
    notes += [f"{r['config']}: {n}" for r in snapshot["results"] for n in r.get("notes", [])]
    notes.append(f"peak RSS: {snapshot.get('rss_note', '')}")
    notes.append(graph_note(snapshot))
    table.caption = "\n".join(notes)
    return table


def eval_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain lines for pipes: one ``key=value`` line per configuration."""
    lines = [(f"model={snapshot['model']} text={snapshot['text']} ctx={snapshot['ctx']} "
             f"prefix={snapshot['prefix']} tokens_scored={snapshot['tokens_scored']} windows={snapshot['windows']} "
             f"graph={snapshot.get('graph', '').replace(' ', '-')}")]
    keys = ["config", "ppl", "delta_ppl", "kl_mean", "top1_agreement", "kv_mean", "kv_peak", "kv_vs_fp16",
            "peak_rss", "tokens"]
    for row in eval_rows(snapshot):
        lines.append(" ".join(f"{k}={v.replace(' ', '')}" for k, v in zip(keys, row)))
    for r in snapshot["results"]:
        lines.append(f"kv[{r['config']}]={r['kv']}")
    return lines


def graph_note(snapshot: dict[str, Any]) -> str:
    """Which graph was scored, and the flag that scores the other one."""
    if snapshot.get("graph") == "exact-compute twin":
        how = ("float activations in every MatMulNBits" if snapshot.get("exact_matmul")
               else "the graph already computes in float")
        return f"graph: exact-compute twin ({how}; --as-shipped scores the graph as is)"
    return "graph: as shipped (--exact scores the exact-compute twin: float activations in every matmul)"


class ProgressLines:
    """Eval progress for a pipe or a log: one plain line on ``write`` at most every ``interval`` seconds
    while tokens are scored (tokens scored / total, tokens/s, time left), one when scoring ends, and one
    per peak-RSS probe. Called as ``progress(stage, done, total)`` (see ``quality.eval.Progress``)."""

    def __init__(self, write: Callable[[str], None], interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write = write
        self.interval = interval
        self.clock = clock
        self.start = clock()
        self.last = self.start

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage == "rss":
            if done < total:
                self.write(f"eval: peak RSS of configuration {done + 1}/{total} (a fresh process, one window)")
            return
        if done < total and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else None
        line = f"eval: {done}/{total} tokens scored ({100 * done / total:.0f}%)"
        if rate:
            line += f", {rate:.1f} tok/s"
        if done >= total:
            line += f", done in {elapsed:.0f} s"
        elif rate:
            line += f", about {(total - done) / rate:.0f} s left"
        self.write(line)
