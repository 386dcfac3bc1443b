"""Pure renderers for profiles and resolved policies: a snapshot (plain dict) in, a rich Table / text out.

Snapshots:

- profile list: ``{"profiles": [{"name", "kind", "description", "source"}]}``
- policy: ``{"profiles": [...], "config": str | None, "policy": {nested},
  "sources": {"kv.recent_window": "profile:7b"}}``
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from inferos_cli.settings import flatten

BYTE_KEYS = ("io.dml_pool_bytes", "io.host_pool_bytes", "kv.budget_bytes")


def profile_list_table(snapshot: dict[str, Any]) -> Table:
    """Table of the known profiles: name, kind, description, defining file."""
    table = Table(title="profiles", title_justify="left")
    for col in ("name", "kind", "description", "source"):
        table.add_column(col, overflow="fold")
    for row in snapshot["profiles"]:
        table.add_row(*(Text(row[k]) for k in ("name", "kind", "description", "source")))
    return table


def profile_list_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain, tab-separated lines of the profile list (for pipes and files)."""
    return [f"{r['name']}\t{r['kind']}\t{r['description']}\t{r['source']}" for r in snapshot["profiles"]]


def format_value(key: str, value: Any) -> str:
    """A leaf value as shown to people; byte sizes keep the exact count and add the unit."""
    if value is None:
        return "unset"
    if key in BYTE_KEYS and isinstance(value, int):
        from inferos_cli.units import format_bytes

        return f"{value} B ({format_bytes(value)})"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def policy_rows(snapshot: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(key, value, source)`` for every leaf of the policy, in model order."""
    sources = snapshot.get("sources", {})
    return [(k, format_value(k, v), sources.get(k, "default")) for k, v in flatten(snapshot["policy"]).items()]


def policy_title(snapshot: dict[str, Any]) -> str:
    """``policy: 3b (size class) + chat; config: PATH``."""
    names = snapshot.get("profiles") or []
    title = "policy: " + (" + ".join(names) if names else "defaults")
    if snapshot.get("config"):
        title += f"; config: {snapshot['config']}"
    return title


def policy_table(snapshot: dict[str, Any]) -> Table:
    """Table of the resolved policy: key, value, where the value came from."""
    table = Table(title=policy_title(snapshot), title_justify="left")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for key, value, source in policy_rows(snapshot):
        style = "dim" if source == "default" else None
        table.add_row(Text(key), Text(value), Text(source), style=style)
    return table


def policy_lines(snapshot: dict[str, Any]) -> list[str]:
    """Plain, tab-separated ``key value source`` lines (for pipes and files)."""
    return [f"# {policy_title(snapshot)}"] + [f"{k}\t{v}\t{s}" for k, v, s in policy_rows(snapshot)]


def policy_toml(snapshot: dict[str, Any]) -> str:
    """The resolved policy as TOML (loadable with ``--config``), each value commented with its source.

    Unset values (``None``) are left out: TOML has no null.
    """
    import tomli_w

    sources = snapshot.get("sources", {})
    text = tomli_w.dumps(_drop_none(snapshot["policy"]))
    out = [f"# {policy_title(snapshot)}", "# each value: its source (default / profile:NAME / config / env / flag)"]
    table = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            table = stripped.strip("[]")
            out.append(line)
            continue
        if "=" in line and not stripped.startswith("#"):
            key = line.split("=", 1)[0].strip().strip('"')
            source = sources.get(f"{table}.{key}" if table else key)
            if source:
                out.append(f"{line}  # {source}")
                continue
        out.append(line)
    return "\n".join(out) + "\n"


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in data.items() if v is not None}
