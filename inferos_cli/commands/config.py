"""`inferos config init|show`: write a commented starter config file; print the effective settings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferos_cli.commands.profiles import ParamsOpt, SizeModelOpt, emit_policy, size_param_count
from inferos_cli.options import ConfigOpt, PolicyFormat, PolicyFormatOpt, ProfileOpt


def init(
    path: Annotated[
        Optional[Path],
        typer.Option("--path", help="Where to write (default: config.toml in the inferos config folder, "
                     "which INFEROS_HOME moves).", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starter config.toml: every key commented out with its default and allowed range.

    Example: inferos config init --path ./inferos.toml
    """
    from inferos_cli.configfile import write_starter

    written = write_starter(path, force=force)
    typer.echo(f"wrote {written}")


def show(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    model: SizeModelOpt = None,
    params: ParamsOpt = None,
    fmt: PolicyFormatOpt = PolicyFormat.table,
) -> None:
    """Print the effective settings (defaults < profiles < config file < INFEROS_* env) and where each
    value came from.

    Example: inferos config show --profile chat --format json
    """
    from inferos_cli.profiles import policy_snapshot, resolve_settings

    count = size_param_count(model, params)
    resolved = resolve_settings(profile, param_count=count, config_path=config)
    emit_policy(policy_snapshot(resolved, param_count=count), fmt)
