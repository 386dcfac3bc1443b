"""`inferos top`: the serve dashboard's numbers in a terminal (for SSH sessions), read from a running
`inferos serve` through its control API, every ``--interval`` seconds."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

import typer

from inferos_cli.options import FormatOpt, TableFormat

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.ui.top_view import BaselineTracker, Frame

#: Where `inferos serve` listens by default (its --host and --port defaults).
DEFAULT_URL = "http://127.0.0.1:7031"
#: History entries read per refresh: the RSS peak's window at serve's one snapshot a second.
HISTORY_TAIL = 300
TIMEOUT_S = 5.0


def read_frame(url: str) -> "Frame":
    """One reading of the control API at ``url``; a one-line error when nothing (or not inferos) answers."""
    from inferos_cli.backends.lemonade import ServerHTTPError, get_json
    from inferos_cli.errors import BackendError
    from inferos_cli.server.security import TOKEN_ENV
    from inferos_cli.ui.top_view import Frame

    def read(path: str) -> dict[str, Any]:
        try:
            return get_json(url + path, timeout=TIMEOUT_S)
        except ServerHTTPError as exc:
            if exc.status == 401:
                raise BackendError(f"{url} needs the agent token", f"set {TOKEN_ENV} to the server's token") from None
            raise BackendError(f"{url}{path} answered {exc.status}: {exc.detail}",
                               "is an `inferos serve` listening there?") from None
        except BackendError as exc:
            reason = exc.message.split(": ", 1)[-1]
            raise BackendError(f"nothing answers at {url} ({reason})", "start it with `inferos serve` or pass --url") from None

    return Frame(url=url, metrics=read("/v1/metrics"), policy=read("/v1/policy"), health=read("/v1/health"),
                 history=read(f"/v1/history?limit={HISTORY_TAIL}")["items"])


def top(
    url: Annotated[Optional[str], typer.Option("--url", help=f"The server (default {DEFAULT_URL}, where `inferos serve` listens).", show_default=False)] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between readings.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one reading and exit.")] = False,
    fmt: FormatOpt = TableFormat.table,
) -> None:
    """Watch a running `inferos serve`: decode tok/s, TTFT, requests, RSS, KV, quality and device use,
    each with its change against the baseline measured on that server; the active policy; its decisions.

    Example: inferos top --url http://127.0.0.1:7031 --interval 2
    """
    import json

    from inferos_cli.ui.output import is_terminal, print_json
    from inferos_cli.ui.top_view import BaselineTracker, lines, to_json

    base = (url or DEFAULT_URL).strip().rstrip("/")
    if "://" not in base:
        base = "http://" + base
    tracker = BaselineTracker()
    frame = read_frame(base)  # the first reading must work: a clear error and exit 1 otherwise
    tracker.observe(frame.metrics)
    if once:
        if fmt == TableFormat.json:
            print_json(to_json(frame, tracker))
        else:
            for line in lines(frame, tracker):
                typer.echo(line)
        return
    if fmt == TableFormat.table and is_terminal():
        watch(base, frame, tracker, interval)
        return
    try:  # pipes and files: JSON lines, or blocks of plain lines, one per reading
        for shown, error in readings(base, frame, tracker, interval):
            if fmt == TableFormat.json:
                typer.echo(json.dumps({**to_json(shown, tracker), "error": error}, default=str))
            else:
                typer.echo("\n".join(lines(shown, tracker) + ([f"error: {error}"] if error else [])) + "\n")
    except KeyboardInterrupt:
        return


def readings(url: str, frame: "Frame", tracker: "BaselineTracker", interval: float) -> Iterator[tuple["Frame", str | None]]:
    """``frame``, then a new reading every ``interval`` seconds; one that fails repeats the last frame with
    the error (the server may be restarting)."""
    from inferos_cli.errors import InferosError

    yield frame, None
    while True:
        time.sleep(interval)
        try:
            frame = read_frame(url)
            tracker.observe(frame.metrics)
            yield frame, None
        except InferosError as exc:
            yield frame, f"{exc.one_line()}; retrying every {interval:g} s"


def watch(url: str, frame: "Frame", tracker: "BaselineTracker", interval: float) -> None:
    """The rich live view until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    from inferos_cli.ui.top_view import render

    try:
        with Live(render(frame, tracker), console=Console(), auto_refresh=False) as live:
            for shown, error in readings(url, frame, tracker, interval):
                live.update(render(shown, tracker, error), refresh=True)
    except KeyboardInterrupt:
        return
