"""A Lemonade server (or `inferos serve`) as a backend: HTTP with the standard library, SSE streaming.

- URL: ``--url``, else ``LEMONADE_BASE_URL``, else ``http://localhost:13305/api/v1``, else ``:8000``
  (Lemonade before v10.1) - the first that answers ``/health``.
- ``/load {model_name, ctx_size}``; for llamacpp-recipe models the KV policy becomes ``llamacpp_args``
  (``--cache-type-k/--cache-type-v q8_0|q4_0``), the way a KV policy reaches a Lemonade-run model.
- TTFT and tokens/s are measured here, client-side, from the stream (same definitions as the engine);
  the server's ``/stats`` and ``/system-stats`` are read after each request into ``done.extra`` and
  ``util`` (its own counters, or None).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

from inferos_cli.errors import BackendError, ModelNotFoundError
from inferos_cli.events import Event

DEFAULT_URLS = ("http://localhost:13305/api/v1", "http://localhost:8000/api/v1")
PROBE_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 600.0

_CACHE_TYPES = {"auto": ("q8_0", "q8_0"), "int8": ("q8_0", "q8_0"), "int4": ("q4_0", "q4_0"), "int4-k8v4": ("q8_0", "q4_0"),
                "int8-fused": ("q8_0", "q8_0"), "tiered": ("q8_0", "q8_0")}


def normalize_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/api/v1``; a URL with a path is kept (no trailing /)."""
    from urllib.parse import urlparse

    url = url.strip().rstrip("/")
    if not urlparse(url).path:
        url += "/api/v1"
    return url


def llamacpp_args(policy: Any) -> str | None:
    """The KV policy as llama.cpp cache types, None for the baseline (fp16 cache).

    llama.cpp has one cache type per tensor, no tiers: ``tiered`` maps to q8_0 (its near-lossless setting)."""
    kv = policy.kv
    if not kv.enabled:
        return None
    k, v = _CACHE_TYPES[kv.quant]
    return f"--cache-type-k {k} --cache-type-v {v}"


def _request(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    data = json.dumps(body).encode("utf-8") if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    token = os.environ.get("INFEROS_AGENT_TOKEN") or os.environ.get("LEMONADE_API_KEY")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) URL given by the user


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(exc.read().decode("utf-8", "replace"))
        err = payload.get("error", payload)
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except Exception:  # noqa: BLE001
        return exc.reason if isinstance(exc.reason, str) else str(exc)


