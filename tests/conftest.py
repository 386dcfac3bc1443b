"""Shared fixtures: an isolated INFEROS_HOME per test, and the real reference models from ../shared."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INFEROS_SHARED", REPO.parent / "shared"))
MODELS = SHARED / "models"
DATA = SHARED / "data"
STORIES_SRC = MODELS / "stories260K"
OGA_DIR = MODELS / "smollm2-135m-oga-int4"
STORIES_SAMPLE = "Once upon a time, there was a little girl named Lily"


def need(path: Path) -> Path:
    """Skip the test with a stated reason when a ../shared resource is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference models and data live in ../shared beside the checkout")
    return path


@pytest.fixture(autouse=True)
def inferos_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own INFEROS_HOME and no stray INFEROS_* settings from the caller's shell."""
    for key in list(os.environ):
        if key.startswith("INFEROS_") and key not in ("INFEROS_SHARED", "INFEROS_TEST_CACHE", "INFEROS_GAIA_EXE"):
            monkeypatch.delenv(key, raising=False)
    home = tmp_path / "inferos-home"
    monkeypatch.setenv("INFEROS_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def stories_src() -> Path:
    """The stories260K Hugging Face folder (safetensors + tokenizer.json)."""
    return need(STORIES_SRC)


@pytest.fixture(scope="session")
def oga_dir() -> Path:
    """The onnxruntime-genai SmolLM2-135M int4 folder (GroupQueryAttention + MatMulNBits)."""
    return need(OGA_DIR / "model.onnx")


@pytest.fixture(scope="session")
def stories_onnx(tmp_path_factory: pytest.TempPathFactory, stories_src: Path) -> Path:
    """stories260K converted once per test session to an fp32 inferos ONNX folder."""
    from inferos_cli.models.convert import convert_hf_folder

    out = tmp_path_factory.mktemp("stories260K-onnx") / "model"
    convert_hf_folder(stories_src, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    """The TinyStories validation sample (the right text for stories260K)."""
    return need(DATA / "tinystories-valid-sample.txt")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    """wikitext-2 raw test split."""
    return need(DATA / "wikitext2-raw-test.txt")


def make_engine(folder: Path):
    """A baseline (plain cache), single-thread CPU engine on an ONNX model folder."""
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import inspect_folder

    info = inspect_folder(folder)
    resolved = resolve_settings(
        "baseline", param_count=info.param_count, flags={"scheduler": {"mode": "cpu"}}, use_env=False
    )
    return Engine(info, resolved, threads=1)


@pytest.fixture(scope="module")
def stories(stories_onnx: Path):
    """Baseline engine on the converted stories260K."""
    return make_engine(stories_onnx)


@pytest.fixture(scope="module")
def oga(oga_dir: Path):
    """Baseline engine on the onnxruntime-genai SmolLM2 folder."""
    return make_engine(oga_dir.parent)


def stop_process(proc) -> None:
    """Terminate a server subprocess started by a test, killing it if it does not exit within 20 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, proc, *, need_ok: bool = False, timeout: float = 120.0) -> bytes:
    """Poll ``url`` until the server subprocess ``proc`` answers (with 200 when ``need_ok``) and return the
    body; fail the test with the server's stderr if it exits first or ``timeout`` seconds pass."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except urllib.error.HTTPError:
            if not need_ok:
                return b""
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            state = "exited" if proc.poll() is not None else f"did not answer {url} within {timeout:.0f} s"
            pytest.fail(f"server {state}: {err[-800:]}")
        time.sleep(0.2)


def exact_matmulnbits(model) -> None:
    """Set every MatMulNBits to ``accuracy_level`` 0 (float activations) in a loaded ONNX model. At the shipped
    level 4 the int8 activation quantization turns float rounding (~5e-5) into logit noise (~0.4), which would
    hide real errors in equality tests."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0


@pytest.fixture(scope="session")
def oga_exact(oga_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the OGA folder whose MatMulNBits run at accuracy_level 0 (weights hard-linked when possible)."""
    import shutil

    import onnx

    src = oga_dir.parent
    dst = tmp_path_factory.mktemp("oga-exact")
    for f in src.iterdir():
        if f.name == "model.onnx.data":
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copyfile(f, dst / f.name)
        elif f.name != "model.onnx" and f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, dst / f.name)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    exact_matmulnbits(model)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def check_graph(path: Path, data_dir: Path, full: bool = True) -> None:
    """``onnx.checker`` on a graph whose weights live in ``data_dir``. onnxruntime registers
    ``(Skip)SimplifiedLayerNormalization`` in the default domain, which the checker does not know (the
    original graphs fail it for that alone), so those nodes are checked as com.microsoft ops."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            node.domain = "com.microsoft"
    # the checker refuses external data with several hard links; other tests (bench's ort-genai peer folder,
    # rewrites of read-only folders) may hard-link the session fixture's weights, so check a private copy then
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    with tempfile.TemporaryDirectory() as tmp:
        if any((data_dir / f).stat().st_nlink > 1 for f in files):
            for f in files:
                shutil.copyfile(data_dir / f, Path(tmp) / f)
            data_dir = Path(tmp)
        probe = data_dir / f".check-{path.stem}.onnx"
        onnx.save(model, str(probe))
        try:
            onnx.checker.check_model(str(probe), full_check=full)
        finally:
            probe.unlink()
