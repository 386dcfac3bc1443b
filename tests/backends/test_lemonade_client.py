"""The one Lemonade URL rule and the streaming client, against a small SSE server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from inferos_cli.backends import lemonade
from inferos_cli.errors import BackendError


def test_url_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEMONADE_BASE_URL", raising=False)
    assert lemonade.candidate_urls() == ["http://localhost:13305/api/v1", "http://localhost:8000/api/v1"]
    assert lemonade.default_url() == "http://localhost:13305/api/v1"
    assert lemonade.candidate_urls("http://h:1/") == ["http://h:1/api/v1"]
    monkeypatch.setenv("LEMONADE_BASE_URL", "http://h:2/v1/")
    assert lemonade.candidate_urls() == ["http://h:2/v1"] and lemonade.default_url() == "http://h:2/v1"
    assert lemonade.resolve_url(None) == "http://h:2/v1"  # configured: not probed
    assert lemonade.default_url("http://h:3") == "http://h:3/api/v1"  # an explicit URL wins over the variable


class _Sse(BaseHTTPRequestHandler):
    """``/api/v1/completions`` streams three pieces and a usage chunk; ``/chat/completions`` is 404."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/api/v1/completions":
            data = json.dumps({"error": {"message": "no chat here"}}).encode()
            self.send_response(404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["temperature"] == 0.0
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        pieces = ["Once", " upon", ""]
        for i, piece in enumerate(pieces):
            choice = {"index": 0, "text": piece, "finish_reason": "length" if i == len(pieces) - 1 else None}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": 4, "completion_tokens": 3}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def sse_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Sse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/api/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_stream_completion_times_chunks_and_keeps_usage(sse_url: str) -> None:
    stream = lemonade.stream_completion(sse_url, "m", prompt="Tell", max_tokens=3, temperature=0.0)
    chunks = list(stream)
    assert [c.text for c in chunks] == ["Once", " upon"]
    assert chunks[0].t <= chunks[1].t
    assert stream.chunks == 2 and stream.finish_reason == "length"
    assert stream.completion_tokens == 3 and stream.prompt_tokens == 4


def test_stream_completion_http_error_has_the_status(sse_url: str) -> None:
    with pytest.raises(lemonade.ServerHTTPError) as err:
        lemonade.stream_completion(sse_url, "m", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert err.value.status == 404 and err.value.detail == "no chat here"
    assert isinstance(err.value, BackendError) and "\n" not in err.value.one_line()
    with pytest.raises(ValueError):
        lemonade.stream_completion(sse_url, "m", max_tokens=3)
