"""The control API (the integration guide's agent): health, metrics (JSON and Prometheus), policy,
baseline toggle, history."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from inferos_cli.server.security import error_body

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.server.service import InferenceService
    from inferos_cli.server.prom import PromMetrics


def field_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic errors as JSON-safe ``{loc, msg, type}`` items."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def control_health(service: "InferenceService") -> dict[str, Any]:
    """The control API's own ``/v1/health`` keys."""
    import time

    from inferos_cli import __version__

    return {
        "status": "ok", "baseline_mode": service.baseline_mode, "model": service.info.name,
        "profile": service.profile, "version": __version__, "uptime_s": time.time() - service.started,
    }


def router(service: "InferenceService", prom: "PromMetrics") -> APIRouter:
    """Control routes bound to one service."""
    api = APIRouter()

    @api.get("/v1/health")
    def health() -> dict[str, Any]:
        from inferos_cli.server.lemonade_api import lemonade_health

        return {**lemonade_health(service), **control_health(service)}  # the guide's keys win; Lemonade's ride along

    @api.get("/v1/metrics")
    def metrics() -> dict[str, Any]:
        return service.metrics()

    @api.get("/v1/metrics/prometheus")
    def prometheus() -> Response:
        body, content_type = prom.render()
        return Response(content=body, media_type=content_type)

    @api.get("/v1/policy")
    def get_policy() -> dict[str, Any]:
        return {"policy": service.configured_policy.model_dump(mode="json"),
                "effective": service.policy.model_dump(mode="json"),
                "baseline_mode": service.baseline_mode, "version": service.policy_version}

    @api.post("/v1/policy")
    def set_policy(partial: dict[str, Any] = Body(...)) -> Any:
        if "policy" in partial and isinstance(partial["policy"], dict) and len(partial) == 1:
            partial = partial["policy"]
        try:
            service.set_policy(partial)
        except ValidationError as exc:
            errors = field_errors(exc)
            first = errors[0] if errors else {"loc": [], "msg": "invalid policy"}
            message = f"invalid policy: {'.'.join(first['loc']) or 'policy'}: {first['msg']} (nothing was changed)"
            return JSONResponse(status_code=422, content=error_body(message, "invalid_policy", fields=errors))
        return get_policy()

    @api.post("/v1/baseline")
    async def baseline(request: Request, enable: Optional[bool] = Query(None)) -> Any:
        if enable is None:
            raw = await request.body()
            if raw.strip():
                import json

                try:
                    data = json.loads(raw)
                except ValueError:
                    return JSONResponse(status_code=400, content=error_body("body is not valid JSON", "invalid_json"))
                value = data.get("enable") if isinstance(data, dict) else None
                if not isinstance(value, bool):
                    return JSONResponse(
                        status_code=422,
                        content=error_body("`enable` must be true or false", "invalid_request_error",
                                           fields=[{"loc": ["body", "enable"], "msg": "must be a boolean",
                                                    "type": "bool_type"}]),
                    )
                enable = value
            else:
                return JSONResponse(status_code=422, content=error_body(
                    "give `enable` as a query parameter or a JSON body {\"enable\": true|false}",
                    "invalid_request_error"))
        state = service.set_baseline(enable)
        return {"baseline_mode": state, "version": service.policy_version}

    @api.get("/v1/history")
    def history(limit: int = Query(100, ge=1, le=100_000)) -> dict[str, Any]:
        items = service.history_tail(limit)
        return {"count": len(items), "items": items}

    return api
