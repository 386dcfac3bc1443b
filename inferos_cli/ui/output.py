"""Printing helpers shared by commands: a rich table on a terminal, plain lines in pipes, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

import typer
from rich.console import Console
from rich.table import Table


def is_terminal() -> bool:
    """True when stdout is an interactive terminal (tables), False for pipes and files (plain lines)."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def print_json(data: Any) -> None:
    """Pretty JSON on stdout."""
    typer.echo(json.dumps(data, indent=2, default=str))


def print_table(table: Table, lines: Iterable[str]) -> None:
    """``table`` on a terminal, else ``lines`` one per line."""
    if is_terminal():
        Console().print(table)
    else:
        for line in lines:
            typer.echo(line)
