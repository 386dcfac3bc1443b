"""The quality-guarded auto-tuner (the guide's slow loop) for `serve --auto-tune` and `run --auto-tune`.

``quality.delta_ppl_est`` comes from a measurement, never a constant: when the policy changes, a
calibration pass runs the calibration text through the engine of the current policy and through the
baseline engine (original graph, plain cache), token by token after a short prefill so the KV tiers
really fill (:func:`~inferos_cli.quality.perplexity.perplexity`), and takes ``ppl(policy) - ppl(baseline)``.
The same pass times both (decode tokens/s) and reads their resident KV bytes, so every decision rests on
numbers measured in one run.

Decisions (each recorded on the target with its reason and numbers):

- estimate above ``quality.max_delta_ppl``: loosen (the tiered segmented cache instead of the fused one,
  recent window x2, level thresholds +0.1), after
  calibrating the looser candidate;
- memory pressure (:class:`~inferos_cli.machine.pressure.MemoryPressure`) at or above ``PRESSURE_HIGH``
  and the estimate under half the budget: tighten (window /2, thresholds -0.1) if the tighter candidate's
  measured estimate stays within the budget;
- ``--target-tps`` above the measured throughput: calibrate both neighbours and adopt the one whose
  measured decode tokens/s is higher, if it stays within the quality budget.

The tuner knows nothing of the server: it takes an engine factory (``policy -> engine``, cached by the
caller) and a :class:`TuneTarget` (the policy it tunes and where its decisions go). The service is one
target; :class:`RunTarget` is the one-shot target of ``run --auto-tune``.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from inferos_cli.quality.perplexity import perplexity
from inferos_cli.settings import Policy

#: ``policy -> engine``; the caller caches engines (the tuner asks for the same policies again and again).
EngineFor = Callable[[Policy], Any]

PRESSURE_HIGH = 0.8
MIN_PERIOD_S = 1.0
THRESHOLD_STEP = 0.1
#: Calibration text used when none is given (public-domain style prose, tokenised by the served model).
DEFAULT_CALIBRATION = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun with her "
    "friends. One day, she saw a big red ball in the park. She ran to get it, but a small dog took the ball "
    "first. Lily was sad, but then the dog came back and gave her the ball. They played together all day. "
    "When the sun went down, Lily went home and told her mom about the dog. Her mom smiled and said that "
    "sharing makes everyone happy. The next day, Lily went back to the park with a treat for the dog. The "
    "dog wagged its tail and ran around her. Lily laughed and threw the ball as far as she could. The dog "
    "ran after it and brought it back again and again. From that day on, Lily and the dog were best friends, "
    "and they met in the park every morning to play before school. Lily learned that being kind to others "
    "brings new friends, and the dog learned that Lily always came back."
)


@dataclass
class Calibration:
    """One measured comparison of a policy against the baseline on the calibration text."""

    ppl: float
    ppl_baseline: float
    delta_ppl: float
    tokens: int
    decode_tps: float | None
    decode_tps_baseline: float | None
    kv_bytes: int | None
    kv_bytes_baseline: int | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)


def baseline_policy(policy: Policy) -> Policy:
    """The same policy with the KV quantizer off (original graph, plain cache): the reference every
    calibration measures against, and what the server's baseline mode runs."""
    data = policy.model_dump()
    data["kv"]["mode"] = "disabled"
    return Policy.model_validate(data)


def loosen(policy: Policy) -> Policy:
    """A looser policy: the tiered segmented cache instead of the fused one (``auto`` / ``int8-fused``
    store every token int8 with static scales, the segmented presets keep a full-precision window and
    lose less), recent window x2 (max 512), level thresholds +0.1 (order kept); same if at the top."""
    data = policy.model_dump()
    kv = data["kv"]
    if kv["quant"] in ("auto", "int8-fused"):
        kv["quant"] = "tiered"
    kv["recent_window"] = min(512, kv["recent_window"] * 2)
    th = kv["level_thresholds"]
    th["L1_int8"] = round(min(1.0, th["L1_int8"] + THRESHOLD_STEP), 3)
    th["L2_int4"] = round(min(th["L1_int8"] - 0.01, th["L2_int4"] + THRESHOLD_STEP), 3)
    th["L3_evict"] = round(min(th["L2_int4"] - 0.01, th["L3_evict"] + THRESHOLD_STEP), 3)
    return Policy.model_validate(data)


