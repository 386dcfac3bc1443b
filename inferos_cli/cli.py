"""The Typer app: every command is registered here, and one handler turns errors into one line.

Errors: an :class:`~inferos_cli.errors.InferosError` prints ``error: <message> (<fix>)`` on stderr and
exits with its code (1, or 2 for usage); Ctrl-C exits 130; ``INFEROS_DEBUG=1`` re-raises for a traceback.
A reader that closes stdout early (``inferos doctor | head -1``) ends the command quietly with exit 0, as
Unix tools do.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable

import typer

from inferos_cli import __version__
from inferos_cli.commands import bench, config, doctor, eval as eval_cmd, models, profiles, pull, run, serve, top
from inferos_cli.errors import InferosError, device_memory_error

app = typer.Typer(
    name="inferos",
    help="Faster, leaner local LLM inference on AI PCs (ONNX Runtime, AMD GAIA / Lemonade), with honest numbers.\n\n"
    "Start with `inferos run \"Tell me a story\"` (fetches the default model), `inferos doctor` to see what "
    "this machine can run, and `inferos bench --compare baseline,inferos` to measure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def debug_enabled() -> bool:
    """True when ``INFEROS_DEBUG`` asks for tracebacks."""
    return os.environ.get("INFEROS_DEBUG", "").lower() not in ("", "0", "false", "no")


def report(exc: InferosError) -> None:
    """Print one error line on stderr."""
    typer.echo(f"error: {exc.one_line()}", err=True)


class OutputClosed(Exception):
    """stdout's reader went away (a pipe closed early): :func:`main` ends quietly with exit 0.

    Not an ``OSError``, so Typer passes it through to :func:`main` instead of exiting 1 itself."""


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so user errors become one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InferosError as exc:
            if debug_enabled():
                raise
            report(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # disk full, permission denied, file vanished: the environment, not a bug
            if exc.errno == errno.EPIPE:
                raise OutputClosed from None
            if debug_enabled():
                raise
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            typer.echo(f"error: {exc.strerror or exc}{where} (check the path and permissions; "
                       "INFEROS_DEBUG=1 shows the traceback)", err=True)
            raise typer.Exit(1) from None
        except Exception as exc:  # onnxruntime's Fail: a full device memory pool is the user's to fix
            mapped = device_memory_error(exc)
            if mapped is None or debug_enabled():
                raise
            report(mapped)
            raise typer.Exit(mapped.exit_code) from None

    return wrapper


def command(name: str, fn: Callable[..., Any], target: typer.Typer = app, **kwargs: Any) -> None:
    """Register ``fn`` as command ``name`` with the shared error handler."""
    target.command(name, **kwargs)(handle_errors(fn))


def version_callback(value: bool) -> None:
    """``--version``: print and exit."""
    if value:
        typer.echo(f"inferos {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """inferos: local LLM inference with a KV-cache quantizer, a device scheduler and honest numbers."""


command("run", run.run)
command("bench", bench.bench)
command("eval", eval_cmd.evaluate)
command("pull", pull.pull)
command("models", models.list_models)
command("doctor", doctor.doctor)
command("serve", serve.serve)
command("top", top.top)

profiles_app = typer.Typer(help="List and inspect profiles (size classes, use cases, KV presets).", no_args_is_help=True)
command("list", profiles.list_profiles, profiles_app)
command("show", profiles.show, profiles_app)
app.add_typer(profiles_app, name="profiles")

config_app = typer.Typer(help="Write a starter config file or show the effective settings.", no_args_is_help=True)
command("init", config.init, config_app)
command("show", config.show, config_app)
app.add_typer(config_app, name="config")


def main() -> None:
    """Console-script entry point."""
    try:
        try:
            app()
        finally:  # flush here, where a closed pipe can still be handled, not at interpreter exit
            if sys.stdout is not None:
                sys.stdout.flush()
    except InferosError as exc:  # raised outside a command (e.g. in a callback)
        if debug_enabled():
            raise
        report(exc)
        sys.exit(exc.exit_code)
    except (OutputClosed, BrokenPipeError):
        quiet_exit()


def quiet_exit() -> None:
    """Exit 0 after stdout's reader went away: what is still buffered goes to the null device, so the
    interpreter's own flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(0)
