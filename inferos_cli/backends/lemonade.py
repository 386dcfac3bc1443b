"""A Lemonade server (or `inferos serve`): the one rule for its URL, one streaming client, and the backend.

- URL rule (:func:`candidate_urls`, :func:`resolve_url`): an explicit URL, else ``LEMONADE_BASE_URL``,
  else ``http://localhost:13305/api/v1`` (Lemonade v10.1+), then ``:8000`` (older). A URL without a path
  gets ``/api/v1``. :func:`resolve_url` picks the first default that answers ``/health``.
- Client (:func:`stream_completion`): ``POST /completions`` (a prompt) or ``/chat/completions`` (messages)
  with ``stream_options.include_usage``; yields each text chunk with the time it arrived and keeps the
  server's usage and finish reason. The backend here and the bench's Lemonade peer both stream through it.
- Backend (:class:`LemonadeBackend`): ``/load {model_name, ctx_size}``; for llamacpp-recipe models the KV
  policy becomes ``llamacpp_args`` (``--cache-type-k/--cache-type-v q8_0|q4_0``). TTFT and tokens/s are
  measured client-side from the stream and folded by :class:`~inferos_cli.events.RunStats`; the server's
  ``/stats`` and ``/system-stats`` are read after each request into ``done.extra`` and ``util``.

HTTP is the standard library's ``urllib``; ``INFEROS_AGENT_TOKEN`` or ``LEMONADE_API_KEY`` is sent as a
bearer token when set.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

from inferos_cli.errors import BackendError, ModelNotFoundError
from inferos_cli.events import Event, RunStats

URL_ENV = "LEMONADE_BASE_URL"
DEFAULT_URLS = ("http://localhost:13305/api/v1", "http://localhost:8000/api/v1")
PROBE_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 600.0

_CACHE_TYPES = {"auto": ("q8_0", "q8_0"), "int8": ("q8_0", "q8_0"), "int4": ("q4_0", "q4_0"), "int4-k8v4": ("q8_0", "q4_0"),
                "int8-fused": ("q8_0", "q8_0"), "tiered": ("q8_0", "q8_0"), "fp16": ("f16", "f16")}


# ------------------------------------------------------------------------------------------ URL rule


def normalize_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/api/v1``; a URL with a path is kept (no trailing /)."""
    from urllib.parse import urlparse

    url = url.strip().rstrip("/")
    if not urlparse(url).path:
        url += "/api/v1"
    return url


def configured_url(url: str | None = None) -> str | None:
    """``url`` when given, else ``LEMONADE_BASE_URL`` when set, normalized; None when neither is."""
    chosen = (url or "").strip() or os.environ.get(URL_ENV, "").strip()
    return normalize_url(chosen) if chosen else None


def candidate_urls(url: str | None = None) -> list[str]:
    """Where Lemonade may be: the :func:`configured_url` when there is one, else the defaults (:13305 for
    Lemonade v10.1+, then :8000 for older ones)."""
    chosen = configured_url(url)
    return [chosen] if chosen else list(DEFAULT_URLS)


def default_url(url: str | None = None) -> str:
    """The first of :func:`candidate_urls`, without asking any server."""
    return candidate_urls(url)[0]


def resolve_url(url: str | None) -> str:
    """The :func:`configured_url`, else the first default that answers ``/health``."""
    chosen = configured_url(url)
    if chosen:
        return chosen
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


# ---------------------------------------------------------------------------------------------- HTTP