def tighten(policy: Policy) -> Policy:
    """A tighter policy: recent window /2 (min 16), level thresholds -0.1 (order kept)."""
    data = policy.model_dump()
    kv = data["kv"]
    kv["recent_window"] = max(16, kv["recent_window"] // 2)
    th = kv["level_thresholds"]
    th["L3_evict"] = round(max(0.0, th["L3_evict"] - THRESHOLD_STEP), 3)
    th["L2_int4"] = round(max(th["L3_evict"] + 0.01, th["L2_int4"] - THRESHOLD_STEP), 3)
    th["L1_int8"] = round(max(th["L2_int4"] + 0.01, th["L1_int8"] - THRESHOLD_STEP), 3)
    return Policy.model_validate(data)


def summary(policy: Policy) -> dict[str, Any]:
    """The knobs the tuner turns, for the history."""
    kv = policy.kv
    return {"mode": kv.mode, "quant": kv.quant, "recent_window": kv.recent_window,
            "level_thresholds": kv.level_thresholds.model_dump()}


class TuneTarget(Protocol):
    """What the tuner tunes: the service (``serve --auto-tune``) or a :class:`RunTarget` (``run --auto-tune``)."""

    policy_version: int
    baseline_mode: bool

    @property
    def policy(self) -> Policy:
        """The policy requests run with now (the baseline variant in baseline mode)."""

    @property
    def configured_policy(self) -> Policy:
        """The policy as set (baseline mode not applied)."""

    def replace_policy(self, policy: Policy, *, reason: str, details: dict[str, Any] | None = None) -> None:
        """Adopt a whole validated policy."""

    def record_decision(self, kind: str, reason: str, details: dict[str, Any] | None = None) -> None:
        """Keep a decision with its reason and numbers."""

    def kv_bytes(self) -> int | None:
        """Resident KV bytes of the latest request (memory pressure), None before any."""

    def live_tps(self) -> float | None:
        """Measured request decode tokens/s (the ``--target-tps`` check), None before any."""

    def publish_estimate(self, delta_ppl: float, source: str | None = None) -> None:
        """The measured delta-PPL of the current policy (``source``: how; None keeps the previous one)."""


class RunTarget:
    """The target of ``run --auto-tune``: one resolved policy, no requests served yet, decisions kept in
    :attr:`decisions` (the same entries the server's history holds)."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.baseline_mode = not policy.kv.enabled
        self.policy_version = 0
        self.decisions: list[dict[str, Any]] = []
        self.delta_ppl_est: float | None = None

    @property
    def policy(self) -> Policy:
        """The effective policy (the baseline variant when the KV policy is off)."""
        return baseline_policy(self._policy) if self.baseline_mode else self._policy

    @property
    def configured_policy(self) -> Policy:
        """The policy as resolved, then as tuned."""
        return self._policy

    def replace_policy(self, policy: Policy, *, reason: str, details: dict[str, Any] | None = None) -> None:
        """Adopt ``policy``."""
        self._policy = policy
        self.policy_version += 1
        self.record_decision("autotune", reason, {**(details or {}), "version": self.policy_version})

    def record_decision(self, kind: str, reason: str, details: dict[str, Any] | None = None) -> None:
        """Keep a decision."""
        self.decisions.append({"t": time.time(), "type": "decision", "kind": kind, "reason": reason,
                               **({"details": details} if details else {})})

    def kv_bytes(self) -> int | None:
        """No request has run yet."""
        return None

    def live_tps(self) -> float | None:
        """No request has run yet."""
        return None

    def publish_estimate(self, delta_ppl: float, source: str | None = None) -> None:
        """Keep the estimate."""
        self.delta_ppl_est = delta_ppl


class AutoTuner:
    """Tunes one target's policy; :meth:`step` is one slow-loop iteration (tests call it directly),
    :meth:`start` runs it in a thread."""

    def __init__(
        self,
        target: TuneTarget,
        engines: EngineFor,
        *,
        target_tps: float | None = None,
        calibration_text: str | None = None,
        calibration_tokens: int | None = None,
        prefill_tokens: int = 8,
        pressure: Any = None,
    ) -> None:
        from inferos_cli.machine.pressure import MemoryPressure

        self.target = target
        self.engines = engines
        self.target_tps = target_tps
        engine = engines(target.policy)
        text = calibration_text or _default_text()
        ids = list(engine.tokenizer.encode(text))
        limit = calibration_tokens or min(engine.info.context_length - 1, 384)
        self.ids = ids[:limit]
        self.prefill = max(1, min(prefill_tokens, len(self.ids) - 2))
        self.pressure = pressure or MemoryPressure.from_policy(target.configured_policy, kv_bytes=target.kv_bytes)
        self._cache: list[tuple[Policy, Calibration]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._noted: set[tuple[int, str]] = set()
        self.steps = 0

    # -- measurement -------------------------------------------------------------------------------------
    def calibrate(self, policy: Policy) -> Calibration:
        """Measure ``policy`` against the baseline on the calibration text (cached per policy)."""
        for known, cal in self._cache:
            if known == policy:
                return cal
        t0 = time.perf_counter()
        base = baseline_policy(policy)
        # baseline first, then the candidate (one pass each; the engine factory keeps both)
        ppl_b, tps_b, kv_b = perplexity(self.engines(base), self.ids, self.prefill)
        if base == policy:
            ppl, tps, kv = ppl_b, tps_b, kv_b
        else:
            ppl, tps, kv = perplexity(self.engines(policy), self.ids, self.prefill)
        cal = Calibration(ppl=ppl, ppl_baseline=ppl_b, delta_ppl=ppl - ppl_b, tokens=len(self.ids) - self.prefill,
                          decode_tps=tps, decode_tps_baseline=tps_b, kv_bytes=kv, kv_bytes_baseline=kv_b,
                          seconds=time.perf_counter() - t0)
        self._cache.append((policy, cal))
        return cal

    # -- the loop ----------------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """Measure the current policy and take at most one decision; returns what happened."""
        with self._lock:
            self.steps += 1
            tgt = self.target
            policy = tgt.policy  # effective (baseline mode applied)
            cal = self.calibrate(policy)
            tgt.publish_estimate(
                cal.delta_ppl, f"calibration: {cal.tokens} tokens, ppl {cal.ppl:.4f} vs baseline {cal.ppl_baseline:.4f}")
            budget = policy.quality.max_delta_ppl
            if tgt.baseline_mode or not policy.kv.enabled:
                return {"action": "none", "reason": "KV policy off (baseline): nothing to tune", **cal.to_json()}
            if cal.delta_ppl > budget:
                cand = loosen(policy)
                if cand == policy:
                    return self._note("at-limit", f"delta_ppl_est {cal.delta_ppl:.4f} > max {budget}; already at the "
                                      "loosest window/thresholds (use a wider quant preset or baseline)", cal)
                cc = self.calibrate(cand)
                return self._adopt(cand, f"delta_ppl_est {cal.delta_ppl:.4f} > max_delta_ppl {budget}: loosened "
                                   f"(candidate measured {cc.delta_ppl:.4f})", cal, cc)
            update = getattr(self.pressure, "update", None)
            if update is not None:
                update()
            level = self.pressure.level()
            if level >= PRESSURE_HIGH and cal.delta_ppl < budget / 2:
                cand = tighten(policy)
                if cand != policy:
                    cc = self.calibrate(cand)
                    if cc.delta_ppl <= budget:
                        return self._adopt(cand, f"memory pressure {level:.2f} ({self.pressure.reason()}) and quality "
                                           f"headroom ({cal.delta_ppl:.4f} < {budget}/2): tightened", cal, cc)
                    return self._note("tighten-rejected", f"memory pressure {level:.2f} but the tighter candidate "
                                      f"measured delta_ppl {cc.delta_ppl:.4f} > max {budget}", cal)
            if self.target_tps:
                live = tgt.live_tps()
                if live is not None and live < self.target_tps:
                    return self._steer_tps(policy, cal, live, budget)
            return {"action": "none", "reason": "within budget", "pressure": level, **cal.to_json()}

    def _steer_tps(self, policy: Policy, cal: Calibration, live: float, budget: float) -> dict[str, Any]:
        """Adopt the neighbour (tighter or looser) whose decode speed, timed interleaved with the current
        policy (A B A B, medians), is more than 5% higher and whose measured delta-PPL fits the budget."""
        best: tuple[float, float, Policy, Calibration] | None = None
        for cand in (tighten(policy), loosen(policy)):
            if cand == policy:
                continue
            cc = self.calibrate(cand)
            if cc.delta_ppl > budget:
                continue
            cur_tps, cand_tps = self.time_pair(policy, cand)
            if cur_tps and cand_tps and cand_tps > cur_tps * 1.05 and (best is None or cand_tps / cur_tps > best[0]):
                best = (cand_tps / cur_tps, cand_tps, cand, cc)
        if best is None:
            return self._note("tps-no-better", f"measured {live:.1f} tok/s < target {self.target_tps}; no neighbouring "
                              "policy decoded >5% faster (interleaved timing) within the quality budget", cal)
        return self._adopt(best[2], f"measured {live:.1f} tok/s < target {self.target_tps}: the candidate decoded "
                           f"{best[0]:.2f}x as fast as this policy (interleaved A/B timing, medians)", cal, best[3])

    def time_pair(self, current: Policy, candidate: Policy, rounds: int = 3, tokens: int = 64) -> tuple[float | None, float | None]:
        """Median decode tokens/s of two policies timed interleaved (A B A B) on the calibration text."""
        ids = self.ids[: self.prefill + tokens]
        a_runs: list[float] = []
        b_runs: list[float] = []
        for _ in range(rounds):
            for policy, runs in ((current, a_runs), (candidate, b_runs)):
                _, tps, _ = perplexity(self.engines(policy), ids, self.prefill)
                if tps:
                    runs.append(tps)
        return (statistics.median(a_runs) if a_runs else None, statistics.median(b_runs) if b_runs else None)

    def _adopt(self, cand: Policy, reason: str, cal: Calibration, cc: Calibration) -> dict[str, Any]:
        self.target.replace_policy(cand, reason=reason, details={
            "from": summary(self.target.configured_policy), "to": summary(cand),
            "measured_current": cal.to_json(), "measured_candidate": cc.to_json()})
        self.target.publish_estimate(cc.delta_ppl)
        return {"action": "adopt", "reason": reason, "policy": summary(cand), **cc.to_json()}

    def _note(self, kind: str, reason: str, cal: Calibration) -> dict[str, Any]:
        key = (self.target.policy_version, kind)
        if key not in self._noted:  # once per policy version, so the history is not flooded
            self._noted.add(key)
            self.target.record_decision("autotune", reason, {"measured_current": cal.to_json()})
        return {"action": kind, "reason": reason, **cal.to_json()}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the tuner must never take the server down
                self.target.record_decision("autotune", f"tuner step failed: {exc}")
            period = max(MIN_PERIOD_S, self.target.configured_policy.loops.slow_ms / 1000.0)
            self._stop.wait(period)

    def start(self) -> "AutoTuner":
        """Run :meth:`step` on the slow loop in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inferos-autotune", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _default_text() -> str:
    """The calibration text: ``INFEROS_CALIBRATION_TEXT`` (a file) when set, else the built-in prose."""
    import os

    path = os.environ.get("INFEROS_CALIBRATION_TEXT")
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8")[:20000]
    return DEFAULT_CALIBRATION


def tune_for_run(policy: Policy, engines: EngineFor, *, target_tps: float | None = None, max_steps: int = 4,
                 pressure: Any = None) -> tuple[Policy, list[dict[str, Any]]]:
    """`run --auto-tune`: before a one-shot run, step the tuner until it takes no decision (at most
    ``max_steps``); returns the tuned policy and every decision with its reason and measurements."""
    target = RunTarget(policy)
    tuner = AutoTuner(target, engines, target_tps=target_tps, pressure=pressure)
    for _ in range(max_steps):
        if tuner.step()["action"] != "adopt":
            break
    return target.configured_policy, target.decisions
