"""The starter ``config.toml`` that ``inferos config init`` writes: every key, commented out, with its
default, what it accepts and what it does. Values are rendered with tomli-w so they are valid TOML once
uncommented. Everything is commented on purpose: an active value in the config file beats every profile,
so a starter file full of defaults would silently switch profiles off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from inferos_cli import paths
from inferos_cli.errors import InferosError
from inferos_cli.settings import Policy, allowed_values
from inferos_cli.units import format_bytes

HEADER = """\
# inferos configuration, written by `inferos config init`.
#
# Precedence (later wins): defaults < profiles (model size class first, then --profile / `profile` below)
# < this file < environment INFEROS_SECTION__KEY (e.g. INFEROS_KV__RECENT_WINDOW=32) < command-line flags.
# Every key is commented out and shows its default: uncomment the ones you want to change. A value set
# here overrides every profile. `inferos config show` prints the result and where each value came from.
#
# Profiles to apply when no --profile is given (one name or a comma list merged left to right):
# profile = "chat"
"""

EXAMPLES: dict[str, Any] = {
    "kv.max_tokens": 4096,
    "kv.budget_bytes": "512MiB",
    "scheduler.prefill_threads": 4,
    "scheduler.decode_threads": 4,
}
BYTE_KEYS = ("io.dml_pool_bytes", "io.host_pool_bytes")


def _toml_line(key: str, value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({key: value}).strip()


def _as_unit(value: int) -> Any:
    """Byte counts shown the way people write them (``2048MiB``) when exact, else the integer."""
    mib = 1024**2
    return f"{value // mib}MiB" if value and value % mib == 0 else value


def _section(model: BaseModel, prefix: str, lines: list[str]) -> None:
    nested: list[tuple[str, BaseModel]] = []
    doc = (type(model).__doc__ or "").strip().splitlines()[0]
    lines += ["", f"[{prefix}]", f"# {doc}"]
    for name, info in type(model).model_fields.items():
        key = f"{prefix}.{name}"
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            nested.append((name, value))
            continue
        notes = []
        if info.description:
            notes.append(info.description)
        allowed = allowed_values(tuple(key.split(".")))
        if allowed:
            notes.append(f"allowed: {allowed}")
        if value is None:
            notes.append("unset by default")
            value = EXAMPLES.get(key, 0)
        elif key in BYTE_KEYS:
            notes.append(f"default {format_bytes(value)}")
            value = _as_unit(int(value))
        lines.append(f"# {_toml_line(name, value)}" + (f"    # {'; '.join(notes)}" if notes else ""))
    for name, value in nested:
        _section(value, f"{prefix}.{name}", lines)


def starter_config() -> str:
    """The commented starter config text (parses to an empty policy: every value is commented out)."""
    lines = [HEADER.rstrip("\n")]
    policy = Policy()
    for name in type(policy).model_fields:
        _section(getattr(policy, name), name, lines)
    return "\n".join(lines) + "\n"


def write_starter(path: Path | None = None, *, force: bool = False) -> Path:
    """Write the starter config to ``path`` (default: the user config file) atomically; refuse to overwrite
    an existing file unless ``force``."""
    target = Path(path).expanduser() if path else paths.config_file()
    if target.is_dir():
        target = target / "config.toml"
    if target.exists() and not force:
        raise InferosError(f"{target} already exists", "pass --force to overwrite it, or --path for another file")
    try:
        paths.atomic_write_text(target, starter_config())
    except OSError as exc:
        raise InferosError(f"cannot write {target}: {exc.strerror or exc}", "pass a writable --path") from None
    return target
