"""ASGI responses bound to one request of the service: while the answer is produced, the client's
connection is watched, and the request is cancelled as soon as the client goes away (a queued job is
dropped, a batcher row retires at the next step) instead of generating ``max_tokens`` for nobody.

Starlette's own :class:`~starlette.responses.StreamingResponse` notices a gone client only when a write
fails (ASGI 2.4 servers such as uvicorn) and never closes a sync body iterator, so the engine would run on;
a non-streaming answer is built before anything is written. Both responses here listen for
``http.disconnect`` themselves and call ``cancel`` (idempotent) when it comes, and again when they end.
"""

from __future__ import annotations

from typing import Any, Callable

import anyio
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (the request body was read already: nothing else comes)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class CancellingStream(StreamingResponse):
    """An SSE (or any streamed) body; ``cancel()`` runs when the client disconnects or the body ends."""

    def __init__(self, content: Any, cancel: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    await _wait_for_disconnect(receive)
                    self.cancel()  # before cancelling the writer: its thread waits for the stream's next event
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away between two chunks
                    pass
                group.cancel_scope.cancel()
        finally:
            self.cancel()


class CancellingJSON(Response):
    """A JSON answer built by ``build()`` in a worker thread (it iterates the request's events); the
    client is watched meanwhile, and nothing is sent when it left."""

    def __init__(self, build: Callable[[], dict[str, Any]], cancel: Callable[[], None]) -> None:
        super().__init__(media_type="application/json")
        self.build = build
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: dict[str, Any] = {}
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    await _wait_for_disconnect(receive)
                    outcome["gone"] = True
                    self.cancel()

                group.start_soon(watch)
                try:
                    outcome["body"] = await anyio.to_thread.run_sync(self.build)
                except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                    outcome["error"] = exc
                group.cancel_scope.cancel()
        finally:
            self.cancel()
        if outcome.get("gone"):
            return
        if "error" in outcome:
            raise outcome["error"]  # the app's exception handlers answer it (4xx/5xx JSON)
        await JSONResponse(outcome["body"])(scope, receive, send)
