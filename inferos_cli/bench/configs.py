"""What a comparison compares: the ``--compare`` names (shared by ``bench`` and ``eval``), and each bench
config resolved to its settings once, in the parent, before anything runs.

A worker or probe subprocess gets the resolved settings as JSON (:func:`resolved_to_json`) and rebuilds
them with :func:`resolved_from_json`, so settings are never resolved a second time below the command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from inferos_cli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Resolved


def parse_compare(text: str | None, *, reference: str | None = None,
                  example: str = "baseline,inferos") -> list[str]:
    """``"baseline,inferos,7b+chat"`` -> names in order, a name given twice kept once.

    ``reference`` (``eval``'s ``baseline``) is always included and put first. An empty list is a
    UsageError whose hint shows ``example``.
    """
    names = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not names:
        raise UsageError("--compare is empty", f"e.g. --compare {example}")
    names = list(dict.fromkeys(names))
    if reference is not None:
        names = [reference] + [n for n in names if n != reference]
    return names


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``; a one-line UsageError for anything else."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma list of integers, got {text!r}", f"e.g. {what} 1,4,8") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{what} needs positive integers, got {text!r}", f"e.g. {what} 1,4,8")
    return list(dict.fromkeys(values))


def profile_of(config: str) -> str:
    """``chat+int4`` -> ``chat,int4`` (profiles merged left to right)."""
    return ",".join(p.strip() for p in config.split("+") if p.strip())


def resolved_to_json(resolved: "Resolved") -> dict[str, Any]:
    """What a subprocess needs of resolved settings: the validated policy and the profiles applied."""
    return {"policy": resolved.policy.model_dump(mode="json"), "profiles": list(resolved.profiles)}


def resolved_from_json(data: dict[str, Any]) -> "Resolved":
    """The inverse of :func:`resolved_to_json` (no layer is read again)."""
    from inferos_cli.settings import Policy, Resolved

    return Resolved(policy=Policy.model_validate(data["policy"]), profiles=list(data.get("profiles") or []))


@dataclass
class ConfigSpec:
    """One column of the comparison: an engine config (profile list, resolved), or a peer."""

    name: str
    kind: str  # "engine" | "ort-genai" | "lemonade"
    profile: str | None = None  # comma list handed to resolve_settings (engine configs)
    profiles: list[str] = field(default_factory=list)  # as resolved (size class first)
    kv: dict[str, Any] = field(default_factory=dict)  # the resolved KV policy
    scheduler: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None
    url: str | None = None
    server_model: str | None = None
    model_path: str | None = None  # the folder a peer loads when it is not the model's own
    resolved: "Resolved | None" = field(default=None, repr=False)  # engine configs; not in the results

    def to_json(self) -> dict[str, Any]:
        """Plain data for results (the resolved settings appear as ``profiles``, ``kv`` and ``scheduler``)."""
        data = asdict(replace(self, resolved=None))
        data.pop("resolved")
        return data


def build_configs(
    names: Sequence[str],
    info: "ModelInfo",
    *,
    profile: str | None,
    config_path: Path | None,
    url: str | None = None,
    server_model: str | None = None,
) -> list[ConfigSpec]:
    """Resolve every ``--compare`` name before anything runs (an unknown profile fails here, in one line).

    - ``baseline``: the ``--profile`` stack plus the ``baseline`` preset (KV off, same devices);
    - ``inferos``: the ``--profile`` stack (default: the model's size class);
    - any other name, or names joined with ``+``: the ``--profile`` stack plus those profiles/presets;
    - ``ort-genai`` / ``lemonade``: peers, skipped with a reason when they cannot run.
    """
    from inferos_cli.profiles import resolve_settings, split_names

    base = split_names(profile)
    out: list[ConfigSpec] = []
    for name in names:
        if name == "ort-genai":
            from inferos_cli.bench.peers import genai_folder, genai_skip_reason

            reason = genai_skip_reason(info)
            spec = ConfigSpec(name=name, kind="ort-genai", skip_reason=reason)
            if reason is None:
                spec.model_path = str(genai_folder(info))
            out.append(spec)
            continue
        if name == "lemonade":
            from inferos_cli.backends.lemonade import default_url
            from inferos_cli.bench.peers import lemonade_skip_reason

            out.append(ConfigSpec(name=name, kind="lemonade", url=default_url(url), server_model=server_model,
                                  skip_reason=lemonade_skip_reason(url)))
            continue
        if name == "inferos":
            stack = list(base)
        elif name == "baseline":
            stack = [n for n in base if n != "baseline"] + ["baseline"]
        else:
            stack = base + [p.strip() for p in name.split("+") if p.strip()]
        joined = ",".join(stack) or None
        resolved = resolve_settings(joined, param_count=info.param_count, config_path=config_path)
        out.append(
            ConfigSpec(
                name=name,
                kind="engine",
                profile=joined,
                profiles=list(resolved.profiles),
                kv=resolved.policy.kv.model_dump(mode="json"),
                scheduler=resolved.policy.scheduler.model_dump(mode="json"),
                resolved=resolved,
            )
        )
    return out
