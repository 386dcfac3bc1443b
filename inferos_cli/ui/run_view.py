"""How ``inferos run`` shows an event stream: a rich Live table on a terminal, plain text in pipes, JSON
lines for scripts. No timing here: every number comes from the engine's events or the telemetry sampler.

- ``live``: generated text streams above a table refreshed at most 10 times a second (completed lines
  are printed above the live area, the current line sits on top of the table).
- ``plain``: the text as it streams; the summary line is the caller's (it goes to stderr).
- ``json``: one ``Event.to_json()`` object per line.

Ctrl-C while consuming closes the event stream (the engine stops at the next step), marks the snapshot
``interrupted`` and returns normally, so the caller can print the summary.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Iterator, Literal, TextIO

from rich.console import Console, Group
from rich.text import Text

from inferos_cli.events import Event
from inferos_cli.ui.run_table import RunSnapshot, run_table

Mode = Literal["live", "plain", "json"]
REFRESH_PER_SECOND = 10


def consume(
    events: Iterator[Event],
    snap: RunSnapshot,
    mode: Mode,
    *,
    console: Console | None = None,
    out: TextIO | None = None,
    telemetry: Callable[[], dict[str, Any]] | None = None,
    stream_text: bool = True,
) -> dict[int, str]:
    """Drive ``events`` to the end (or Ctrl-C), updating ``snap`` and showing it per ``mode``.

    Returns the text generated per row (``Event.seq``). ``stream_text`` False holds the text back (batch
    runs, where rows interleave) for the caller to print at the end."""
    out = out or sys.stdout
    texts: dict[int, list[str]] = {}

    def fold(ev: Event) -> None:
        snap.update(ev)
        if ev.text:
            texts.setdefault(ev.seq, []).append(ev.text)

    try:
        if mode == "json":
            for ev in events:
                fold(ev)
                out.write(json.dumps(ev.to_json(), default=str) + "\n")
                out.flush()
        elif mode == "plain":
            for ev in events:
                fold(ev)
                if stream_text and ev.text:
                    out.write(ev.text)
                    out.flush()
            if stream_text:
                out.write("\n")
                out.flush()
        else:
            _live(events, snap, console or Console(), telemetry, stream_text, fold)
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close is not None:
            close()
        snap.finish_reason = "interrupted"
        if mode == "json":  # the stream was cut before its done event: close it with one
            last = Event(kind="done", t=time.perf_counter(), prompt_tokens=snap.prompt_tokens,
                         generated=snap.generated, ttft_s=snap.ttft_s, prefill_tps=snap.prefill_tps,
                         decode_tps=snap.decode_tps, rss_bytes=snap.rss_bytes, provider=dict(snap.providers),
                         finish_reason="interrupted")
            out.write(json.dumps(last.to_json(), default=str) + "\n")
            out.flush()
        if mode == "plain" and stream_text:
            out.write("\n")
            out.flush()
    return {seq: "".join(parts) for seq, parts in texts.items()}


def _live(
    events: Iterator[Event],
    snap: RunSnapshot,
    console: Console,
    telemetry: Callable[[], dict[str, Any]] | None,
    stream_text: bool,
    fold: Callable[[Event], None],
) -> None:
    from rich.live import Live

    line: list[str] = [""]  # the current, not yet completed line of streamed text

    def renderable() -> Any:
        if telemetry is not None:
            snap.update_telemetry(telemetry())
        table = run_table(snap)
        return Group(Text(line[0]), table) if stream_text and line[0] else table

    with Live(console=console, refresh_per_second=REFRESH_PER_SECOND, get_renderable=renderable,
              transient=False, redirect_stdout=False, redirect_stderr=False) as live:
        try:
            for ev in events:
                fold(ev)
                if stream_text and ev.text:
                    pieces = (line[0] + ev.text).split("\n")
                    for done in pieces[:-1]:
                        live.console.print(Text(done))
                    line[0] = pieces[-1]
        finally:
            if stream_text and line[0]:
                live.console.print(Text(line[0]))
                line[0] = ""
            live.refresh()
