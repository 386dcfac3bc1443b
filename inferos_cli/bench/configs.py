"""What a comparison compares: the ``--compare`` names (shared by ``bench`` and ``eval``), and each bench
config resolved to its settings once, in the parent, before anything runs.

A worker or probe subprocess gets the resolved settings as JSON (:func:`inferos_cli.settings.resolved_to_json`) and rebuilds
them with :func:`inferos_cli.settings.resolved_from_json`, so settings are never resolved a second time below the command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence


if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Resolved


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
