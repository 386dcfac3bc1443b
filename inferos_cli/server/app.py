"""FastAPI app factory of `inferos serve`: the control API at ``/v1/...`` and the Lemonade/OpenAI API at
``/api/v1/...`` and ``/v1/...``; error handlers that answer 4xx with a message and never leak a traceback;
body size limit; agent token when configured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inferos_cli.server.security import DEFAULT_MAX_BODY, error_body

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from inferos_cli.server.service import InferenceService


@dataclass
class ServerState:
    """What the app needs: the service, the agent token (None: no auth) and the body limit."""

    service: "InferenceService"
    token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    extra: dict[str, Any] = field(default_factory=dict)


def create_app(state: ServerState) -> "FastAPI":
    """Build the app for one service."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from inferos_cli import __version__
    from inferos_cli.errors import ContextOverflowError, InferosError, ModelNotFoundError
    from inferos_cli.server.service import ServiceBusy
    from inferos_cli.server import control, dashboard, lemonade_api
    from inferos_cli.server.prom import PromMetrics
    from inferos_cli.server.security import BodyLimitMiddleware, TokenMiddleware

    app = FastAPI(title="inferos serve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    service = state.service
    prom = PromMetrics(service)
    app.state.inferos = state
    app.state.prom = prom

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(status_code=400, content=error_body("request body is not valid JSON", "invalid_json"))
        fields = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type", "")}
                  for e in errors]
        first = fields[0] if fields else {"loc": [], "msg": "invalid request"}
        message = f"invalid request: {'.'.join(first['loc'])}: {first['msg']}"
        return JSONResponse(status_code=422, content=error_body(message, "invalid_request_error", fields=fields))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail), "http_error"))

    @app.exception_handler(InferosError)
    async def _inferos(request: Request, exc: InferosError) -> JSONResponse:
        status = 400
        if isinstance(exc, ModelNotFoundError):
            status = 404
        elif isinstance(exc, ServiceBusy):
            status = 503
        elif isinstance(exc, ContextOverflowError):
            status = 400
        return JSONResponse(status_code=status, content=error_body(exc.one_line(), type(exc).__name__))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return JSONResponse(status_code=500, content=error_body(f"internal error: {message}", "server_error"))

    app.include_router(control.router(service, prom))
    lemonade = lemonade_api.router(service)
    app.include_router(lemonade, prefix="/api/v1")
    app.include_router(lemonade, prefix="/v1")
    app.include_router(dashboard.router())

    @app.get("/live")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_body_bytes)
    if state.token:
        app.add_middleware(TokenMiddleware, token=state.token)
    return app