class ServerHTTPError(BackendError):
    """The server answered with an HTTP error: ``status`` and the server's own message in ``detail``."""

    def __init__(self, message: str, status: int, detail: str, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.status = status
        self.detail = detail


def _request(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = REQUEST_TIMEOUT_S,
             accept: str = "application/json") -> Any:
    data = json.dumps(body).encode("utf-8") if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Accept": accept})
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
        text = _error_text(exc)
        raise ServerHTTPError(f"{url} answered {exc.code}: {text}", exc.code, text) from None
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
        raise ServerHTTPError(f"{url} answered {exc.code}: {text}", exc.code, text) from None
    except (urllib.error.URLError, OSError) as exc:
        raise BackendError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def probe_json(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int | None, Any, str]:
    """GET ``url`` without raising: (status or None, parsed JSON or text, error). No proxy (local servers)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers={"Accept": "application/json"}), timeout=timeout) as resp:
            body = resp.read(65536).decode("utf-8", errors="replace")
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, None, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, None, str(getattr(exc, "reason", exc))
    try:
        return status, json.loads(body), ""
    except json.JSONDecodeError:
        return status, body.strip()[:200], ""


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


# --------------------------------------------------------------------------------- streaming client


@dataclass(frozen=True)
class StreamChunk:
    """One piece of generated text and when it arrived (``time.perf_counter``)."""

    t: float
    text: str


class CompletionStream:
    """One streamed completion, already requested. Iterate for :class:`StreamChunk` s; once the stream ends,
    ``usage`` (the server's usage chunk, or ``{}``), ``finish_reason``, ``chunks`` and the
    ``completion_tokens`` / ``prompt_tokens`` properties hold what the server said."""

    def __init__(self, resp: Any, *, chat: bool) -> None:
        self._resp = resp
        self.chat = chat
        self.usage: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.chunks = 0

    def __iter__(self) -> Iterator[StreamChunk]:
        with self._resp as resp:
            for data in sse_lines(resp):
                if "error" in data:
                    err = data["error"]
                    raise BackendError(f"server error: {err.get('message', err) if isinstance(err, dict) else err}")
                if isinstance(data.get("usage"), dict) and data["usage"]:
                    self.usage = data["usage"]
                for choice in data.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
                    if not text:
                        continue
                    self.chunks += 1
                    yield StreamChunk(time.perf_counter(), text)

    def close(self) -> None:
        """Drop the connection (when the stream is not read to its end)."""
        self._resp.close()

    @property
    def completion_tokens(self) -> int:
        """Generated tokens: the server's usage count, else the number of text chunks."""
        return int(self.usage.get("completion_tokens") or self.chunks)

    @property
    def prompt_tokens(self) -> int | None:
        """Prompt tokens from the server's usage chunk, None when it sent none."""
        value = self.usage.get("prompt_tokens")
        return int(value) if value is not None else None


def stream_completion(url: str, model: str | None, *, prompt: str | None = None,
                      messages: list[dict[str, Any]] | None = None, max_tokens: int,
                      timeout: float = REQUEST_TIMEOUT_S, **params: Any) -> CompletionStream:
    """Send one streaming completion to ``url`` (a normalized base URL) and return its stream.

    ``prompt`` goes to ``/completions``, ``messages`` to ``/chat/completions``; ``params`` are further
    request fields (``temperature``, ``top_k``, ``seed``, ``stop``...). The request is sent here, so an HTTP
    error raises :class:`ServerHTTPError` (``status``, ``detail``) before any chunk, and an unreachable
    server :class:`~inferos_cli.errors.BackendError`."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt= or messages=")
    chat = messages is not None
    endpoint = "/chat/completions" if chat else "/completions"
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": int(max_tokens), **params}
    if chat:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    try:
        resp = _request("POST", url + endpoint, body, timeout=timeout, accept="text/event-stream")
    except urllib.error.HTTPError as exc:
        text = _error_text(exc)
        raise ServerHTTPError(f"{url}{endpoint} answered {exc.code}: {text}", exc.code, text) from None
    except (urllib.error.URLError, OSError) as exc:
        raise BackendError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    return CompletionStream(resp, chat=chat)


# ------------------------------------------------------------------------------------------- backend


def llamacpp_args(policy: Any) -> str | None:
    """The KV policy as llama.cpp cache types, None for the baseline (fp16 cache).

    llama.cpp has one cache type per tensor, no tiers: ``tiered`` maps to q8_0 (its near-lossless setting)."""
    kv = policy.kv
    if not kv.enabled:
        return None
    k, v = _CACHE_TYPES[kv.quant]
    return f"--cache-type-k {k} --cache-type-v {v}"


def sampling_params(config: Any) -> dict[str, Any]:
    """A :class:`~inferos_cli.engine.sampling.GenerationConfig` as request fields (defaults left out)."""
    params: dict[str, Any] = {"temperature": float(config.temperature)}
    if config.top_k:
        params["top_k"] = int(config.top_k)
    if config.top_p != 1.0:
        params["top_p"] = float(config.top_p)
    if config.repetition_penalty != 1.0:
        params["repeat_penalty"] = float(config.repetition_penalty)
    if config.seed is not None:
        params["seed"] = int(config.seed)
    if config.stop:
        params["stop"] = list(config.stop)[:4]
    return params


class LemonadeBackend:
    """Generate through a Lemonade-compatible server.

    ``policy`` is the resolved policy: its KV settings become ``llamacpp_args`` for a llamacpp-recipe model
    and its ``kv.max_tokens`` the ``ctx_size`` (unless ``ctx_size`` is given); None sends neither."""

    name = "lemonade"

    def __init__(self, *, model: str | None, policy: Any = None, url: str | None = None,
                 ctx_size: int | None = None) -> None:
        self.url = resolve_url(url)
        self.policy = policy
        health = get_json(self.url + "/health", timeout=PROBE_TIMEOUT_S * 5)
        self.server_version = health.get("version")
        self.model = model or health.get("model_loaded")
        if not self.model:
            raise BackendError(f"no model is loaded on {self.url}", "pass --model NAME (see GET /models)")
        self.recipe = self._recipe()
        self.ctx_size = ctx_size or (policy.kv.max_tokens if policy is not None else None)
        self.load_args = llamacpp_args(policy) if self.recipe == "llamacpp" and policy is not None else None
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
        text_in: dict[str, Any] = (
            {"messages": ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]}
            if use_chat else {"prompt": prompt})
        provider = self.describe()["providers"]
        stats = RunStats()
        try:
            stream = stream_completion(self.url, self.model, max_tokens=config.max_tokens, **text_in,
                                       **sampling_params(config))
        except ServerHTTPError as exc:
            if exc.status == 404:
                raise ModelNotFoundError(f"{self.url}: {exc.detail}") from None
            raise
        ttft: float | None = None
        for chunk in stream:
            if ttft is None:
                ttft = chunk.t - stats.t0
                ev = Event(kind="prefill", t=chunk.t, ttft_s=ttft, provider=provider)
                stats.add(ev)
                yield ev
            ev = Event(kind="token", t=chunk.t, text=chunk.text, generated=stream.chunks, ttft_s=ttft,
                       provider=provider)
            stats.add(ev)
            yield ev
        server_stats, system_stats = self._server_stats()
        util = {"cpu": system_stats.get("cpu_percent"), "gpu": system_stats.get("gpu_percent"),
                "npu": system_stats.get("npu_percent")}
        done = Event(
            kind="done", t=time.perf_counter(), prompt_tokens=stream.prompt_tokens or 0,
            generated=stream.completion_tokens, util=util, provider=provider,
            finish_reason=stream.finish_reason or "stop",
            extra={"server_stats": server_stats, "server_system_stats": system_stats, "chunks": stream.chunks,
                   "timing": "client-side, from the SSE stream"},
        )
        stats.add(done)
        done.ttft_s, done.prefill_tps, done.decode_tps = stats.ttft_s, stats.prefill_tps, stats.decode_tps
        yield done

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