def get_json(url: str, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """GET and parse JSON; BackendError with the server's message on failure."""
    try:
        with _request("GET", url, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise BackendError(f"{url} answered {exc.code}: {_error_text(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BackendError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}",
                           "start the server (lemonade-server serve, or inferos serve) or pass --url") from None


def post_json(url: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """POST JSON and parse the answer; BackendError on failure (404 -> ModelNotFoundError)."""
    try:
        with _request("POST", url, body, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8") or "{}")
    except urllib.error.HTTPError as exc:
        text = _error_text(exc)
        if exc.code == 404:
            raise ModelNotFoundError(f"{url}: {text}", "list models with GET /models") from None
        raise BackendError(f"{url} answered {exc.code}: {text}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BackendError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def resolve_url(url: str | None) -> str:
    """The explicit URL, ``LEMONADE_BASE_URL``, or the first default that answers ``/health``."""
    if url:
        return normalize_url(url)
    env = os.environ.get("LEMONADE_BASE_URL")
    if env:
        return normalize_url(env)
    for candidate in DEFAULT_URLS:
        try:
            get_json(candidate + "/health", timeout=PROBE_TIMEOUT_S)
            return candidate
        except BackendError:
            continue
    raise BackendError(
        f"no Lemonade server answers at {' or '.join(DEFAULT_URLS)}",
        "start one (lemonade-server serve, or inferos serve --port 13305) or pass --url / set LEMONADE_BASE_URL",
    )


def sse_lines(resp: Any) -> Iterator[dict[str, Any]]:
    """Parsed ``data:`` payloads of a server-sent-events response, until ``[DONE]``."""
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            raise BackendError(f"server sent a malformed stream chunk: {payload[:80]!r}") from None


class LemonadeBackend:
    """Generate through a Lemonade-compatible server."""

    name = "lemonade"

    def __init__(self, *, model: str | None, policy: Any, url: str | None = None, ctx_size: int | None = None) -> None:
        self.url = resolve_url(url)
        self.policy = policy
        health = get_json(self.url + "/health", timeout=PROBE_TIMEOUT_S * 5)
        self.server_version = health.get("version")
        self.model = model or health.get("model_loaded")
        if not self.model:
            raise BackendError(f"no model is loaded on {self.url}", "pass --model NAME (see GET /models)")
        self.recipe = self._recipe()
        self.ctx_size = ctx_size or policy.kv.max_tokens
        self.load_args = llamacpp_args(policy) if self.recipe == "llamacpp" else None
        self.load_result = self._load()

    def _recipe(self) -> str | None:
        try:
            catalog = get_json(self.url + "/models?show_all=true")
        except BackendError:
            return None
        for entry in catalog.get("data", []):
            if entry.get("id") == self.model:
                return entry.get("recipe")
        raise ModelNotFoundError(f"model {self.model!r} is not known to {self.url}", "pick one from GET /models")

    def _load(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model_name": self.model}
        if self.ctx_size:
            body["ctx_size"] = int(self.ctx_size)
        if self.load_args:
            body["llamacpp_args"] = self.load_args
        return post_json(self.url + "/load", body)

    def describe(self) -> dict[str, Any]:
        """URL, model, recipe and what the KV policy became."""
        return {"backend": self.name, "url": self.url, "model": self.model, "recipe": self.recipe,
                "server_version": self.server_version, "ctx_size": self.ctx_size, "llamacpp_args": self.load_args,
                "providers": {"prefill": f"lemonade ({self.recipe or 'unknown recipe'})",
                              "decode": f"lemonade ({self.recipe or 'unknown recipe'})"}}

    def generate(self, prompt: str, config: Any, *, chat: bool | None = None, system: str | None = None) -> Iterator[Event]:
        """Stream one request; events carry client-side timings, ``done`` the server's stats too."""
        use_chat = True if chat is None else chat
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": int(config.max_tokens), "temperature": float(config.temperature),
        }
        if config.top_k:
            body["top_k"] = int(config.top_k)
        if config.top_p != 1.0:
            body["top_p"] = float(config.top_p)
        if config.repetition_penalty != 1.0:
            body["repeat_penalty"] = float(config.repetition_penalty)
        if config.seed is not None:
            body["seed"] = int(config.seed)
        if config.stop:
            body["stop"] = list(config.stop)[:4]
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            body["messages"] = messages
            endpoint = "/chat/completions"
        else:
            body["prompt"] = prompt
            endpoint = "/completions"
        provider = self.describe()["providers"]
        t0 = time.perf_counter()
        t_first: float | None = None
        t_last: float | None = None
        chunks = 0
        reason: str | None = None
        usage: dict[str, Any] = {}
        try:
            resp = _request("POST", self.url + endpoint, body)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise ModelNotFoundError(f"{self.url}: {_error_text(exc)}") from None
            raise BackendError(f"{self.url}{endpoint} answered {exc.code}: {_error_text(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BackendError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
        with resp:
            for data in sse_lines(resp):
                if "error" in data:
                    err = data["error"]
                    raise BackendError(f"server error: {err.get('message', err) if isinstance(err, dict) else err}")
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") if use_chat else choice.get("text")
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                    if not text:
                        continue
                    now = time.perf_counter()
                    chunks += 1
                    if t_first is None:
                        t_first = now
                        ttft = now - t0
                        yield Event(kind="prefill", t=now, ttft_s=ttft, provider=provider)
                    t_last = now
                    yield Event(kind="token", t=now, text=text, generated=chunks, ttft_s=t_first - t0,
                                provider=provider)
        generated = int(usage.get("completion_tokens") or chunks)
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        decode_tps = None
        if t_first is not None and t_last is not None and t_last > t_first and generated > 1:
            decode_tps = (generated - 1) / (t_last - t_first)
        ttft = (t_first - t0) if t_first is not None else None
        stats, system_stats = self._server_stats()
        util = {"cpu": system_stats.get("cpu_percent"), "gpu": system_stats.get("gpu_percent"),
                "npu": system_stats.get("npu_percent")}
        yield Event(
            kind="done", t=time.perf_counter(), prompt_tokens=prompt_tokens, generated=generated, ttft_s=ttft,
            prefill_tps=(prompt_tokens / ttft) if ttft and prompt_tokens else None, decode_tps=decode_tps,
            util=util, provider=provider, finish_reason=reason or "stop",
            extra={"server_stats": stats, "server_system_stats": system_stats, "chunks": chunks,
                   "timing": "client-side, from the SSE stream"},
        )

    def _server_stats(self) -> tuple[dict[str, Any], dict[str, Any]]:
        out = []
        for path in ("/stats", "/system-stats"):
            try:
                value = get_json(self.url + path, timeout=PROBE_TIMEOUT_S * 5)
                out.append(value if isinstance(value, dict) else {})
            except BackendError:
                out.append({})
        return out[0], out[1]

    def close(self) -> None:
        """Nothing held between requests."""
