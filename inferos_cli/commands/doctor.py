"""`inferos doctor`: what this machine can run, every line measured (ok / warn / fail with a fix)."""

from __future__ import annotations

import typer

from inferos_cli.options import FormatOpt, TableFormat


def doctor(fmt: FormatOpt = TableFormat.table) -> None:
    """Check Python, OS, CPU, RAM, onnxruntime and a strict probe of each execution provider, GPU/NPU,
    GAIA, the Lemonade server, the model cache and the settings. Exit 0 when the CPU path works.

    Example: inferos doctor --format json
    """
    from inferos_cli.doctor import run_checks
    from inferos_cli.ui.doctor_table import doctor_lines, doctor_table, summary
    from inferos_cli.ui.output import is_terminal, print_json, print_table

    report = run_checks()
    snapshot = report.to_json()
    if fmt == TableFormat.json:
        print_json(snapshot)
    else:
        print_table(doctor_table(snapshot), doctor_lines(snapshot))
        if is_terminal():
            typer.echo(summary(snapshot))
    raise typer.Exit(report.exit_code)
