"""`inferos profiles list|show`: the built-in and user profiles, and the policy a profile list resolves to."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from inferos_cli.options import FormatOpt, PolicyFormat, PolicyFormatOpt, TableFormat

SizeModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model whose size class is applied first: ONNX folder (read without "
                 "loading weights), alias, .gguf or Hugging Face folder.", show_default=False),
]

ParamsOpt = Annotated[
    Optional[str],
    typer.Option("--params", help="Parameter count to pick the size class without a model, e.g. 7B, 135M, 13e9.",
                 show_default=False),
]


def list_profiles(fmt: FormatOpt = TableFormat.table) -> None:
    """List every profile: size classes, use cases and KV presets, with the file that defines each.

    Example: inferos profiles list
    """
    from inferos_cli.profiles import profile_list_snapshot
    from inferos_cli.ui.output import print_json, print_table
    from inferos_cli.ui.profile_table import profile_list_lines, profile_list_table

    snapshot = profile_list_snapshot()
    if fmt == TableFormat.json:
        print_json(snapshot)
    else:
        print_table(profile_list_table(snapshot), profile_list_lines(snapshot))


def show(
    names: Annotated[str, typer.Argument(help="Profile name or comma list merged left to right, e.g. 7b,chat.")],
    model: SizeModelOpt = None,
    params: ParamsOpt = None,
    fmt: PolicyFormatOpt = PolicyFormat.table,
) -> None:
    """Print the policy that profiles resolve to over the defaults and, per value, where it came from.
    With --model (or --params) the model's size class is applied first. Config file and INFEROS_* are
    not applied here (see `inferos config show`).

    Example: inferos profiles show chat --params 7B --format toml
    """
    from inferos_cli.profiles import policy_snapshot, resolve_settings

    count = size_param_count(model, params)
    resolved = resolve_settings(names, param_count=count, use_env=False, use_config=False)
    emit_policy(policy_snapshot(resolved, param_count=count), fmt)


def size_param_count(model: str | None, params: str | None) -> int | None:
    """The parameter count that picks the size class: ``--params``, else ``--model``'s (resolved here, in the
    command: read from the model's files, an alias or cached name resolved first), else None."""
    if params:
        from inferos_cli.models.params import parse_param_count

        return parse_param_count(params)
    if not model:
        return None
    from inferos_cli.models.resolve import param_count_for

    return param_count_for(model)


def emit_policy(snapshot: dict[str, Any], fmt: PolicyFormat) -> None:
    """Print a policy snapshot as a table / plain lines, TOML or JSON."""
    from inferos_cli.ui.output import print_json, print_table
    from inferos_cli.ui.profile_table import policy_lines, policy_table, policy_toml

    if fmt == PolicyFormat.json:
        print_json(snapshot)
    elif fmt == PolicyFormat.toml:
        typer.echo(policy_toml(snapshot), nl=False)
    else:
        print_table(policy_table(snapshot), policy_lines(snapshot))
