"""`inferos serve`: the control agent and a Lemonade/OpenAI-compatible API over the inferos engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferos_cli.options import ConfigOpt, ModelOpt, ProfileOpt, StrictDevicesOpt, ThreadsOpt


def serve(
    model: ModelOpt = None,
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option("--host", help="Bind address. Anything but loopback needs INFEROS_AGENT_TOKEN.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")] = 7031,
    threads: ThreadsOpt = None,
    strict_devices: StrictDevicesOpt = False,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=64, help="Sequences decoded together (continuous batching).")] = 4,
    auto_tune: Annotated[bool, typer.Option("--auto-tune", help="Keep delta-PPL under quality.max_delta_ppl, tighten under memory pressure.")] = False,
    target_tps: Annotated[Optional[float], typer.Option("--target-tps", min=0.1, help="Auto-tuner throughput target (tokens/s).", show_default=False)] = None,
    max_body: Annotated[int, typer.Option("--max-body-bytes", min=1024, help="Largest request body accepted (bytes).")] = 1024 * 1024,
    install_service: Annotated[bool, typer.Option("--install-service", help="Write a systemd user unit (Linux) / logon task (Windows) for this command and exit.")] = False,
    unit_dir: Annotated[Optional[Path], typer.Option("--unit-dir", help="Folder for the systemd unit (default ~/.config/systemd/user).", show_default=False)] = None,
) -> None:
    """Serve a model: GAIA and OpenAI clients talk to /api/v1 (or /v1); the control API (/v1/health,
    /v1/metrics, /v1/metrics/prometheus, /v1/policy, /v1/baseline, /v1/history) watches and steers it.

    Example: inferos serve --model smollm2-135m --profile chat --port 7031
    """
    from inferos_cli.errors import UsageError
    from inferos_cli.server.security import TOKEN_ENV, agent_token, is_loopback

    token = agent_token()
    if not is_loopback(host) and token is None:
        raise UsageError(
            f"binding to {host} exposes the server beyond this machine and needs a token",
            f"set {TOKEN_ENV} (clients send it as X-Inferos-Token or Authorization: Bearer) or use --host 127.0.0.1",
        )
    if install_service:
        from inferos_cli.server.install import install

        args = _forwarded_args(model, profile, config, host, port, threads, strict_devices, max_batch,
                               auto_tune, target_tps, max_body)
        typer.echo(install(args, unit_dir))
        return

    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.server.service import start_service

    # the model and the settings, resolved once, here
    info = resolve_model(model, progress=True)
    resolved = resolve_settings(profile, param_count=info.param_count, config_path=config)
    service = start_service(info, resolved, profile=profile, threads=threads, strict_devices=strict_devices,
                            max_batch=max_batch, auto_tune=auto_tune, target_tps=target_tps)
    try:
        import uvicorn

        from inferos_cli.server.app import ServerState, create_app

        app = create_app(ServerState(service=service, token=token, max_body_bytes=max_body))
        if port == 0:
            import socket

            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        typer.echo(
            f"inferos serve: {service.info.name} ({service.engine().layout.describe()}) on http://{shown}:{port}\n"
            f"  Lemonade/OpenAI API: http://{shown}:{port}/api/v1   control API: http://{shown}:{port}/v1/health\n"
            f"  auth: {'token required' if token else 'none (loopback only)'}; Ctrl-C stops",
            err=True,
        )
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()


def _forwarded_args(model: str | None, profile: str | None, config: Path | None, host: str, port: int,
                    threads: int | None, strict: bool, max_batch: int, auto_tune: bool,
                    target_tps: float | None, max_body: int) -> list[str]:
    """The serve flags the installed service repeats (paths made absolute)."""
    args: list[str] = []
    if model:
        path = Path(model)
        args += ["--model", str(path.resolve()) if path.exists() else model]
    if profile:
        args += ["--profile", profile]
    if config:
        args += ["--config", str(Path(config).resolve())]
    args += ["--host", host, "--port", str(port), "--max-batch", str(max_batch), "--max-body-bytes", str(max_body)]
    if threads:
        args += ["--threads", str(threads)]
    if strict:
        args.append("--strict-devices")
    if auto_tune:
        args.append("--auto-tune")
    if target_tps:
        args += ["--target-tps", str(target_tps)]
    return args

