"""The CLI surface: --help of every registered command, exit codes, one-line errors, lazy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from inferos_cli import __version__
from inferos_cli.cli import app
from inferos_cli.errors import ProfileError
from inferos_cli.options import StopOpt, unescape

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def command_paths(tapp: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path registered on the app, sub-apps included (so new commands are covered)."""
    out: list[tuple[str, ...]] = []
    for cmd in tapp.registered_commands:
        name = cmd.name or (cmd.callback.__name__.replace("_", "-") if cmd.callback else "")
        out.append(prefix + (name,))
    for group in tapp.registered_groups:
        sub = group.typer_instance
        name = group.name or (sub.info.name if sub is not None else None)
        if sub is not None and name:
            out.append(prefix + (name,))
            out.extend(command_paths(sub, prefix + (name,)))
    return out


PATHS = command_paths(app)


def test_every_expected_command_is_registered() -> None:
    names = {p[0] for p in PATHS}
    for expected in ("run", "bench", "eval", "pull", "models", "doctor", "serve", "profiles", "config"):
        assert expected in names
    assert ("profiles", "list") in PATHS and ("profiles", "show") in PATHS
    assert ("config", "init") in PATHS and ("config", "show") in PATHS


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_help_of_every_command(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and path[-1] in result.output


def test_root_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "doctor" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"inferos {__version__}"


def _python_m(*args: str, env: dict[str, str] | None = None, home: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
    full["INFEROS_HOME"] = str(home)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "inferos_cli", *args], capture_output=True, text=True,
                          env=full, cwd=REPO, timeout=120, check=False)


def test_unknown_profile_subprocess_exit_1_one_line(inferos_home: Path) -> None:
    proc = _python_m("profiles", "show", "nosuch", home=inferos_home)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown profile 'nosuch'; known profiles: ")
    for name in ("3b", "7b", "13b", "20b", "chat", "batch", "quality"):
        assert name in lines[0]
    assert "Traceback" not in proc.stderr


def test_debug_env_gives_the_traceback(inferos_home: Path) -> None:
    proc = _python_m("profiles", "show", "nosuch", env={"INFEROS_DEBUG": "1"}, home=inferos_home)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ProfileError" in proc.stderr
    result = runner.invoke(app, ["profiles", "show", "nosuch"], env={"INFEROS_DEBUG": "1"})
    assert isinstance(result.exception, ProfileError)


def test_invalid_env_value_names_key_value_range(inferos_home: Path) -> None:
    proc = _python_m("config", "show", env={"INFEROS_KV__RECENT_WINDOW": "8"}, home=inferos_home)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line
    assert "kv.recent_window = '8' (from env)" in line and "16..512" in line


@pytest.mark.parametrize(
    "argv",
    [["profiles", "show"],  # missing argument
     ["doctor", "--format", "xml"],  # bad choice
     ["config", "show", "--format", "yaml"],
     ["profiles", "show", "chat", "--params", "lots"],  # InferosError UsageError
     ["nosuchcommand"]],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output


def test_usage_error_from_inferos_is_one_line() -> None:
    result = runner.invoke(app, ["profiles", "show", "chat", "--params", "lots"])
    assert result.output.strip() == "error: --params 'lots' is not a parameter count (use e.g. 7B, 135M or 13e9)"


def test_help_stays_light_without_heavy_imports(inferos_home: Path) -> None:
    code = (
        "import sys; import inferos_cli.cli as c\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(c.app, ['--help']).exit_code == 0\n"
        "heavy = [m for m in ('onnxruntime', 'onnx', 'fastapi', 'uvicorn', 'matplotlib', 'pynvml', 'torch',"
        " 'tokenizers', 'gguf') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"`inferos --help` imports heavy modules: {proc.stdout.strip()}"


def test_handler_turns_os_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from inferos_cli.cli import handle_errors
    from inferos_cli.errors import UsageError

    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/root/x.json")

    def usage() -> None:
        raise UsageError("bad flags", "use --help")

    with pytest.raises(typer.Exit) as info:
        handle_errors(denied)()
    assert info.value.exit_code == 1
    assert capsys.readouterr().err.startswith("error: Permission denied: /root/x.json (")
    with pytest.raises(typer.Exit) as info:
        handle_errors(usage)()
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "error: bad flags (use --help)\n"


def test_a_full_device_memory_pool_is_one_line_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    """onnxruntime's BFCArena failure (this text is what an H100 run printed with the default 2 GiB
    io.dml_pool_bytes, batch 4 x 2048 tokens) becomes one error line naming the setting, exit code 1."""
    import typer

    from inferos_cli.cli import handle_errors

    text = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Attention node. "
            "Name:'Attention_164' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 "
            "void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Available "
            "memory of 611244032 is smaller than requested bytes of 1207959552")

    def boom() -> None:
        raise Exception(text)

    with pytest.raises(typer.Exit) as info:
        handle_errors(boom)()
    assert info.value.exit_code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1152 MiB asked, 583 MiB left" in err and "INFEROS_IO__DML_POOL_BYTES" in err

    def other() -> None:
        raise Exception("something else")

    with pytest.raises(Exception, match="something else"):  # not a memory failure: not swallowed
        handle_errors(other)()


@pytest.mark.parametrize(("typed", "meant"), [
    (r"\n\n", "\n\n"),
    (r"a\tb\r\n", "a\tb\r\n"),
    (r"say \"hi\" or \'yo\'", "say \"hi\" or 'yo'"),
    (r"\\n", "\\n"),  # an escaped backslash, then a plain n
    (r"\x41\x0a", "A\n"),
    (r"C:\path\q \xZZ \xe9 \ ", r"C:\path\q \xZZ \xe9 \ "),  # unknown escapes, non-ASCII \x and a lone \ stay
    ("\n", "\n"),  # a real newline ($'\n' in the shell) is unchanged
    ("", ""),
])
def test_stop_strings_understand_c_escapes(typed: str, meant: str) -> None:
    """`--stop "\\n\\n"` reaches inferos as backslash-n: it means a blank line, as in llama.cpp."""
    assert unescape(typed) == meant


def test_stop_option_unescapes_every_value() -> None:
    seen: list[object] = []
    tapp = typer.Typer()

    @tapp.command()
    def go(stop: StopOpt = None) -> None:
        seen.append(stop)

    assert runner.invoke(tapp, ["--stop", r"\n\n", "--stop", "END"]).exit_code == 0
    assert runner.invoke(tapp, []).exit_code == 0
    assert seen == [["\n\n", "END"], None]
