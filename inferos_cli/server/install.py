"""`inferos serve --install-service`: a systemd user unit on Linux, a logon task on Windows.

The unit runs the same `inferos serve` command line (minus ``--install-service``) with the interpreter
that runs now, so the service uses this installation.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from inferos_cli import paths
from inferos_cli.errors import InferosError, UsageError

UNIT_NAME = "inferos.service"
TASK_NAME = "inferos-serve"


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
        lines.append(f'Environment="{key}={value}"')
    lines += ["", "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def default_unit_dir() -> Path:
    """``INFEROS_HOME/systemd`` when INFEROS_HOME is set (tests), else ``~/.config/systemd/user``."""
    root = paths.home()
    if root is not None:
        return root / "systemd"
    return Path.home() / ".config" / "systemd" / "user"


def install_systemd(command: list[str], unit_dir: Path | None = None,
                    environment: dict[str, str] | None = None) -> Path:
    """Write the unit atomically; returns its path."""
    path = (unit_dir or default_unit_dir()) / UNIT_NAME
    paths.atomic_write_text(path, systemd_unit(command, environment))
    return path


def install_windows(command: list[str]) -> str:
    """Register a logon task with ``schtasks`` (a console program cannot run as an SCM service without a
    service wrapper, so a per-user logon task is the honest equivalent). Returns the task name."""
    tr = subprocess.list2cmdline(command)
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
    """Install for this platform; returns the lines to print (what was written and how to start it)."""
    command = serve_command(args)
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
        name = install_windows(command)
        return f"registered logon task {name!r}\nstart it now with: schtasks /Run /TN {name}"
    raise UsageError(f"--install-service supports Linux (systemd) and Windows, not {sys.platform}",
                     "run `inferos serve` under your platform's service manager")
