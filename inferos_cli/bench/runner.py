"""Who runs a bench config: :class:`Runner` (the interface) and :class:`WorkerProcess`, a fresh
``python -m inferos_cli.bench.worker`` subprocess holding one config's model for one cell.

The worker gets the model folder and the settings the parent already resolved (as JSON), never a
profile name to resolve again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from inferos_cli.errors import BackendError


class Runner:
    """Something that can run one measured generation for a config: a worker subprocess or a peer."""

    def load(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover
        pass


class WorkerProcess(Runner):
    """A fresh worker subprocess holding one config's model (``kind`` ``engine`` with its resolved
    ``settings`` as JSON, or ``ort-genai``).

    Requests and replies are JSON lines over the worker's stdin/stdout; its stderr goes to a temp file
    whose last line is quoted when it fails.
    """

    def __init__(self, name: str, kind: str, model_path: Path, *, settings: dict[str, Any] | None,
                 threads: int | None, strict_devices: bool = False) -> None:
        self.name = name
        self._err = tempfile.TemporaryFile(mode="w+b")
        env = dict(os.environ)
        env.setdefault("PYTHONIOENCODING", "utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inferos_cli.bench.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env,
        )
        self._load_msg = {
            "op": "load", "kind": kind, "model": str(model_path), "settings": settings,
            "threads": threads, "strict_devices": strict_devices,
        }
        self._sent_load = False

    def send_load(self) -> None:
        """Start loading without waiting (workers of one cell load side by side)."""
        self._send(self._load_msg)
        self._sent_load = True

    def load(self) -> dict[str, Any]:
        if not self._sent_load:
            self.send_load()
        return self._recv()

    def run(self, prompts: list[list[int]], gen_tokens: int) -> dict[str, Any]:
        self._send({"op": "run", "prompts": prompts, "gen_tokens": gen_tokens})
        return self._recv()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self._send({"op": "exit"})
                self.proc.wait(timeout=30)
        except Exception:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    if stream:
                        stream.close()
                except OSError:
                    pass
            self._err.close()

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BackendError(f"bench worker for {self.name} exited: {self._stderr_tail()}") from None

    def _recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise BackendError(
                f"bench worker for {self.name} exited (code {self.proc.returncode}): {self._stderr_tail()}"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise BackendError(f"{self.name}: {reply.get('error', 'worker failed')}")
        return reply

    def _stderr_tail(self) -> str:
        try:
            self._err.seek(0)
            lines = [ln for ln in self._err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            return lines[-1].strip() if lines else "no message"
        except OSError:  # pragma: no cover
            return "no message"
