"""bench loads a cell's workers side by side only when they fit in memory (a 7B model's four workers
do not fit in 16-24 GB): the grouping is decided from the real model folder's bytes and KV shape."""

from __future__ import annotations

from pathlib import Path

from inferos_cli.bench.configs import ConfigSpec
from inferos_cli.bench.run import resident_groups
from inferos_cli.models.info import inspect_folder


def specs(*names: str) -> list[ConfigSpec]:
    return [ConfigSpec(name=n, kind="engine") for n in names]


def test_workers_load_together_when_they_fit_and_one_at_a_time_when_not(oga_dir: Path) -> None:
    info = inspect_folder(oga_dir.parent)
    folder = sum(f.stat().st_size for f in Path(info.path).iterdir() if f.is_file())
    kv = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4 * 1 * 1024
    live = specs("baseline", "int8-fused", "fp16")
    groups, why = resident_groups(live, info, 1, 1024, available=10 * 3 * (folder + kv))
    assert groups == [live] and why == ""
    groups, why = resident_groups(live, info, 1, 1024, available=3 * (folder + kv))  # 100 % > 80 % of it
    assert [[c.name for c in g] for g in groups] == [["baseline"], ["int8-fused"], ["fp16"]]
    assert "one config at a time" in why and "3 workers" in why
    single = specs("baseline")
    assert resident_groups(single, info, 1, 1024, available=1) == ([single], "")
