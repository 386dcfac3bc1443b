"""`inferos models`: the model cache with sizes, and the aliases that `inferos pull` knows."""

from __future__ import annotations

from typing import Annotated

import typer

from inferos_cli.options import FormatOpt, TableFormat


def list_models(
    fmt: FormatOpt = TableFormat.table,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's sha256 (slow for big models).")] = False,
) -> None:
    """List cached models (size, dtype, parameters, status) and the registry's aliases.

    Example: inferos models --format json
    """
    from inferos_cli import paths
    from inferos_cli.models.manifest import check_manifest
    from inferos_cli.models.resolve import list_cached
    from inferos_cli.models.registry import load_registry
    from inferos_cli.ui.models_table import aliases_table, models_lines, models_table
    from inferos_cli.ui.output import is_terminal, print_json, print_table

    cached = list_cached()
    if verify:
        for model in cached:
            problems = check_manifest(model.path, deep=True)
            model.status = "ok (sha256 verified)" if not problems else problems[0]
    names = {m.name for m in cached}
    registry = load_registry()
    snapshot = {
        "models_dir": str(paths.models_dir()),
        "models": [m.to_json() for m in cached],
        "aliases": [{"name": a.name, "origin": a.origin, "description": a.description, "params": a.params,
                     "pulled": any(n == a.name or n.startswith(a.name + "-") for n in names)}
                    for a in registry.aliases.values()],
    }
    if fmt == TableFormat.json:
        print_json(snapshot)
        return
    print_table(models_table(snapshot), models_lines(snapshot))
    if is_terminal():
        from rich.console import Console

        Console().print(aliases_table(snapshot))
