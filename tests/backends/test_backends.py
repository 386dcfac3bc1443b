"""`--backend lemonade` and `--backend gaia` against a real `inferos serve` (stories260K) on 127.0.0.1,
plus the KV-policy -> llamacpp_args mapping sent to a llamacpp-recipe server."""

from __future__ import annotations

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "Once upon a time"
GAIA_EXE = os.environ.get("INFEROS_GAIA_EXE") or shutil.which("gaia") or shutil.which("gaia-cli")


@pytest.fixture(scope="module")
def server(stories_onnx: Path) -> Iterator[Any]:
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.server.service import InferenceService
    from _server import ServerThread
    from inferos_cli.server.app import ServerState, create_app

    info = inspect_folder(stories_onnx)
    service = InferenceService(info, resolve_settings(None, param_count=info.param_count, use_env=False))
    thread = ServerThread(create_app(ServerState(service=service))).start()
    thread.service = service  # type: ignore[attr-defined]
    yield thread
    thread.stop()
    service.close()


def _served_text(server: Any, n: int, chat: bool) -> str:
    import httpx

    if chat:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": n}
        return httpx.post(server.url + "/api/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]
    body = {"prompt": PROMPT, "max_tokens": n}
    return httpx.post(server.url + "/api/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_lemonade_backend_streams_events_with_client_side_timings(server: Any) -> None:
    from inferos_cli.backends import open_backend
    from inferos_cli.engine.sampling import GenerationConfig
    from inferos_cli.profiles import resolve_settings

    backend = open_backend("lemonade", model=server.service.info.name, policy=resolve_settings(None).policy,
                           url=server.url)
    assert backend.describe()["url"] == server.url + "/api/v1"
    for chat in (False, True):
        events = list(backend.generate(PROMPT, GenerationConfig(max_tokens=16), chat=chat))
        kinds = [e.kind for e in events]
        assert kinds[0] == "prefill" and kinds[-1] == "done" and set(kinds[1:-1]) == {"token"}
        text = "".join(e.text for e in events if e.kind == "token")
        assert text == _served_text(server, 16, chat)
        done = events[-1]
        assert done.generated == 16 and done.finish_reason == "length"
        assert done.ttft_s is not None and done.ttft_s > 0 and done.decode_tps is not None and done.decode_tps > 0
        assert done.extra["server_stats"]["output_tokens"] == 16
        assert set(done.util) == {"cpu", "gpu", "npu"}


def test_lemonade_backend_errors_are_one_line(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.errors import BackendError, ModelNotFoundError
    from inferos_cli.backends import lemonade
    from inferos_cli.backends import open_backend

    with pytest.raises(ModelNotFoundError):
        open_backend("lemonade", model="not-a-model", url=server.url)
    monkeypatch.delenv("LEMONADE_BASE_URL", raising=False)
    monkeypatch.setattr(lemonade, "DEFAULT_URLS", ("http://127.0.0.1:9/api/v1",))
    with pytest.raises(BackendError) as err:
        lemonade.resolve_url(None)
    assert "no Lemonade server" in err.value.one_line() and "\n" not in err.value.one_line()
    monkeypatch.setenv("LEMONADE_BASE_URL", server.url)
    assert lemonade.resolve_url(None) == server.url + "/api/v1"


def test_kv_policy_maps_to_llamacpp_cache_types() -> None:
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.backends.lemonade import llamacpp_args

    assert llamacpp_args(resolve_settings("int8", use_env=False).policy) == "--cache-type-k q8_0 --cache-type-v q8_0"
    assert llamacpp_args(resolve_settings("int4", use_env=False).policy) == "--cache-type-k q4_0 --cache-type-v q4_0"
    assert llamacpp_args(resolve_settings("int4-k8v4", use_env=False).policy) == "--cache-type-k q8_0 --cache-type-v q4_0"
    assert llamacpp_args(resolve_settings("baseline", use_env=False).policy) is None


class _LlamaCppLemonade(BaseHTTPRequestHandler):
    """A minimal Lemonade stand-in whose model uses the llamacpp recipe; records /load bodies."""

    loads: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _json(self, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/api/v1/health"):
            self._json({"status": "ok", "version": "10.3.0", "model_loaded": None, "all_models_loaded": []})
        elif self.path.startswith("/api/v1/models"):
            self._json({"data": [{"id": "Qwen3-0.6B-GGUF", "recipe": "llamacpp", "downloaded": True}]})
        else:
            self.send_error(404)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/v1/load":
            self.loads.append(body)
            self._json({"status": "success"})
        else:
            self.send_error(404)


def test_llamacpp_recipe_gets_the_kv_policy_at_load() -> None:
    from inferos_cli.backends import open_backend
    from inferos_cli.profiles import resolve_settings

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _LlamaCppLemonade)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        policy = resolve_settings("int4-k8v4", flags={"kv": {"max_tokens": 4096}}).policy
        backend = open_backend("lemonade", model="Qwen3-0.6B-GGUF", url=url, policy=policy)
        assert backend.describe()["recipe"] == "llamacpp"
        assert _LlamaCppLemonade.loads[-1] == {"model_name": "Qwen3-0.6B-GGUF", "ctx_size": 4096,
                                               "llamacpp_args": "--cache-type-k q8_0 --cache-type-v q4_0"}
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_gaia_backend_streams_gaia_output(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not GAIA_EXE:
        pytest.skip("GAIA CLI not installed: python -m venv /tmp/venv-gaia && /tmp/venv-gaia/bin/pip install "
                    "amd-gaia, then INFEROS_GAIA_EXE=/tmp/venv-gaia/bin/gaia")
    from inferos_cli.backends import open_backend
    from inferos_cli.engine.sampling import GenerationConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GAIA_CTX_SIZE", "512")
    monkeypatch.delenv("LEMONADE_BASE_URL", raising=False)
    backend = open_backend("gaia", model=server.service.info.name, url=server.url, gaia_exe=GAIA_EXE)
    events = list(backend.generate(PROMPT, GenerationConfig(max_tokens=16)))
    assert events[0].kind == "prefill" and events[-1].kind == "done"
    text = "".join(e.text for e in events if e.kind == "token").strip()
    assert text == _served_text(server, 16, chat=True).strip()
    done = events[-1]
    assert done.generated == 16 and done.extra["stats_source"] in ("gaia --stats output", "server /stats")
    assert done.ttft_s is not None and done.ttft_s > 0


def test_gaia_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.errors import BackendError
    from inferos_cli.backends.gaia import find_gaia

    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("INFEROS_GAIA_EXE", raising=False)  # conftest keeps it for the GAIA tests
    with pytest.raises(BackendError) as err:
        find_gaia()
    assert "pip install amd-gaia" in err.value.one_line()
    with pytest.raises(BackendError):
        find_gaia("/nonexistent/gaia")


def test_unknown_backend_is_a_usage_error() -> None:
    from inferos_cli.errors import UsageError
    from inferos_cli.backends import open_backend

    with pytest.raises(UsageError):
        open_backend("vllm")


class _OneModelServer(BaseHTTPRequestHandler):
    """`inferos serve` as GAIA sees it: /health names the one loaded model."""

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/api/v1/health"):
            data = json.dumps({"status": "ok", "model_loaded": "stories-onnx"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)


def test_gaia_without_model_asks_for_the_servers_model(tmp_path: Path) -> None:
    """Issue 17 item 10d: without `-m`, GAIA is given the server's loaded model, not left on its own default
    (which `inferos serve` does not hold). A fake `gaia` executable records its argv and answers."""
    import sys

    from inferos_cli.backends import open_backend
    from inferos_cli.engine.sampling import GenerationConfig

    argv_file = tmp_path / "argv.json"
    fake = tmp_path / "gaia"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
                    "print('gaia: Once upon a time there was a cat.')\n", encoding="utf-8")
    fake.chmod(0o755)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _OneModelServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        backend = open_backend("gaia", model=None, url=url, gaia_exe=str(fake))
        assert backend.describe()["model"] == "stories-onnx"
        events = list(backend.generate(PROMPT, GenerationConfig(max_tokens=8)))
        argv = json.loads(argv_file.read_text())
        assert argv[argv.index("--model") + 1] == "stories-onnx"
        assert "".join(e.text for e in events if e.kind == "token").strip() == "Once upon a time there was a cat."
        named = open_backend("gaia", model="other", url=url, gaia_exe=str(fake))  # -m still wins
        assert named.command("x", 4)[2:6] == ["x", "--model", "other", "--base-url"]
    finally:
        httpd.shutdown()
        httpd.server_close()
