"""The AMD GAIA CLI as a backend: ``gaia llm "PROMPT" --model M --base-url URL --max-tokens N --stats``
run as a subprocess (no shell), its answer streamed from stdout. Without a model, ``M`` is the model the
server has loaded (:func:`loaded_model`), not GAIA's own default.

GAIA prints status lines (log records, ``🔄 Loading model``, ``✅ Model loaded``) around the model's
text after the ``gaia:`` marker; those are filtered out. Timings: GAIA's own ``--stats`` output when it
prints any, else the Lemonade ``/stats`` of the server it talked to (the server measured them); the
client-side time to the first text includes GAIA's start-up and is reported separately as
``extra["first_text_s"]``.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from inferos_cli.backends.lemonade import PROBE_TIMEOUT_S, get_json, resolve_url
from inferos_cli.errors import BackendError
from inferos_cli.events import Event, RunStats

EXE_ENV = "INFEROS_GAIA_EXE"
MARKER = "gaia:"
_STATUS_PREFIXES = ("🔄", "✅", "⚠", "❌", "ℹ", "💡", "📊", "🚀")
_LOG_LINE = re.compile(r"^\[\d{4}-\d{2}-\d{2} [\d:]+\]\s*\|")
_STAT_PATTERNS = {
    "time_to_first_token": re.compile(r"(?:time[ _]to[ _]first[ _]token|ttft)\W*([0-9.]+)\s*(ms|s)?", re.I),
    "tokens_per_second": re.compile(r"(?:tokens[ _]per[ _]second|tokens/s|tok/s)\W*([0-9.]+)", re.I),
    "input_tokens": re.compile(r"input[ _]tokens\W*([0-9]+)", re.I),
    "output_tokens": re.compile(r"output[ _]tokens\W*([0-9]+)", re.I),
}


def find_gaia(exe: str | None = None) -> str:
    """The GAIA executable: ``exe``, ``INFEROS_GAIA_EXE``, ``gaia`` or ``gaia-cli`` on PATH."""
    for candidate in (exe, os.environ.get(EXE_ENV)):
        if candidate:
            if Path(candidate).is_file() or shutil.which(candidate):
                return str(shutil.which(candidate) or candidate)
            raise BackendError(f"GAIA executable {candidate!r} not found", "pip install amd-gaia, or fix the path")
    for name in ("gaia", "gaia-cli"):
        found = shutil.which(name)
        if found:
            return found
    raise BackendError("GAIA is not installed (no `gaia` or `gaia-cli` on PATH)",
                       f"pip install amd-gaia (or set {EXE_ENV} to its executable)")


def parse_stats(text: str) -> dict[str, float]:
    """Numbers GAIA's ``--stats`` printed (keys as Lemonade's ``/stats``); empty when it printed none."""
    out: dict[str, float] = {}
    for key, pattern in _STAT_PATTERNS.items():
        match = pattern.search(text)
        if match:
            value = float(match.group(1))
            if key == "time_to_first_token" and (match.group(2) or "").lower() == "ms":
                value /= 1000.0
            out[key] = value
    return out


def is_status_line(line: str) -> bool:
    """True for GAIA's log records and emoji status lines (not model text)."""
    stripped = line.strip()
    return bool(_LOG_LINE.match(stripped)) or stripped.startswith(_STATUS_PREFIXES)


def loaded_model(url: str) -> str | None:
    """The model the server at ``url`` has loaded (``/health``'s ``model_loaded``), or None.

    Without ``--model`` GAIA asks for its own default model, which ``inferos serve`` (one model) does not
    hold; the server's loaded model is what a user running ``inferos run --backend gaia`` means. None (no
    answer, nothing loaded) leaves GAIA's default to a Lemonade server that can load it."""
    try:
        health = get_json(url + "/health", timeout=PROBE_TIMEOUT_S)
    except BackendError:
        return None
    loaded = health.get("model_loaded") if isinstance(health, dict) else None
    return str(loaded) if loaded else None


