"""Transport guards of `inferos serve`: loopback detection, the agent token, a request body size limit.

Pure ASGI middlewares (no BaseHTTPMiddleware) so they also guard streaming responses.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Any, Awaitable, Callable

TOKEN_ENV = "INFEROS_AGENT_TOKEN"
TOKEN_HEADER = "x-inferos-token"
DEFAULT_MAX_BODY = 1024 * 1024  # 1 MiB

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; False for 0.0.0.0, :: and any other address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def agent_token() -> str | None:
    """The configured agent token (``INFEROS_AGENT_TOKEN``), None when unset or empty."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    return value or None


def token_ok(expected: str, headers: dict[str, str]) -> bool:
    """Constant-time check of ``X-Inferos-Token`` or ``Authorization: Bearer``."""
    given = headers.get(TOKEN_HEADER)
    if given is None:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    """Send a complete JSON response from a middleware."""
    data = json.dumps(body).encode("utf-8")
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": data})


def error_body(message: str, kind: str, **extra: Any) -> dict[str, Any]:
    """The one error shape of the server (OpenAI style): ``{"error": {"message", "type", ...}}``."""
    return {"error": {"message": message, "type": kind, **extra}}


#: Pages that carry no data (the dashboard's shell asks for the token and sends it with every data request).
PUBLIC_PAGES = frozenset({"/", "/dashboard"})


class TokenMiddleware:
    """Refuse every request without the agent token (401), when a token is configured; only ``GET``/``HEAD``
    of the data-free :data:`PUBLIC_PAGES` pass, so a browser can open the dashboard and be asked for it."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD") and scope.get("path") in PUBLIC_PAGES:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not token_ok(self.token, headers):
            await send_json(
                send, 401,
                error_body("missing or wrong agent token: send X-Inferos-Token or Authorization: Bearer",
                           "unauthorized"),
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answer 413 for request bodies over ``max_bytes`` (declared or streamed), before any route runs."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = error_body(f"request body larger than {self.max_bytes} bytes", "payload_too_large")
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, error_body("bad Content-Length header", "invalid_request_error"))
                    return
                if declared > self.max_bytes:
                    await send_json(send, 413, too_big)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await send_json(send, 413, too_big)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
