"""Lemonade/OpenAI-compatible routes (mounted under ``/api/v1`` and ``/v1``): health, models, load,
chat/completions, completions (SSE streaming or not), stats, system-stats; and Lemonade's response shapes.

Completions answer with :mod:`inferos_cli.server.responses`, so a client that disconnects cancels its request."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from inferos_cli.server.responses import CancellingJSON, CancellingStream
from inferos_cli.server.schemas import ChatRequest, CompletionRequest, LoadRequest, Sampling
from inferos_cli.server.security import error_body

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.server.service import InferenceService

RECIPE = "inferos-ort"
DEFAULT_NEW_TOKENS = 256


def finish_reason(reason: str | None) -> str:
    """Engine finish reasons -> OpenAI's ``stop`` / ``length``."""
    if reason and any(word in reason for word in ("length", "max", "context")):
        return "length"
    return "stop"


def generation_config(req: Sampling, default_tokens: int = DEFAULT_NEW_TOKENS) -> Any:
    """An engine ``GenerationConfig`` from an OpenAI request (greedy unless a temperature is given)."""
    from inferos_cli.engine.engine import GenerationConfig

    penalty = req.repeat_penalty or req.repetition_penalty or 1.0
    return GenerationConfig(
        max_tokens=req.new_tokens(default_tokens),
        temperature=req.temperature if req.temperature is not None else 0.0,
        top_k=req.top_k or 0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        repetition_penalty=penalty,
        seed=req.seed,
        stop=req.stops(),
    )


def model_entry(service: "InferenceService") -> dict[str, Any]:
    """The served model as a ``/models`` entry."""
    info = service.info
    return {
        "id": info.name, "object": "model", "created": int(service.started), "owned_by": "inferos",
        "checkpoint": str(info.path), "recipe": RECIPE, "downloaded": True, "suggested": True,
        "labels": ["inferos", "llm"], "max_context_window": service.ctx_size,
    }


def check_model(service: "InferenceService", name: str | None) -> JSONResponse | None:
    """404 for a model that is not the served one (None or empty means the served model)."""
    if not name or name in (service.info.name, str(service.info.path)):
        return None
    return JSONResponse(
        status_code=404,
        content=error_body(f"model {name!r} is not loaded; this server serves {service.info.name!r}",
                           "model_not_found", param="model"),
    )


def lemonade_health(service: "InferenceService") -> dict[str, Any]:
    """Lemonade's ``/health`` document for the served model."""
    from inferos_cli import __version__

    info = service.info
    entry = {
        "model_name": info.name, "checkpoint": str(info.path), "recipe": RECIPE, "type": "llm",
        "device": service.decode_device(), "recipe_options": {"ctx_size": service.ctx_size},
    }
    return {
        "status": "ok", "version": __version__, "model_loaded": info.name, "checkpoint_loaded": str(info.path),
        "context_size": service.ctx_size, "all_models_loaded": [entry], "max_models": {"llm": 1},
    }


def lemonade_stats(service: "InferenceService") -> dict[str, Any]:
    """Lemonade's ``/stats``: the last request's measurements (nulls before the first request)."""
    rec = service.recorder.last
    if rec is None:
        return {"time_to_first_token": None, "tokens_per_second": None, "input_tokens": None,
                "output_tokens": None, "decode_token_times": []}
    return {
        "time_to_first_token": rec.ttft_s, "tokens_per_second": rec.decode_tps,
        "input_tokens": rec.prompt_tokens, "output_tokens": rec.generated,
        "decode_token_times": rec.decode_token_times,
    }


