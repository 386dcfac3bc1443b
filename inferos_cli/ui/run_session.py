"""The core of ``inferos run`` behind the thin Typer command: with the model and settings the command
resolved, build the engine (after the auto-tuner, with ``--auto-tune``), start telemetry, generate (one
prompt, a batch from a file, or an interactive chat) and show the events with :mod:`inferos_cli.ui.run_view`.
Returns the exit code (0, or 130 after Ctrl-C)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from inferos_cli.errors import InferosError, UsageError
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.settings import Resolved
from inferos_cli.ui.output import is_terminal

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo


@dataclass
class RunRequest:
    """Everything `inferos run` was asked for."""

    prompt: str | None = None
    model: str | None = None
    profile: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    interactive: bool = False
    json_lines: bool = False
    chat: bool | None = None
    system: str | None = None
    prompts_file: Path | None = None
    threads: int | None = None
    strict_devices: bool = False
    backend: str = "ort"  # ort (in process) | lemonade | gaia (inferos_cli.backends)
    url: str | None = None
    auto_tune: bool = False  # measure and adjust the KV policy before generating (quality.autotune)
    target_tps: float | None = None

    @property
    def local(self) -> bool:
        """True when the in-process engine generates (no ``--backend`` server)."""
        return self.backend == "ort"

    def check(self) -> None:
        """Refuse option combinations that cannot work, before anything is resolved or loaded."""
        if self.local:
            if self.url is not None:
                raise UsageError("--url is for --backend lemonade or gaia", "add --backend lemonade, or drop --url")
            return
        if self.auto_tune:
            raise UsageError(f"--auto-tune tunes the in-process engine, not --backend {self.backend}",
                             "drop --auto-tune, or use the default --backend ort")
        if self.interactive or self.prompts_file is not None:
            raise UsageError(f"--backend {self.backend} runs one prompt (no --interactive / --prompts-file)",
                             "pass a single PROMPT, or use the default --backend ort")

    @property
    def progress(self) -> bool:
        """Show download / conversion progress (a terminal, not ``--json``)."""
        return is_terminal() and not self.json_lines

    @property
    def threads_for_run(self) -> int | None:
        """``--threads``, else every core a ``--prompts-file`` batch wants, else the engine's default."""
        if self.threads or self.prompts_file is None:
            return self.threads
        from inferos_cli.engine.sessions import default_threads

        return default_threads(batched=True)


