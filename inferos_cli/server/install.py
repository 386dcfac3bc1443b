"""`inferos serve --install-service`: a systemd user unit on Linux, a logon task on Windows.

The unit runs the same `inferos serve` command line (minus ``--install-service``) with the interpreter
that runs now, and the environment that decides where inferos reads and writes (``INFEROS_HOME``,
``INFEROS_CONFIG``, ``INFEROS_REGISTRY``, settings such as ``INFEROS_KV__RECENT_WINDOW``), so the service
uses this installation, its cache and its settings. Secrets (``INFEROS_AGENT_TOKEN``) stay out of the unit.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from inferos_cli import paths
from inferos_cli.errors import InferosError, UsageError

UNIT_NAME = "inferos.service"
TASK_NAME = "inferos-serve"
#: the script the Windows logon task runs (in the config folder): it sets the environment, then serves
TASK_SCRIPT = "inferos-serve.cmd"
#: variables holding a path: made absolute, since the service starts in another working directory
PATH_VARIABLES = ("INFEROS_HOME", "INFEROS_CONFIG", "INFEROS_REGISTRY")


def service_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the service needs to see what this command sees: the ``PATH_VARIABLES`` that are set
    (absolute) and the settings layer (``INFEROS_SECTION__KEY``)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key in PATH_VARIABLES:
        if env.get(key):
            out[key] = str(Path(env[key]).expanduser().resolve())
    for key, value in env.items():
        if key.upper().startswith("INFEROS_") and "__" in key[len("INFEROS_"):]:
            out[key] = value
    return out


def _systemd_quote(value: str) -> str:
    """A value inside ``Environment="..."``: backslashes and quotes escaped, ``%`` doubled (a specifier)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def serve_command(args: list[str]) -> list[str]:
    """The command the service runs: this interpreter, ``-m inferos_cli serve`` and ``args``."""
    return [sys.executable, "-m", "inferos_cli", "serve", *args]


def systemd_unit(command: list[str], environment: dict[str, str] | None = None) -> str:
    """The text of a systemd user unit that runs ``command`` and restarts it on failure."""
    lines = [
        "[Unit]",
        "Description=inferos serve (Lemonade-compatible API + control agent)",
        "After=network.target",
        "",
        "[Service]",
        "Type=simple",
        "# secrets such as INFEROS_AGENT_TOKEN=... go in this optional file (chmod 600), not in the unit",
        "EnvironmentFile=-%h/.config/inferos/serve.env",
        f"ExecStart={shlex.join(command)}",
        "Restart=on-failure",
        "RestartSec=5",
    ]
    for key, value in sorted((environment or {}).items()):
        lines.append(f'Environment="{key}={_systemd_quote(value)}"')
    lines += ["", "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def default_unit_dir() -> Path:
    """Where ``systemctl --user`` finds units: ``$XDG_CONFIG_HOME/systemd/user`` (``~/.config`` by default).
    Not under INFEROS_HOME: systemd would not see it there (INFEROS_HOME goes into the unit instead)."""
    config = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config) if config else Path.home() / ".config") / "systemd" / "user"


def install_systemd(command: list[str], unit_dir: Path | None = None,
                    environment: dict[str, str] | None = None) -> Path:
    """Write the unit atomically; returns its path."""
    path = (unit_dir or default_unit_dir()) / UNIT_NAME
    paths.atomic_write_text(path, systemd_unit(command, environment))
    return path


def windows_script(command: list[str], environment: dict[str, str] | None = None) -> str:
    """The ``.cmd`` script the logon task runs: ``set`` each variable, then the command (``%`` doubled, as
    a batch file reads it; a task's own command line cannot set variables and holds 261 characters)."""
    lines = ["@echo off"]
    for key, value in sorted((environment or {}).items()):
        lines.append(f'set "{key}={value.replace("%", "%%")}"')
    lines.append(subprocess.list2cmdline(command).replace("%", "%%"))
    return "\r\n".join(lines) + "\r\n"


def install_windows(command: list[str], environment: dict[str, str] | None = None) -> str:
    """Register a logon task with ``schtasks`` (a console program cannot run as an SCM service without a
    service wrapper, so a per-user logon task is the honest equivalent) that runs :func:`windows_script`,
    written to the config folder. Returns the task name."""
    script = paths.config_dir() / TASK_SCRIPT
    paths.atomic_write_text(script, windows_script(command, environment))
    tr = subprocess.list2cmdline([str(script)])
    proc = subprocess.run(
        ["schtasks", "/Create", "/F", "/SC", "ONLOGON", "/TN", TASK_NAME, "/TR", tr],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise InferosError(
            f"schtasks failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}",
            "run the terminal as your user with permission to create tasks",
        )
    return TASK_NAME


def install(args: list[str], unit_dir: Path | None = None, environment: dict[str, str] | None = None) -> str:
    """Install for this platform; returns the lines to print (what was written and how to start it).
    ``environment`` defaults to :func:`service_environment` of this process."""
    command = serve_command(args)
    environment = service_environment() if environment is None else environment
    if sys.platform.startswith("linux"):
        path = install_systemd(command, unit_dir, environment)
        return (
            f"wrote {path}\n"
            "enable and start it with:\n"
            "  systemctl --user daemon-reload\n"
            f"  systemctl --user enable --now {UNIT_NAME}\n"
            f"logs: journalctl --user -u {UNIT_NAME} -f"
        )
    if sys.platform == "win32":
        name = install_windows(command, environment)
        return f"registered logon task {name!r}\nstart it now with: schtasks /Run /TN {name}"
    raise UsageError(f"--install-service supports Linux (systemd) and Windows, not {sys.platform}",
                     "run `inferos serve` under your platform's service manager")
