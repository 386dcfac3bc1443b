"""Profiles: named partial policies (TOML) merged into the settings layers.

Built-in profiles ship in ``inferos_cli/profiles/`` (size classes ``3b 7b 13b 20b``, use cases
``chat batch quality``, KV presets ``baseline fp16 tiered int8 int4 int4-small int4-k8v4 int8-fused conservative balanced aggressive``);
users add their own as ``INFEROS_HOME/profiles/NAME.toml`` (a user file shadows a built-in one).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from inferos_cli import paths
from inferos_cli.errors import ConfigError, ProfileError
from inferos_cli.models.params import SIZE_CLASSES, size_class
from inferos_cli.settings import Resolved, env_layer, resolve

BUILTIN_DIR = Path(__file__).with_name("profiles")
META_KEYS = ("kind", "description")


def available() -> dict[str, Path]:
    """Every profile name and the file that defines it (user profiles shadow built-ins)."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}
    user = paths.user_profiles_dir()
    if user.is_dir():
        found.update({p.stem: p for p in sorted(user.glob("*.toml"))})
    return found


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning syntax errors into a one-line ConfigError."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", "check the path or run `inferos config init`") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the file and try again") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read {path}: {reason}", "pass a readable UTF-8 TOML file") from None


def load(name: str) -> dict[str, Any]:
    """The raw table of one profile, ``kind``/``description`` included."""
    known = available()
    if name not in known:
        raise ProfileError(
            f"unknown profile {name!r}; known profiles: {', '.join(sorted(known, key=_name_order))}",
            f"see `inferos profiles list`; add your own as {paths.user_profiles_dir() / (name + '.toml')}",
        )
    return read_toml(known[name])


def _name_order(name: str) -> tuple[int, str]:
    """Size classes first, by size; then every other name alphabetically."""
    return (SIZE_CLASSES.index(name), "") if name in SIZE_CLASSES else (len(SIZE_CLASSES), name)


def policy_part(table: dict[str, Any]) -> dict[str, Any]:
    """A profile table without its metadata keys."""
    return {k: v for k, v in table.items() if k not in META_KEYS}


def split_names(spec: str | None) -> list[str]:
    """``"7b, chat"`` -> ``["7b", "chat"]``; None or empty -> []."""
    return [n.strip() for n in (spec or "").split(",") if n.strip()]


def read_config(path: Path) -> dict[str, Any]:
    """A config file as a nested policy dict: TOML, or the guide's YAML (top-level ``infer_os:``)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path} is YAML but PyYAML is not installed", "pip install 'inferos[yaml]' or use TOML"
            ) from None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}", "check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot read {path}: {reason}", "pass a readable UTF-8 YAML file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        data = read_toml(path)
    if isinstance(data, dict) and "infer_os" in data:
        data = data["infer_os"] or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of settings")
    data = dict(data)
    data.pop("profile", None)
    return data


def config_profile(path: Path | None) -> list[str]:
    """Profile names a config file asks for with a top-level ``profile = "..."`` key."""
    if path is None or not path.is_file():
        return []
    try:
        raw: Any = read_toml(path) if path.suffix.lower() not in (".yaml", ".yml") else None
    except ConfigError:
        return []  # read_config reports the same problem with its one-line message
    if isinstance(raw, dict) and isinstance(raw.get("infer_os"), dict):
        raw = raw["infer_os"]
    if raw is None:
        try:
            import yaml

            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except Exception:
            return []
        raw = raw.get("infer_os", raw) if isinstance(raw, dict) else {}
    value = raw.get("profile") if isinstance(raw, dict) else None
    return split_names(value) if isinstance(value, str) else []


def default_config_path() -> Path | None:
    """``INFEROS_CONFIG`` if set, else ``config.toml`` in the config dir when it exists."""
    env = os.environ.get("INFEROS_CONFIG")
    if env:
        return Path(env)
    path = paths.config_file()
    return path if path.is_file() else None


def resolve_settings(
    profile: str | None = None,
    *,
    param_count: int | None = None,
    config_path: Path | None = None,
    flags: dict[str, Any] | None = None,
    use_env: bool = True,
    use_config: bool = True,
) -> Resolved:
    """Resolve the effective policy once: defaults < size class < profiles < config < env < flags.

    ``profile`` is one name or a comma list merged left to right. When ``param_count`` is known, the
    model's size class is applied first, so ``chat`` on a 7B model means ``7b`` + ``chat``. ``flags``
    is a nested dict of values given on the command line (None values are ignored). ``use_config=False``
    ignores the default config file (``inferos profiles show`` shows profiles over defaults only).
    """
    if config_path is None and use_config:
        config_path = default_config_path()
    names = split_names(profile) or config_profile(config_path)
    size = size_class(param_count)
    ordered: list[str] = []
    if size and size not in names:
        ordered.append(size)
    ordered.extend(names)
    layers: list[tuple[str, dict[str, Any]]] = []
    for name in ordered:
        source = f"profile:{name}" + (" (size class)" if name == size and name not in names else "")
        layers.append((source, policy_part(load(name))))
    if config_path is not None:
        layers.append((f"config:{config_path}", read_config(config_path)))
    if use_env:
        layers.append(("env", env_layer()))
    if flags:
        layers.append(("flag", _drop_none(flags)))
    resolved = resolve(layers)
    resolved.profiles = ordered
    resolved.config_path = config_path
    return resolved


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ snapshots


def describe(name: str, path: Path) -> dict[str, str]:
    """One profile's list row: name, kind (size / use / preset / user), description, defining file."""
    try:
        table = read_toml(path)
    except ConfigError as exc:
        return {"name": name, "kind": "invalid", "description": exc.message, "source": str(path)}
    builtin = path.parent == BUILTIN_DIR
    kind = str(table.get("kind", "preset" if builtin else "user"))
    return {
        "name": name,
        "kind": kind,
        "description": str(table.get("description", "")),
        "source": f"built-in ({path.name})" if builtin else str(path),
    }


KIND_ORDER = {"size": 0, "use": 1, "preset": 2}


def profile_list_snapshot() -> dict[str, Any]:
    """``{"profiles": [...], "user_dir": PATH}`` sorted by kind (size, use, preset, user) then name."""
    rows = [describe(name, path) for name, path in available().items()]
    rows.sort(key=lambda r: (KIND_ORDER.get(r["kind"], 3), _size_key(r["name"]), r["name"]))
    return {"profiles": rows, "user_dir": str(paths.user_profiles_dir())}


def _size_key(name: str) -> float:
    """``13b`` -> 13.0 so size classes sort by size; other names -> 0."""
    try:
        return float(name[:-1]) if name.endswith("b") else 0.0
    except ValueError:
        return 0.0


def policy_snapshot(resolved: Resolved, *, param_count: int | None = None) -> dict[str, Any]:
    """Plain data of a resolution: profiles applied, config file, size class, policy, per-leaf sources."""
    return {
        "profiles": list(resolved.profiles),
        "size_class": size_class(param_count),
        "param_count": param_count,
        "config": str(resolved.config_path) if resolved.config_path else None,
        "policy": resolved.as_dict(),
        "sources": dict(resolved.sources),
    }


def profile_of(config: str) -> str:
    """``chat+int4`` -> ``chat,int4`` (profiles merged left to right)."""
    return ",".join(p.strip() for p in config.split("+") if p.strip())
