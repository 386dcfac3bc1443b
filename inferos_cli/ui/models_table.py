"""Pure renderers for `inferos models` and `inferos pull`: a snapshot (plain dict) in, a rich Table / lines out.

Snapshots:

- models: ``{"models_dir": str, "models": [CachedModel.to_json()], "aliases": [{"name", "origin",
  "description", "params", "pulled"}]}``
- pull: ``{"name", "path", "action", "size_bytes", "dtype", "param_count", "architecture", "layers", "heads",
  "kv_heads", "head_dim", "vocab", "context", "source_format"}``
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from inferos_cli.units import format_bytes


def human_params(n: int | None) -> str:
    """``135.0 M params`` style count (``n/a`` when unknown)."""
    if not n:
        return "n/a"
    return f"{n / 1e9:.2f} B params" if n >= 1e9 else f"{n / 1e6:.1f} M params"


def models_table(snapshot: dict[str, Any]) -> Table:
    """The cached models, then the aliases one can pull."""
    table = Table(title=f"models in {snapshot['models_dir']}", title_justify="left")
    for col in ("name", "size", "dtype", "params", "arch", "status", "source"):
        table.add_column(col, overflow="fold")
    for m in snapshot["models"]:
        table.add_row(m["name"], format_bytes(m["size_bytes"]), str(m["dtype"] or "n/a"), human_params(m["param_count"]),
                      str(m["architecture"] or "n/a"), m["status"], str(m["source"] or ""))
    if not snapshot["models"]:
        table.add_row("(none)", "", "", "", "", "", "inferos pull smollm2-135m")
    return table


def aliases_table(snapshot: dict[str, Any]) -> Table:
    """The registry aliases and whether each is in the cache."""
    table = Table(title="aliases (inferos pull NAME)", title_justify="left")
    for col in ("alias", "params", "pulled", "from", "description"):
        table.add_column(col, overflow="fold")
    for a in snapshot["aliases"]:
        table.add_row(a["name"], a["params"] or "n/a", "yes" if a["pulled"] else "no", a["origin"], a["description"])
    return table


def models_lines(snapshot: dict[str, Any]) -> list[str]:
    """Tab-separated lines: one per cached model (size in bytes), then one per alias prefixed ``alias``."""
    lines = [f"{m['name']}\t{m['size_bytes']} B\t{m['dtype']}\t{m['param_count']}\t{m['status']}\t{m['path']}"
             for m in snapshot["models"]]
    lines += [f"alias\t{a['name']}\t{'pulled' if a['pulled'] else 'not pulled'}\t{a['origin']}" for a in snapshot["aliases"]]
    return lines


def pull_table(snapshot: dict[str, Any]) -> Table:
    """One model's facts after `inferos pull`."""
    table = Table(title=f"{snapshot['name']} ({snapshot['action']})", title_justify="left", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in pull_rows(snapshot):
        table.add_row(key, value)
    return table


def pull_rows(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value with unit) pairs shared by the table and the plain lines."""
    return [
        ("path", snapshot["path"]),
        ("format", snapshot["source_format"]),
        ("size", format_bytes(snapshot["size_bytes"])),
        ("dtype", str(snapshot["dtype"] or "n/a")),
        ("parameters", human_params(snapshot["param_count"])),
        ("architecture", f"{snapshot['architecture']}: {snapshot['layers']} layers, {snapshot['heads']} heads / "
                         f"{snapshot['kv_heads']} KV heads, head_dim {snapshot['head_dim']}"),
        ("vocabulary", f"{snapshot['vocab']} tokens"),
        ("context", f"{snapshot['context']} tokens"),
    ]


def pull_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain ``key<TAB>value`` lines of the pull result."""
    return [f"{snapshot['action']}\t{snapshot['name']}"] + [f"{k}\t{v}" for k, v in pull_rows(snapshot)]
