"""Helpers over the engine's event stream, shared by the tests."""

from __future__ import annotations

from typing import Any, Iterable


def by_row(events: Iterable[Any]) -> dict[int, list[int]]:
    """Token ids per sequence (``seq``) from an event stream, in order."""
    rows: dict[int, list[int]] = {}
    for e in events:
        if e.kind == "token":
            rows.setdefault(e.seq, []).append(e.token_id)
    return rows
