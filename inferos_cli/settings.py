"""Validated settings: the :class:`Policy` (every key of the integration guide) and its resolution.

Resolution happens once, in :func:`resolve`, from layers merged in this order (later wins):
defaults < profiles (model size class first, then the named ones, left to right) < config file
< environment ``INFEROS_*`` (nested with ``__``) < command-line flags. Each leaf remembers the layer
that set it, so ``inferos profiles show`` and ``inferos config show`` can say where a value came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inferos_cli.errors import ConfigError

Device = Literal["dml", "npu", "cuda", "cpu"]
KVMode = Literal["dynamic", "latency_optimized", "throughput_optimized", "quality_optimized", "disabled"]
KVQuant = Literal["auto", "tiered", "int8", "int4", "int4-k8v4", "int8-fused", "fp16"]
SchedulerMode = Literal["hybrid", "gpu_only", "npu_only", "cpu"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_bytes(value: Any) -> int:
    """Parse ``2048MiB``, ``4GiB``, ``1.5 GB``, ``512k`` or an int into a byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a byte size such as 2048MiB, 4GiB or an integer")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a byte size cannot be negative")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a byte size (use e.g. 2048MiB, 4GiB, 1.5GB or an integer)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QualityPolicy(_Strict):
    """Quality guard rails."""

    max_delta_ppl: float = Field(0.5, ge=0.0, le=10.0, description="largest perplexity increase allowed")
    min_accept_rate: float = Field(0.5, ge=0.0, le=1.0, description="lowest acceptable accept rate")