@dataclass
class AutoTuneResult:
    """What ``run --auto-tune`` measured and decided before generating."""

    decisions: list[dict[str, Any]]
    policy: dict[str, Any]  # the knobs after tuning (autotune.summary)
    before: dict[str, Any]  # the knobs as resolved
    target_tps: float | None = None

    def line(self) -> str:
        """One line for stderr: every decision with its reason, or why nothing changed."""
        kv = self.policy
        knobs = (f"kv {kv['mode']}" if kv.get("mode") == "disabled" else
                 f"kv {kv['mode']} {kv['quant']}, recent window {kv['recent_window']} tokens")
        tps_note = ""
        if self.target_tps and not any("tok/s" in str(d.get("reason")) for d in self.decisions):
            tps_note = (f"; --target-tps {self.target_tps:.1f} tok/s not evaluated (no request throughput is "
                        "measured before a one-shot run)")
        if not self.decisions:
            why = ("KV policy off (baseline): nothing to tune" if kv.get("mode") == "disabled"
                   else "the measured policy is within the quality budget")
            return f"auto-tune: no change ({why}); {knobs}{tps_note}"
        reasons = "; ".join(str(d.get("reason")) for d in self.decisions)
        return f"auto-tune: {len(self.decisions)} decision(s): {reasons}; now {knobs}{tps_note}"

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` line (``kind`` ``autotune``), printed before the generation events."""
        return {"kind": "autotune", "decisions": self.decisions, "policy": self.policy, "before": self.before,
                "target_tps": self.target_tps}


def _tuned_engine(req: RunRequest, info: "ModelInfo", resolved: Resolved) -> tuple[Any, AutoTuneResult]:
    """Let the auto-tuner measure and adjust the resolved policy (``autotune.tune_for_run``), then return
    the engine of the tuned policy (the tuner built it already) and what was decided."""
    from inferos_cli.engine.engine import Engine
    from inferos_cli.quality.autotune import summary, tune_for_run
    from inferos_cli.engine.provider import EngineProvider

    def build(model: "ModelInfo", policy: Any) -> Any:
        settings = Resolved(policy=policy, sources=dict(resolved.sources), profiles=list(resolved.profiles),
                            config_path=resolved.config_path)
        return Engine(model, settings, threads=req.threads_for_run, strict_devices=req.strict_devices)

    engines = EngineProvider(info, build)
    if not req.json_lines:
        _err("auto-tune: measuring the KV policy against the baseline on the calibration text ...")
    policy, decisions = tune_for_run(resolved.policy, engines.get, target_tps=req.target_tps)
    result = AutoTuneResult(decisions=[_plain_decision(d) for d in decisions], policy=summary(policy),
                            before=summary(resolved.policy), target_tps=req.target_tps)
    return engines.get(policy), result


def _plain_decision(entry: dict[str, Any]) -> dict[str, Any]:
    """A history decision as JSON-able data (``t`` as a Unix time in seconds)."""
    return json.loads(json.dumps({k: v for k, v in entry.items() if k != "type"}, default=str))



def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a prompts file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read prompts file {path}: {exc.strerror or exc}", "check the path") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"prompts file {path} has no non-empty lines", "put one prompt per line")
    return prompts


def run_request(req: RunRequest, resolved: Resolved, info: "ModelInfo | None" = None) -> int:
    """Do what ``req`` asks (already :meth:`~RunRequest.check`-ed) with the settings (and, in process, the
    model) the command resolved once; the exit code."""
    from rich.console import Console

    from inferos_cli.engine.engine import Engine
    from inferos_cli.ui.run_table import RunSnapshot, summary_line

    mode = "json" if req.json_lines else ("live" if is_terminal() else "plain")
    if not req.local:
        return _remote(req, resolved, mode, Console())
    assert info is not None, "the in-process engine needs the resolved model"
    tuned: AutoTuneResult | None = None
    if req.auto_tune:
        engine, tuned = _tuned_engine(req, info, resolved)
        if mode == "json":
            sys.stdout.write(json.dumps(tuned.to_json(), default=str) + "\n")
            sys.stdout.flush()
        else:
            _err(tuned.line())
    else:
        engine = Engine(info, resolved, threads=req.threads_for_run, strict_devices=req.strict_devices)
    for line in getattr(engine.plan, "warnings", lambda: [])():
        _err(f"warning: {line}")
    telemetry = _start_telemetry(engine)
    console = Console()

    def new_snapshot(rows: int = 1) -> RunSnapshot:
        return RunSnapshot(
            model=engine.info.name, profile=",".join(engine.resolved.profiles) or "default",
            kv_backend=engine.layout.describe(), providers=dict(engine.providers), rows=rows,
        )

    snap_fn: Callable[[], dict[str, Any]] | None = telemetry.snapshot if telemetry is not None else None
    try:
        if req.interactive:
            return _interactive(engine, req, mode, console, new_snapshot, snap_fn)
        if req.prompts_file is not None:
            return _batch(engine, req, mode, console, new_snapshot, snap_fn, _tune_suffix(tuned))
        assert req.prompt is not None
        ids = engine.encode_prompt(req.prompt, chat=req.chat, system=req.system)
        snap = new_snapshot()
        events = engine.generate(ids, req.generation)
        _show(events, snap, mode, console, snap_fn)
        if snap_fn is not None:
            snap.update_telemetry(snap_fn())
        if mode != "json":
            _err(summary_line(snap) + _tune_suffix(tuned))
        return 130 if snap.finish_reason == "interrupted" else 0
    finally:
        if telemetry is not None:
            telemetry.stop()


def _tune_suffix(tuned: AutoTuneResult | None) -> str:
    """``, auto-tune: ...`` for the summary line (empty without --auto-tune)."""
    return "" if tuned is None else ", " + tuned.line()


def _remote(req: RunRequest, resolved: Resolved, mode: str, console: Any) -> int:
    """One prompt through a Lemonade-compatible server or the GAIA CLI (:mod:`inferos_cli.backends`): the
    same events, view and summary as the in-process engine; timings are measured client-side by the backend."""
    from inferos_cli.backends import open_backend
    from inferos_cli.ui.run_table import RunSnapshot, summary_line

    assert req.prompt is not None
    backend = open_backend(req.backend, model=req.model, policy=resolved.policy, url=req.url)
    try:
        desc = backend.describe()
        kv = (f"KV policy sent as llamacpp_args {desc['llamacpp_args']!r}" if desc.get("llamacpp_args")
              else "KV cache managed by the server")
        snap = RunSnapshot(model=str(desc.get("model") or "server default"), profile=req.profile or "default",
                           kv_backend=f"{req.backend} at {desc.get('url')}: {kv}",
                           providers=dict(desc.get("providers") or {}))
        _show(backend.generate(req.prompt, req.generation, chat=req.chat, system=req.system), snap, mode,
              console, None)
        if mode != "json":
            _err(summary_line(snap))
        return 130 if snap.finish_reason == "interrupted" else 0
    finally:
        backend.close()


def _show(events: Any, snap: Any, mode: str, console: Any, snap_fn: Any, stream_text: bool = True) -> dict[int, str]:
    from inferos_cli.ui.run_view import consume

    return consume(events, snap, mode, console=console, telemetry=snap_fn, stream_text=stream_text)  # type: ignore[arg-type]


def _start_telemetry(engine: Any) -> Any:
    """A running sampler (CPU/RSS/GPU/NPU counters) feeding memory pressure to the KV cache on the mid
    loop (``machine.telemetry.start_monitoring``), or None when it cannot start."""
    from inferos_cli.machine.telemetry import start_monitoring

    try:
        monitoring = start_monitoring(engine.policy)
    except Exception:  # a monitor that cannot start must not stop generation; values show n/a
        return None
    engine.telemetry = monitoring.util
    engine.pressure = monitoring.pressure
    return monitoring


def _batch(engine: Any, req: RunRequest, mode: str, console: Any, new_snapshot: Any, snap_fn: Any,
           suffix: str = "") -> int:
    from inferos_cli.ui.run_table import summary_line

    assert req.prompts_file is not None
    prompts = read_prompts(req.prompts_file)
    ids = [engine.encode_prompt(p, chat=req.chat, system=req.system) for p in prompts]
    snap = new_snapshot(rows=len(ids))
    texts = _show(engine.generate_batch(ids, req.generation), snap, mode, console, snap_fn, stream_text=False)
    if mode != "json":
        for i, prompt in enumerate(prompts):
            sys.stdout.write(f"[{i}] {prompt}\n{texts.get(i, '')}\n\n")
        sys.stdout.flush()
        if snap_fn is not None:
            snap.update_telemetry(snap_fn())
        _err(summary_line(snap) + suffix)
    return 130 if snap.finish_reason == "interrupted" else 0


def _interactive(engine: Any, req: RunRequest, mode: str, console: Any, new_snapshot: Any, snap_fn: Any) -> int:
    from inferos_cli.engine.chat import Conversation
    from inferos_cli.ui.run_table import summary_line

    conv = Conversation(engine, chat=req.chat, system=req.system)
    if mode != "json":
        _err("interactive chat: the KV cache is kept across turns; /reset starts over, /exit or an empty line ends")
    while True:
        try:
            if mode == "live":
                user = console.input("[bold]> [/bold]")
            else:
                if mode != "json":
                    sys.stderr.write("> ")
                    sys.stderr.flush()
                line = sys.stdin.readline()
                if not line:
                    return 0
                user = line.rstrip("\n")
        except (EOFError, KeyboardInterrupt):
            return 0
        user = user.strip()
        if not user or user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            conv.reset()
            _err("conversation reset")
            continue
        snap = new_snapshot()
        try:
            _show(conv.turn(user, req.generation), snap, mode, console, snap_fn)
        except InferosError as exc:
            _err(f"error: {exc.one_line()}; /reset starts a new conversation")
            continue
        if mode != "json":
            if snap_fn is not None:
                snap.update_telemetry(snap_fn())
            _err(summary_line(snap) + f", cached {conv.cached_tokens} tokens")
        if snap.finish_reason == "interrupted":
            return 130