class GaiaBackend:
    """Run prompts through the GAIA CLI against a Lemonade-compatible server."""

    name = "gaia"

    def __init__(self, *, model: str | None, url: str | None = None, exe: str | None = None,
                 timeout_s: float = 600.0) -> None:
        self.exe = find_gaia(exe)
        self.url = resolve_url(url)
        self.model = model or loaded_model(self.url)
        self.timeout_s = timeout_s

    def describe(self) -> dict[str, Any]:
        """Executable, URL, model."""
        return {"backend": self.name, "exe": self.exe, "url": self.url, "model": self.model,
                "providers": {"prefill": "gaia -> lemonade", "decode": "gaia -> lemonade"}}

    def command(self, prompt: str, max_tokens: int) -> list[str]:
        """The argv (no shell)."""
        cmd = [self.exe, "llm", prompt, "--base-url", self.url, "--max-tokens", str(int(max_tokens)), "--stats"]
        if self.model:
            cmd[3:3] = ["--model", self.model]
        return cmd

    def generate(self, prompt: str, config: Any, *, chat: bool | None = None, system: str | None = None) -> Iterator[Event]:
        """Stream GAIA's answer as token events (one per text chunk it flushed); ``done`` carries stats."""
        env = dict(os.environ)
        env.setdefault("LEMONADE_BASE_URL", self.url)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(self.command(prompt, config.max_tokens), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env)
        except OSError as exc:
            raise BackendError(f"cannot start GAIA ({self.exe}): {exc}", "pip install amd-gaia") from None
        stderr_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read() if proc.stderr else b""),
                                  daemon=True)
        reader.start()
        timer = threading.Timer(self.timeout_s, proc.kill)
        timer.start()
        provider = self.describe()["providers"]
        buffer = ""
        seen_marker = False
        pending_line = ""
        answer: list[str] = []
        t_first: float | None = None
        chunks = 0
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            assert proc.stdout is not None
            while True:
                raw = os.read(proc.stdout.fileno(), 4096)
                if not raw:
                    break
                buffer += decoder.decode(raw)
                if not seen_marker:
                    idx = buffer.find(MARKER)
                    if idx < 0:
                        continue
                    seen_marker = True
                    buffer = buffer[idx + len(MARKER):].lstrip(" ")
                # split off complete lines to filter status lines; a partial line is text in flight
                text_out = ""
                pending_line += buffer
                buffer = ""
                while "\n" in pending_line:
                    line, pending_line = pending_line.split("\n", 1)
                    if not is_status_line(line):
                        text_out += line + "\n"
                if pending_line and not is_status_line(pending_line) and not _could_be_status(pending_line):
                    text_out += pending_line
                    pending_line = ""
                if text_out:
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                        yield Event(kind="prefill", t=now, provider=provider,
                                    extra={"first_text_s": now - t0})
                    chunks += 1
                    answer.append(text_out)
                    yield Event(kind="token", t=now, text=text_out, generated=chunks, provider=provider)
            tail = pending_line + decoder.decode(b"", final=True)
            if seen_marker and tail.strip() and not is_status_line(tail):
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    yield Event(kind="prefill", t=now, provider=provider, extra={"first_text_s": now - t0})
                chunks += 1
                answer.append(tail)
                yield Event(kind="token", t=now, text=tail, generated=chunks, provider=provider)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
        err = b"".join(stderr_chunks).decode("utf-8", "replace")
        if code != 0:
            last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), f"exit code {code}")
            raise BackendError(f"gaia failed: {last.strip()}", f"check that {self.url} serves the model")
        full = "".join(answer)
        stats = parse_stats(full + "\n" + err)
        source = "gaia --stats output" if stats else None
        if not stats:
            try:
                server = get_json(self.url + "/stats", timeout=10)
                stats = {k: server[k] for k in ("time_to_first_token", "tokens_per_second", "input_tokens",
                                                "output_tokens") if server.get(k) is not None}
                source = "server /stats"
            except BackendError:
                stats, source = {}, None
        done = Event(
            kind="done", t=time.perf_counter(), prompt_tokens=int(stats.get("input_tokens") or 0),
            generated=int(stats.get("output_tokens") or chunks), ttft_s=stats.get("time_to_first_token"),
            decode_tps=stats.get("tokens_per_second"), provider=provider, finish_reason="stop",
            extra={"stats_source": source, "first_text_s": (t_first - t0) if t_first else None,
                   "wall_s": time.perf_counter() - t0, "text": full.strip()},
        )
        # only the reported figures are folded: the client's time to first text includes GAIA's start-up
        folded = RunStats(t0=t0)
        folded.add(done)
        done.prefill_tps = folded.prefill_tps
        yield done

    def close(self) -> None:
        """Nothing held between prompts."""


def _could_be_status(fragment: str) -> bool:
    """A partial line that may still become a log record or a status line: hold it back."""
    stripped = fragment.lstrip()
    return stripped.startswith(("[", *_STATUS_PREFIXES)) or stripped == ""
