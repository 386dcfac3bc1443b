"""Pure renderer for ``inferos doctor``: the report snapshot ``{"checks": [{name, status, detail, fix}]}``
in, a rich Table (or plain lines) out."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def doctor_table(snapshot: dict[str, Any]) -> Table:
    """One row per check: status, name, detail, fix."""
    table = Table(title="inferos doctor", title_justify="left")
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail", overflow="fold")
    table.add_column("fix", overflow="fold")
    for check in snapshot["checks"]:
        status = check["status"]
        table.add_row(  # Text, not markup: details hold brackets such as 'inferos[directml]'
            Text(status, style=STATUS_STYLE.get(status, "")), Text(check["name"]), Text(check["detail"]),
            Text(check["fix"]),
        )
    return table


def summary(snapshot: dict[str, Any]) -> str:
    """``12 ok, 5 warn, 0 fail: the CPU path works`` (or what does not)."""
    counts = {s: sum(1 for c in snapshot["checks"] if c["status"] == s) for s in ("ok", "warn", "fail")}
    verdict = "the CPU path works" if counts["fail"] == 0 else "something inferos needs does not work (see fail lines)"
    return f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail: {verdict}"


def doctor_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain lines (``STATUS  name: detail (fix: ...)``) for pipes and files."""
    lines = []
    for check in snapshot["checks"]:
        fix = f" (fix: {check['fix']})" if check["fix"] else ""
        lines.append(f"{check['status']:<4}  {check['name']}: {check['detail']}{fix}")
    lines.append(summary(snapshot))
    return lines
