"""`inferos serve --install-service` carries the environment that decides where inferos reads and writes
(issue 17 item 10c): the installed service uses the same cache and settings as the command that installed it.
Only unit / script text is generated here (into tmp folders): nothing is installed on this machine."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from inferos_cli.server.install import default_unit_dir, service_environment, systemd_unit, windows_script


def environment_lines(unit: str) -> dict[str, str]:
    """``Environment="K=V"`` lines of a unit as a dict (systemd's quoting undone)."""
    out = {}
    for line in unit.splitlines():
        if line.startswith("Environment="):
            key, _, value = shlex.split(line[len("Environment="):])[0].partition("=")
            out[key] = value.replace("%%", "%")
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the systemd unit is the Linux path")
def test_installed_unit_carries_inferos_home_config_and_settings(
        tmp_path: Path, stories_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from inferos_cli.cli import app

    home = tmp_path / "my home"  # a space, and given relative to the working directory
    config = home / "config.toml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFEROS_HOME", "my home")
    monkeypatch.setenv("INFEROS_CONFIG", str(config))
    monkeypatch.setenv("INFEROS_KV__RECENT_WINDOW", "64")
    monkeypatch.setenv("INFEROS_AGENT_TOKEN", "s3cret")
    unit_dir = tmp_path / "units"
    result = CliRunner().invoke(app, ["serve", "--install-service", "--unit-dir", str(unit_dir),
                                      "--model", str(stories_onnx), "--port", "7099"])
    assert result.exit_code == 0, result.output
    unit = (unit_dir / "inferos.service").read_text()
    env = environment_lines(unit)
    assert env == {"INFEROS_HOME": str(home.resolve()), "INFEROS_CONFIG": str(config.resolve()),
                   "INFEROS_KV__RECENT_WINDOW": "64"}
    assert "s3cret" not in unit  # secrets go in the EnvironmentFile, never in the unit


def test_environment_values_are_quoted_for_systemd_and_cmd(tmp_path: Path) -> None:
    odd = str(tmp_path / 'a "b" 100%\\c')
    env = service_environment({"INFEROS_HOME": odd, "INFEROS_AGENT_TOKEN": "x", "PATH": "/bin"})
    assert env == {"INFEROS_HOME": str(Path(odd).resolve())}
    command = ["/usr/bin/python3", "-m", "inferos_cli", "serve", "--port", "7031"]
    assert environment_lines(systemd_unit(command, env)) == env
    script = windows_script(command, env)
    lines = script.split("\r\n")
    assert lines[0] == "@echo off" and lines[-1] == ""
    assert lines[1] == f'set "INFEROS_HOME={env["INFEROS_HOME"].replace("%", "%%")}"'
    assert lines[2] == "/usr/bin/python3 -m inferos_cli serve --port 7031"


def test_unit_goes_where_systemd_looks_even_with_inferos_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_unit_dir() == tmp_path / "xdg" / "systemd" / "user"
