"""`inferos bench`: a grid of (batch, prompt length) cells, several configs per cell, interleaved repeats.

How it measures (also written into every result under ``method``):

- **Isolation.** For every cell, each in-process config (``baseline``, ``inferos``, profiles, presets,
  ``ort-genai``) runs in its *own fresh worker subprocess* (:mod:`inferos_cli.bench.worker`) that
  loads the model once for that cell. Workers of one cell stay alive together and take turns, so repeats
  are interleaved A B A B ... and machine drift hits every config alike. Warmup runs go first (A B) and
  are discarded.
- **Peak RSS** is per run, of the worker process, which holds only its own config's model
  (:class:`inferos_cli.machine.rss.PeakWindow`: exact on Linux, sampled every 2 ms and at every event
  elsewhere).
- **Timing** is the worker's fold of the engine's events (:class:`inferos_cli.events.RunStats`) on the
  consumer's clock (``time.perf_counter``): TTFT = call -> first token event; prefill tok/s = batch x
  prompt tokens / TTFT; decode tok/s = (all token events - batch) / (last token - first token); e2e =
  call -> iterator exhausted.
- **KV bytes** are the engine's own :class:`~inferos_cli.events.KVStats` (largest resident total seen
  during the run, with its fp16 reference for the ratio).
- **Prompts** are windows of real text with exact token counts (:mod:`inferos_cli.bench.grid`).

Every sample is kept; cells report mean, sd (sample, n-1), median, min, max and n.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from inferos_cli.bench.configs import ConfigSpec
from inferos_cli.options import parse_compare
from inferos_cli.settings import resolved_to_json
from inferos_cli.bench.grid import METRICS, Grid, Step, corpus_ids, make_prompts, schedule
from inferos_cli.bench.results import BenchResult, CellResult, host_record
from inferos_cli.bench.runner import Runner, WorkerProcess
from inferos_cli.errors import InferosError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.quality.eval import EvalConfig


# ------------------------------------------------------------------------------------------------- run
@dataclass
class Progress:
    """What the progress callback receives after each step."""

    done_weight: int
    total_weight: int
    step: Step | None
    message: str = ""
    elapsed_s: float = 0.0
    cell_done: tuple[int, int] | None = None

    @property
    def eta_s(self) -> float | None:
        """Time left, extrapolated from the cost done so far (steps weighted by batch x tokens)."""
        if self.done_weight <= 0:
            return None
        return self.elapsed_s / self.done_weight * (self.total_weight - self.done_weight)


def run_bench(
    info: "ModelInfo",
    grid: Grid,
    configs: list[ConfigSpec],
    *,
    text_path: Path,
    config_path: Path | None = None,
    strict_devices: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    on_cell: Callable[[BenchResult], None] | None = None,
    runner_factory: Callable[..., Runner] | None = None,
) -> BenchResult:
    """Run the whole grid, interleaved, and return every sample. ``on_cell`` sees the partial result
    after each cell (``complete`` False until the end), e.g. to save it so an interrupted run keeps
    what it measured."""
    started = time.perf_counter()
    result = BenchResult(
        host=host_record(info), grid=grid, configs=configs, text=str(text_path),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config_file=str(config_path) if config_path else None,
    )
    factory = runner_factory or make_runner
    for spec in configs:
        if spec.skip_reason:
            result.skipped.append({"config": spec.name, "reason": spec.skip_reason})
    live = [c for c in configs if not c.skip_reason]
    if not live:
        raise UsageError("nothing to compare: every config was skipped",
                         "; ".join(f"{s['config']}: {s['reason']}" for s in result.skipped))
    ctx = int(info.context_length)
    fitting = [(b, s) for b, s in grid.cells() if s + grid.gen_tokens <= ctx]
    ids = corpus_ids(info, text_path, need=max((b * s for b, s in fitting), default=1) + 1)
    bos = info.bos_token_id if info.add_bos else None
    steps = schedule(fitting, [c.name for c in live], grid.repeats, grid.warmup, grid.gen_tokens)
    total = sum(s.weight for s in steps) or 1
    done = 0
    if on_progress:
        on_progress(Progress(0, total, None, "starting"))
    for batch, seq in grid.cells():
        if (batch, seq) not in fitting:
            reason = f"{seq}+{grid.gen_tokens} tokens exceed the model's context of {ctx}"
            for spec in live:
                result.cells.append(CellResult(batch, seq, spec.name, status="skipped", reason=reason))
            continue
        prompts = make_prompts(ids, batch, seq, bos)
        rows = {spec.name: CellResult(batch, seq, spec.name) for spec in live}
        groups, why = resident_groups(live, info, batch, seq + grid.gen_tokens)
        if why:
            result.host.setdefault("one_config_at_a_time", []).append({"batch": batch, "seq": seq, "reason": why})
        for group in groups:
            names = {spec.name for spec in group}
            runners: dict[str, Runner] = {}
            try:
                runners = start_cell(group, info, grid, factory, rows, strict_devices)
                for step in steps:
                    if (step.batch, step.seq) != (batch, seq) or step.config not in names:
                        continue
                    run_step(step, runners, rows[step.config], prompts, grid, result, started)
                    done += step.weight
                    if on_progress:
                        on_progress(Progress(done, total, step, f"batch {batch} seq {seq} {step.config}",
                                             time.perf_counter() - started))
            finally:
                for runner in runners.values():
                    runner.close()
        result.cells.extend(rows[spec.name] for spec in live)
        if on_cell:
            on_cell(result)
        if on_progress:
            on_progress(Progress(done, total, None, f"batch {batch} seq {seq} done", time.perf_counter() - started,
                                 cell_done=(batch, seq)))
    if not result.rss_method:
        result.rss_method = result.measured_rss_method()
    result.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result.wall_s = round(time.perf_counter() - started, 3)
    result.complete = True
    try:
        import psutil

        result.host["load_avg_1_5_15_end"] = [round(x, 2) for x in psutil.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        pass
    return result


def run_step(step: Step, runners: dict[str, Runner], row: CellResult, prompts: list[list[int]], grid: Grid,
             result: BenchResult, started: float) -> None:
    """One scheduled generation of one config; an error marks the row and closes its runner."""
    runner = runners.get(step.config)
    if runner is None or row.status != "ok":
        return
    entry = {"index": len(result.order), "batch": step.batch, "seq": step.seq, "config": step.config,
             "repeat": step.repeat, "warmup": step.warmup, "t_s": round(time.perf_counter() - started, 4), "ok": True}
    result.order.append(entry)
    try:
        sample = runner.run(prompts, grid.gen_tokens)
    except InferosError as exc:
        entry["ok"] = False
        row.status, row.reason = "error", exc.one_line()
        runner.close()
        runners.pop(step.config, None)
        return
    if not step.warmup:
        record(row, sample)
    elif sample.get("rss_method"):
        result.rss_method = sample["rss_method"]


def resident_groups(live: list[ConfigSpec], info: "ModelInfo", batch: int, tokens: int,
                    available: int | None = None) -> tuple[list[list[ConfigSpec]], str]:
    """The configs of one cell grouped by what can be loaded at once: all together (their runs
    interleave, the fairest comparison) when every worker's estimated memory fits in 80 % of the
    available RAM, else one at a time (with the reason, recorded in the result's host facts).

    A worker's estimate is the model folder's bytes (the weights, held once) plus a float32 KV cache of
    ``batch`` x ``tokens``: an upper bound for every inferos cache. Peers (Lemonade) hold nothing here."""
    workers = [c for c in live if c.kind != "lemonade"]
    if len(workers) < 2:
        return [live], ""
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    folder = Path(info.path)
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
    kv = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4 * batch * tokens
    need = len(workers) * (weights + kv)
    if need <= 0.8 * available:
        return [live], ""
    gib = 2**30
    why = (f"{len(workers)} workers need ~{need / gib:.1f} GiB ({(weights + kv) / gib:.1f} GiB each: weights + "
           f"float32 KV) but {available / gib:.1f} GiB is available: loaded and run one config at a time, "
           f"not interleaved")
    return [[c] for c in live], why


def make_runner(spec: ConfigSpec, info: "ModelInfo", *, threads: int | None,
                strict_devices: bool = False) -> Runner:
    """The runner of one config for one cell: a peer client, or a worker process on the model folder."""
    if spec.kind == "lemonade":
        from inferos_cli.bench.peers import LemonadePeer

        return LemonadePeer(spec.url, info, server_model=spec.server_model)
    settings = resolved_to_json(spec.resolved) if spec.resolved is not None else None
    return WorkerProcess(spec.name, spec.kind, Path(spec.model_path or info.path), settings=settings,
                         threads=threads, strict_devices=strict_devices)


def start_cell(live: list[ConfigSpec], info: "ModelInfo", grid: Grid, factory: Callable[..., Runner],
               rows: dict[str, CellResult], strict_devices: bool = False) -> dict[str, Runner]:
    """Start every config's runner for one cell (loads side by side), recording load facts or errors."""
    runners: dict[str, Runner] = {}
    for spec in live:
        try:
            runner = factory(spec, info, threads=grid.threads, strict_devices=strict_devices)
            if isinstance(runner, WorkerProcess):
                runner.send_load()
            runners[spec.name] = runner
        except InferosError as exc:
            rows[spec.name].status, rows[spec.name].reason = "error", exc.one_line()
    for name, runner in list(runners.items()):
        row = rows[name]
        try:
            loaded = runner.load()
        except InferosError as exc:
            row.status, row.reason = "error", exc.one_line()
            runner.close()
            runners.pop(name)
            continue
        row.providers = dict(loaded.get("providers") or {})
        row.kv_backend = loaded.get("kv_backend")
        row.load_s = loaded.get("load_s")
        rss = loaded.get("rss_bytes")
        row.rss_after_load_mb = round(rss / 2**20, 2) if rss else None
        if loaded.get("extra"):
            row.extra.update(loaded["extra"])
    return runners


def record(row: CellResult, sample: dict[str, Any]) -> None:
    """Append one measured run's numbers to a row."""
    for m in METRICS:
        row.samples[m].append(sample.get(m))
    if sample.get("providers"):
        row.providers = dict(sample["providers"])
    row.generated_per_row = list(sample.get("generated_per_row") or row.generated_per_row)
    for key in ("rss_method", "kv_note", "kv_tiers", "server_stats", "endpoint", "server_prompt_tokens"):
        if sample.get(key) is not None:
            row.extra[key] = sample[key]


# --------------------------------------------------------------------------------------------- quality
BASELINE = "baseline"


def quality_entries(info: "ModelInfo", configs: Sequence[ConfigSpec]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """For ``--quality``: (a ``reason`` for each config that cannot be scored, bench config -> the eval
    config that scores it: its profile stack joined with ``+``, or the model's size class)."""
    reasons: dict[str, dict[str, Any]] = {}
    entries: dict[str, str] = {}
    for c in configs:
        if c.skip_reason:
            reasons[c.name] = {"reason": f"skipped: {c.skip_reason}"}
        elif c.kind != "engine":
            reasons[c.name] = {"reason": f"{c.kind} is a peer: quality is scored for in-process engine configs"}
        else:
            stack = c.profile or info.size_class
            if stack:
                entries[c.name] = stack.replace(",", "+")
            else:
                reasons[c.name] = {"reason": "no profile and no size class to resolve for the eval"}
    return reasons, entries


def quality_compare(info: "ModelInfo", configs: Sequence[ConfigSpec]) -> list[str]:
    """The eval configs ``--quality`` scores, ``baseline`` (KV off, the reference) first; empty when no
    config can be scored. The command resolves them (:func:`inferos_cli.quality.eval.resolve_configs`)."""
    _, entries = quality_entries(info, configs)
    return parse_compare(",".join(entries.values()), reference=BASELINE) if entries else []


def quality_for(
    info: "ModelInfo", configs: list[ConfigSpec], settings: Sequence["EvalConfig"], *, text_path: Path,
    max_tokens: int, threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """``--quality``: perplexity, delta vs ``baseline`` (KV off), mean KL and top-1 agreement of every engine
    config, from the eval machinery (:func:`inferos_cli.quality.eval.run_eval`: teacher-forced through
    the real cache path, all configs in lockstep on the same windows of ``text_path``). ``settings`` are
    the resolved eval configs of :func:`quality_compare`. Peers and skipped configs get a ``reason``."""
    from inferos_cli.quality.eval import run_eval

    out, entries = quality_entries(info, configs)
    if not entries:
        return out
    ctx = min(512, int(info.context_length))
    try:
        report = run_eval(info, list(settings), text_path, ctx=ctx, prefix=min(64, ctx // 4),
                          max_tokens=max_tokens, threads=threads, measure_rss=False)
    except InferosError as exc:
        return out | {n: {"reason": exc.one_line()} for n in entries}
    by_entry = {r.config: r for r in report.results}
    for name, entry in entries.items():
        r = by_entry.get(entry)
        if r is None:
            out[name] = {"reason": f"the eval returned no result for {entry}"}
            continue
        out[name] = {"ppl": r.ppl, "delta_ppl": r.delta_ppl, "kl_mean": r.kl_mean,
                     "top1_agreement": r.top1_agreement, "tokens_scored": r.tokens_scored, "kv": r.kv,
                     "eval_config": entry, "ctx": report.ctx, "prefix": report.prefix, "graph": report.graph}
    return {c.name: out[c.name] for c in configs if c.name in out}