def lemonade_system_stats(service: "InferenceService") -> dict[str, Any]:
    """Lemonade's ``/system-stats``: utilisation (real counters or null) and memory."""
    from inferos_cli.server.metrics import rss_gb

    util = service.util()
    return {
        "cpu_percent": util["cpu"], "memory_gb": rss_gb(),
        "gpu_percent": util["gpu"], "vram_gb": service.vram_gb(),
        "npu_percent": util["npu"],
    }


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def router(service: "InferenceService") -> APIRouter:
    """The routes, bound to one service."""
    api = APIRouter()

    @api.get("/health")
    def health() -> dict[str, Any]:
        return lemonade_health(service)

    @api.get("/models")
    def models(show_all: bool = Query(False)) -> dict[str, Any]:
        data = [model_entry(service)]
        if show_all:
            data.extend(_catalog(service))
        return {"object": "list", "data": data}

    @api.get("/models/{model_id:path}")
    def model(model_id: str) -> Any:
        bad = check_model(service, model_id)
        return bad or model_entry(service)

    @api.post("/load")
    def load(req: LoadRequest) -> Any:
        return service.load(req.model_name, req.ctx_size)

    @api.post("/unload")
    def unload() -> dict[str, Any]:
        return {"status": "success", "message": "inferos serve keeps its one model loaded"}

    @api.get("/stats")
    def stats() -> dict[str, Any]:
        return lemonade_stats(service)

    @api.get("/system-stats")
    def system_stats() -> dict[str, Any]:
        return lemonade_system_stats(service)

    @api.post("/chat/completions")
    def chat(req: ChatRequest) -> Any:
        bad = check_model(service, req.model)
        if bad is not None:
            return bad
        ids = service.encode_messages([{"role": m.role, "content": m.text()} for m in req.messages])
        return _respond(service, req, ids, chat=True)

    @api.post("/completions")
    def completions(req: CompletionRequest) -> Any:
        bad = check_model(service, req.model)
        if bad is not None:
            return bad
        try:
            text = req.prompt_text()
        except ValueError as exc:
            return JSONResponse(status_code=400, content=error_body(str(exc), "invalid_request_error", param="prompt"))
        ids = service.encode_text(text)
        return _respond(service, req, ids, chat=False, echo=text if req.echo else "")

    return api


def _catalog(service: "InferenceService") -> list[dict[str, Any]]:
    """Other models inferos knows (cached conversions), for ``?show_all=true``."""
    from inferos_cli.models.resolve import list_cached

    out = []
    try:
        for item in list_cached():
            if item.name and item.name != service.info.name:
                out.append({"id": item.name, "object": "model", "owned_by": "inferos", "recipe": RECIPE,
                            "downloaded": True, "suggested": False, "labels": ["inferos", "llm"]})
    except Exception:  # noqa: BLE001 - a broken cache listing must not break /models
        return out
    return out


def _respond(service: "InferenceService", req: Sampling, ids: list[int], *, chat: bool, echo: str = "") -> Any:
    config = generation_config(req)
    stream = service.submit(ids, config)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    name = service.info.name
    obj = "chat.completion" if chat else "text_completion"
    if not req.stream:
        def build() -> dict[str, Any]:
            parts: list[str] = []
            reason = None
            generated = 0
            for ev in stream:
                if ev.kind == "token":
                    parts.append(ev.text)
                    generated += 1
                elif ev.kind == "done":
                    reason = ev.finish_reason
                    generated = ev.generated or generated
            text = "".join(parts)
            usage = {"prompt_tokens": len(ids), "completion_tokens": generated,
                     "total_tokens": len(ids) + generated}
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": finish_reason(reason), "logprobs": None}
            else:
                choice = {"index": 0, "text": echo + text, "finish_reason": finish_reason(reason), "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": [choice], "usage": usage}

        return CancellingJSON(build, stream.cancel)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_or_text: Any, reason: str | None = None) -> dict[str, Any]:
        if chat:
            choice = {"index": 0, "delta": delta_or_text, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta_or_text, "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": [choice]}

    def events() -> Iterator[str]:
        reason = None
        generated = 0
        try:
            if chat:
                yield _sse(chunk({"role": "assistant", "content": ""}))
            for ev in stream:
                if ev.kind == "token":
                    generated += 1
                    if ev.text:
                        yield _sse(chunk({"content": ev.text} if chat else ev.text))
                elif ev.kind == "done":
                    reason = ev.finish_reason
                    generated = ev.generated or generated
        except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band, one line
            yield _sse(error_body(f"generation failed: {exc}", "server_error"))
            yield _sse("[DONE]")
            return
        yield _sse(chunk({} if chat else "", finish_reason(reason)))
        if include_usage:
            yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": [],
                        "usage": {"prompt_tokens": len(ids), "completion_tokens": generated,
                                  "total_tokens": len(ids) + generated}})
        yield _sse("[DONE]")

    return CancellingStream(events(), stream.cancel, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
