"""A reader that closes stdout early (``inferos doctor | head -1``) ends inferos quietly with exit 0, as
Unix tools do: no ``error: Broken pipe`` line, no traceback, no ``Exception ignored`` at exit.

The pipe's read end is closed before inferos starts, so every write fails: the deterministic form of
``| head -1`` (with a real ``head`` the outcome depends on whether inferos writes after head exits)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_into_closed_pipe(*args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    """``python -m inferos_cli ARGS`` (the real entry point) with stdout on a pipe nobody reads."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "inferos_cli", *args], stdout=write_end,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=timeout,
                              check=False)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("argv", [
    ["profiles", "list"],
    ["profiles", "list", "--format", "json"],
    ["config", "show"],
    ["doctor"],
    ["models"],
], ids=" ".join)
def test_closed_stdout_ends_quietly(argv: list[str]) -> None:
    proc = run_into_closed_pipe(*argv)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_run_json_into_closed_stdout_ends_quietly(stories_onnx: Path) -> None:
    """The README's ``inferos run "Hi" --json | head -3``, on a small real model."""
    proc = run_into_closed_pipe("run", "Once upon a time", "--json", "--max-tokens", "8", "--model", str(stories_onnx),
                                "--profile", "baseline")
    unexpected = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]  # device fallbacks
    assert (proc.returncode, unexpected) == (0, [])


def test_other_os_errors_still_report(tmp_path: Path) -> None:
    """Only a closed pipe is quiet: an unwritable output path still prints its one-line error."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("a file, not a folder")
    proc = subprocess.run([sys.executable, "-m", "inferos_cli", "config", "init", "--path",
                           str(not_a_folder / "sub" / "c.toml")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_handler_passes_a_closed_pipe_to_main() -> None:
    """The command wrapper turns EPIPE into OutputClosed (which Typer lets through to main), in debug mode too."""
    from inferos_cli.cli import OutputClosed, handle_errors

    def write_to_closed_pipe() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(OutputClosed):
        handle_errors(write_to_closed_pipe)()
