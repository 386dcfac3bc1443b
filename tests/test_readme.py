"""Every `inferos ...` command in a README code block runs, as written, in a real subprocess.

A command the test cannot run here carries its reason in the README itself, as a trailing comment that starts
with ``needs`` (``inferos run "Hi" --backend gaia   # needs the GAIA CLI ...``); the test checks that every
command is either run or carries such a reason. A comment ``# exits N ...`` states the exit code the example
shows (an error example); every other command must exit 0 without a traceback. Commands run in one temporary folder with a temporary
``INFEROS_HOME`` (the default model is pulled once, as a new user's first command would), through ``bash -c``
so pipes in the examples (``| head -3``) are real. ``serve`` commands must answer ``/v1/health`` on their port;
``--interactive`` gets ``/exit`` on stdin.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED = REPO.parent / "shared"
SKIP_MARK = re.compile(r"#\s*needs\b")
EXIT_MARK = re.compile(r"#\s*exits (\d+)\b")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the README examples are run through bash")


def _fenced_blocks(text: str) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S) if lang in ("", "bash", "sh")]


def readme_commands(text: str | None = None) -> list[tuple[str, str | None]]:
    """(command, skip reason or None) for every line of a README shell block that runs ``inferos``."""
    out: list[tuple[str, str | None]] = []
    for body in _fenced_blocks(text if text is not None else README.read_text(encoding="utf-8")):
        lines = body.replace("\\\n", " ").splitlines()
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            code, comment = _split_comment(line)
            if not re.search(r"(^|&&|\||;)\s*(\w+=\S+\s+)*inferos\b", code):
                continue
            if code.startswith("pip install"):  # the set-up line: the test suite itself is the install check
                code = code.split("&&", 1)[1].strip()
            reason = comment if comment and SKIP_MARK.match(comment) else None
            code = re.sub(r"\s+", " ", code)
            _COMMENTS[code] = comment
            out.append((code, reason))
    return out


def _split_comment(line: str) -> tuple[str, str | None]:
    """Split a shell line at its first ``#`` outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:].strip()
    return line, None


def test_readme_commands_are_found() -> None:
    cmds = readme_commands()
    assert len(cmds) >= 20, cmds
    assert any(c.startswith("inferos run") for c, _ in cmds)
    # the parser itself: comments, quotes and continuation lines
    sample = '```bash\ninferos run "a # b" --x 1   # needs a GPU\ninferos bench \\\n  --y 2\n```\n'
    assert readme_commands(sample) == [('inferos run "a # b" --x 1', "# needs a GPU"), ("inferos bench --y 2", None)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    if shutil.which("inferos") is None:
        pytest.skip("the inferos command is not on PATH (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("readme")
    (work / "prompts.txt").write_text("Tell me a joke\nWhat is ONNX Runtime?\n", encoding="utf-8")
    env = dict(os.environ)
    env["INFEROS_HOME"] = str(work / "home")
    env.pop("INFEROS_CONFIG", None)
    env.pop("INFEROS_DEBUG", None)
    link = work.parent / "shared"  # the README's ../shared paths, as seen from a checkout beside shared/
    if SHARED.is_dir() and not link.exists():
        link.symlink_to(SHARED)
    return work, env


def _free_port_of(cmd: str) -> int:
    m = re.search(r"--port\s+(\d+)", cmd)
    return int(m.group(1)) if m else 7031


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _run_serve(cmd: str, cwd: Path, env: dict[str, str], check_only: bool = False) -> subprocess.Popen | None:
    """Start a README ``serve`` command; it must answer ``/v1/health``. ``check_only``: stop it again."""
    port = _free_port_of(cmd)
    proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    up = False
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not up:
            if proc.poll() is not None:
                pytest.fail(f"{cmd!r} exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as resp:
                    up = resp.status == 200
            except OSError:
                time.sleep(0.5)
        if not up:
            pytest.fail(f"{cmd!r} did not answer /v1/health on port {port}")
    finally:
        if check_only or not up:
            _stop(proc)
    return None if check_only else proc


_COMMENTS: dict[str, str | None] = {}


def _comment_of(cmd: str) -> str | None:
    return _COMMENTS.get(cmd)


def _commands() -> list[tuple[str, str | None]]:
    try:
        return readme_commands()
    except OSError:
        return []


@pytest.mark.parametrize("cmd,reason", _commands(), ids=[c[:60] for c, _ in _commands()])
def test_readme_command_runs(cmd: str, reason: str | None, workdir: tuple[Path, dict[str, str]]) -> None:
    if reason is not None:
        pytest.skip(f"README: {reason.lstrip('# ')}")
    if "../shared" in cmd and not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    work, env = workdir
    if re.match(r"inferos serve\b", cmd):
        _run_serve(cmd, work, env, check_only=True)
        return
    if re.match(r"inferos top\b", cmd):  # a client of a running server: start the README's own serve example
        server = _run_serve(f"inferos serve --model smollm2-135m --port {_free_port_of(cmd)}", work, env)
    else:
        server = None
    try:
        stdin = "/exit\n" if "--interactive" in cmd else ""
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=work, env=env, input=stdin, text=True,
                              capture_output=True, timeout=1800)
    finally:
        if server is not None:
            _stop(server)
    want = int(EXIT_MARK.search(comment).group(1)) if (comment := _comment_of(cmd)) and EXIT_MARK.search(comment) else 0
    assert proc.returncode == want, (f"{cmd!r} exited {proc.returncode}, the README says {want}\n"
                                     f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if want:
        assert len(proc.stderr.strip().splitlines()) >= 1 and proc.stderr.startswith("error:"), proc.stderr