class LevelThresholds(_Strict):
    """Importance cuts (scores in 0..1): above L1 int8, above L2 int4, below L3 an eviction candidate."""

    L1_int8: float = Field(0.8, ge=0.0, le=1.0)
    L2_int4: float = Field(0.6, ge=0.0, le=1.0)
    L3_evict: float = Field(0.4, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "LevelThresholds":
        if not (1.0 >= self.L1_int8 > self.L2_int4 > self.L3_evict >= 0.0):
            raise ValueError(
                f"level thresholds must satisfy 1 >= L1_int8 > L2_int4 > L3_evict >= 0, got "
                f"L1_int8={self.L1_int8}, L2_int4={self.L2_int4}, L3_evict={self.L3_evict}"
            )
        return self


class KVPolicy(_Strict):
    """The segmented KV cache: sinks | int8 | int4 | recent full-precision window."""

    mode: KVMode = "dynamic"
    quant: KVQuant = Field("auto", description="auto (int8-fused where the graph allows it, else tiered), "
                                                "tiered (by importance), a fixed preset, or fp16 (a float16 cache, "
                                                "GroupQueryAttention graphs)")
    recent_window: int = Field(128, ge=16, le=512)
    sink_tokens: int = Field(4, ge=0, le=64)
    group_size: int = Field(32, description="quantization group along head_dim: 32 or 64")
    rotate_keys: bool = Field(True, description="Hadamard-rotate keys before int4 quantization")
    level_thresholds: LevelThresholds = LevelThresholds()
    max_tokens: int | None = Field(None, ge=1, description="cap on cached tokens (eviction beyond)")
    budget_bytes: int | None = Field(None, ge=0, description="cap on resident KV bytes")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        """32 or 64 (an int field, not a Literal, so ``INFEROS_KV__GROUP_SIZE=64`` from the environment works)."""
        if value not in (32, 64):
            raise ValueError("kv.group_size must be 32 or 64")
        return value

    @field_validator("budget_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        return None if value is None else parse_bytes(value)

    @property
    def enabled(self) -> bool:
        """False when the KV policy is the baseline (original graph, plain cache)."""
        return self.mode != "disabled"


class IOPolicy(_Strict):
    """Session memory and binding settings."""

    enable_iobinding: bool = True
    dml_pool_bytes: int = 2048 * 1024**2
    host_pool_bytes: int = 4096 * 1024**2

    @field_validator("dml_pool_bytes", "host_pool_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        return parse_bytes(value)


class SchedulerPolicy(_Strict):
    """Which execution provider runs prefill and which runs decode."""

    mode: SchedulerMode = "cpu"
    prefill_device: Device = "cpu"
    decode_device: Device = "cpu"
    prefill_threads: int | None = Field(None, ge=1, le=1024)
    decode_threads: int | None = Field(None, ge=1, le=1024)


class LoopsPolicy(_Strict):
    """Cadence of the control loops (telemetry sampling, pressure feedback, auto-tuning)."""

    fast_ms: int = Field(1, ge=1, le=60_000)
    mid_ms: int = Field(10, ge=1, le=600_000)
    slow_ms: int = Field(100, ge=1, le=3_600_000)


class Policy(_Strict):
    """Everything that shapes how inference runs; validated once, then passed around read-only."""

    quality: QualityPolicy = QualityPolicy()
    kv: KVPolicy = KVPolicy()
    io: IOPolicy = IOPolicy()
    scheduler: SchedulerPolicy = SchedulerPolicy()
    loops: LoopsPolicy = LoopsPolicy()


class EnvSettings(BaseSettings):
    """The environment layer: ``INFEROS_KV__RECENT_WINDOW=32`` and friends, parsed by pydantic-settings."""

    model_config = SettingsConfigDict(
        env_prefix="INFEROS_", env_nested_delimiter="__", extra="ignore", case_sensitive=False
    )
    quality: dict[str, Any] | None = None
    kv: dict[str, Any] | None = None
    io: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    loops: dict[str, Any] | None = None


POLICY_SECTIONS = ("quality", "kv", "io", "scheduler", "loops")


@dataclass
class Resolved:
    """A validated policy, the layer each leaf came from, and the profiles that were applied."""

    policy: Policy
    sources: dict[str, str] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    config_path: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The policy as plain JSON-able data."""
        return self.policy.model_dump(mode="json")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"kv": {"recent_window": 64}}`` -> ``{"kv.recent_window": 64}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))  # an empty table sets nothing
        else:
            out[name] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``top`` wins."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def unflatten(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"kv.recent_window": 64}`` -> ``{"kv": {"recent_window": 64}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def canonical_keys(data: dict[str, Any], model: type[BaseModel] = Policy) -> dict[str, Any]:
    """Map keys to the model's field names case-insensitively (env vars arrive lower-cased, so
    ``INFEROS_KV__LEVEL_THRESHOLDS__L1_INT8`` must still reach ``kv.level_thresholds.L1_int8``).
    Unknown keys are kept as given so validation can name them."""
    fields = {name.lower(): name for name in model.model_fields}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = fields.get(str(key).lower(), key)
        sub = _submodel(model, name)
        if isinstance(value, dict) and sub is not None:
            value = canonical_keys(value, sub)
        out[name] = value
    return out


def _submodel(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The nested model class of field ``name``, or None for a leaf / unknown field."""
    info = model.model_fields.get(name)
    ann = getattr(info, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def env_layer() -> dict[str, Any]:
    """The ``INFEROS_*`` policy values present in the environment, as a nested dict with canonical keys."""
    try:
        env = EnvSettings()
    except ValidationError as exc:  # only on malformed JSON in env values such as INFEROS_KV='{...'
        err = exc.errors()[0]
        name = "INFEROS_" + "__".join(str(p) for p in err["loc"]).upper()
        raise ConfigError(
            f"invalid environment value {name}: {err['msg']}",
            "use INFEROS_SECTION__KEY=value, e.g. INFEROS_KV__RECENT_WINDOW=32",
        ) from None
    return canonical_keys({k: v for k, v in env.model_dump().items() if v})


def field_info(loc: tuple[Any, ...] | list[Any]) -> Any:
    """The pydantic ``FieldInfo`` at a dotted location inside :class:`Policy`, or None."""
    model: type[BaseModel] | None = Policy
    info = None
    for part in loc:
        if model is None or str(part) not in model.model_fields:
            return None
        info = model.model_fields[str(part)]
        model = _submodel(model, str(part))
    return info


def allowed_values(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """What a key accepts, in words: ``16..512``, ``one of: dml, npu, cuda, cpu``, ``a byte size``..."""
    import typing

    if tuple(str(p) for p in loc[-1:]) in (("dml_pool_bytes",), ("host_pool_bytes",), ("budget_bytes",)):
        return "a byte size such as 2048MiB, 4GiB or an integer"
    if tuple(str(p) for p in loc[-1:]) == ("level_thresholds",) or str(loc[-1]) in LevelThresholds.model_fields:
        return "0..1 with 1 >= L1_int8 > L2_int4 > L3_evict >= 0"
    info = field_info(loc)
    if info is None:
        return None
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    literal = ann if typing.get_origin(ann) is Literal else next(
        (a for a in args if typing.get_origin(a) is Literal), None
    )
    if literal is not None:
        return "one of: " + ", ".join(str(v) for v in typing.get_args(literal))
    low = high = None
    for meta in info.metadata:
        low = getattr(meta, "ge", low)
        high = getattr(meta, "le", high)
    kind = "true or false" if ann is bool else None
    if low is not None or high is not None:
        rng = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        return rng + (" or unset" if type(None) in typing.get_args(ann) else "")
    return kind


def validate_policy(merged: dict[str, Any], sources: dict[str, str] | None = None,
                    order: list[str] | None = None) -> Policy:
    """Validate a nested dict into a :class:`Policy`, turning the first error into a one-line ConfigError
    that names the key, the value, what is allowed and (given ``sources``) the layer that set it; ``order``
    lists the layer names from lowest to highest precedence (it picks the layer to blame for a group)."""
    try:
        return Policy.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "policy"
        value = err.get("input")
        origin = _origin(key, sources or {}, order or [])
        if err.get("type") == "extra_forbidden":
            parent = field_info(loc[:-1])
            sub = _submodel(Policy, str(loc[0])) if len(loc) == 2 else None
            model = sub if sub is not None else (parent.annotation if parent is not None else Policy)
            names = ", ".join(getattr(model, "model_fields", {})) if isinstance(model, type) else ""
            raise ConfigError(
                f"unknown setting {key}{origin}", f"known keys here: {names}" if names else "check the spelling"
            ) from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err.get("type") == "literal_error":
            msg = "not one of the allowed values"
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        allowed = allowed_values(loc)
        fix = f"allowed: {allowed}" if allowed else "fix the value and try again"
        if loc and str(loc[-1]) == "level_thresholds":
            fix = "e.g. L1_int8 = 0.7, L2_int4 = 0.5, L3_evict = 0.3"
        raise ConfigError(f"invalid setting {key}{shown}{origin}: {msg}", fix) from None


def _origin(key: str, sources: dict[str, str], order: list[str]) -> str:
    """`` (from env)`` for the layer that set ``key``, else empty. For a group of keys checked together
    (``kv.level_thresholds``) it is the highest-precedence layer that set one of them: the values it
    overrides come from defaults and profiles, which are valid on their own."""
    found = sources.get(key)
    if found is None or found == "default":
        below = [v for k, v in sources.items() if k.startswith(key + ".") and v != "default"]
        rank = {name: i for i, name in enumerate(order)}
        found = max(below, key=lambda name: rank.get(name, -1)) if below else None
    return f" (from {found})" if found and found != "default" else ""


def resolve(layers: list[tuple[str, dict[str, Any]]]) -> Resolved:
    """Merge ``(source_name, nested_dict)`` layers in order (later wins) into a validated policy."""
    merged: dict[str, Any] = {}
    sources = {key: "default" for key in flatten(Policy().model_dump())}
    order: list[str] = []
    for name, layer in layers:
        if not layer:
            continue
        layer = canonical_keys(layer)
        unknown = set(layer) - set(POLICY_SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown setting section {sorted(map(str, unknown))[0]!r} in {name}",
                f"use one of: {', '.join(POLICY_SECTIONS)}",
            )
        merged = deep_merge(merged, layer)
        order.append(name)
        for key in flatten(layer):
            sources[key] = name
    return Resolved(policy=validate_policy(merged, sources, order), sources=sources)


def resolved_to_json(resolved: Resolved) -> dict[str, Any]:
    """What a subprocess needs of resolved settings: the validated policy and the profiles applied."""
    return {"policy": resolved.policy.model_dump(mode="json"), "profiles": list(resolved.profiles)}


def resolved_from_json(data: dict[str, Any]) -> Resolved:
    """The inverse of :func:`resolved_to_json` (no layer is read again)."""
    return Resolved(policy=Policy.model_validate(data["policy"]), profiles=list(data.get("profiles") or []))
