"""A real uvicorn server on 127.0.0.1 in a background thread, for tests that talk HTTP to `inferos serve`,
and :class:`Served`: a service on a model folder, its app and such a server."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class ServerThread:
    """Serve an ASGI app on a free (or given) loopback port until :meth:`stop`."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        """Start and wait until uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def make_service(folder: Path, profile: str | None = None, **kwargs: Any) -> Any:
    """An :class:`~inferos_cli.server.service.InferenceService` on a model folder (no environment layer)."""
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.server.service import InferenceService

    info = inspect_folder(folder)
    resolved = resolve_settings(profile, param_count=info.param_count, use_env=False)
    return InferenceService(info, resolved, profile=profile, snapshot_interval_s=0.2, **kwargs)


class Served:
    """A service, its app and a uvicorn thread on a free loopback port; ``client`` is an httpx client."""

    def __init__(self, folder: Path, token: str | None = None, max_body: int = 64 * 1024, **kwargs: Any) -> None:
        import httpx

        from inferos_cli.server.app import ServerState, create_app

        self.service = make_service(folder, **kwargs)
        self.app = create_app(ServerState(service=self.service, token=token, max_body_bytes=max_body))
        self.server = ServerThread(self.app).start()
        self.url = self.server.url
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self) -> None:
        """Stop the client, the server and the service."""
        self.client.close()
        self.server.stop()
        self.service.close()


@contextmanager
def serve(folder: Path, token: str | None = None) -> Iterator[tuple[str, Any]]:
    """A service on ``folder`` behind its app (as `inferos serve` builds it) on a free loopback port:
    ``(url, client)``, the httpx client sending ``token`` when one is set."""
    import httpx

    from inferos_cli.server.app import ServerState, create_app

    service = make_service(folder)
    server = ServerThread(create_app(ServerState(service=service, token=token))).start()
    client = httpx.Client(base_url=server.url, timeout=60, headers={"X-Inferos-Token": token} if token else {})
    try:
        yield server.url, client
    finally:
        client.close()
        server.stop()
        service.close()
