"""Engine helpers for the tests: load an engine the way a command does, copy a cache, run a session bound."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def load_engine(model: str | Path, profile: str | None = None, *, flags: dict[str, Any] | None = None,
                policy: dict[str, Any] | None = None, threads: int | None = 1, use_env: bool = True,
                **engine_kwargs: Any) -> Any:
    """Resolve ``model`` (alias, folder or file) and the settings once, as the commands do, and open an
    :class:`~inferos_cli.engine.engine.Engine`. ``policy``: a whole policy (dict) instead of a profile and
    flags (no settings resolution at all)."""
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.settings import Policy, Resolved

    info = resolve_model(str(model), progress=False)
    if policy is not None:
        resolved = Resolved(policy=Policy.model_validate(policy))
    else:
        from inferos_cli.profiles import resolve_settings

        resolved = resolve_settings(profile, param_count=info.param_count, flags=flags, use_env=use_env)
    return Engine(info, resolved, threads=threads, **engine_kwargs)


def clone_cache(cache: Any) -> Any:
    """A deep copy of a KV cache (e.g. to branch a conversation): the model facts and the cache config are
    shared, the arrays copied; the copy's buffers are new, so any kept IOBinding of them is not reused."""
    memo: dict[int, Any] = {id(cache.info): cache.info}
    cfg = getattr(cache, "cfg", None)
    if cfg is not None:
        memo[id(cfg)] = cfg
    twin = copy.deepcopy(cache, memo)
    if twin.generation is not None:
        twin.generation = None  # new buffers: the step binds them afresh
    return twin


def session_run(session: Any, output_names: list[str] | None, feeds: dict[str, np.ndarray], *,
                bind: bool = False, out_buffers: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run an onnxruntime session; outputs in ``output_names`` order. With ``bind`` (or ``out_buffers``)
    through an IOBinding: an output named in ``out_buffers`` is written straight into that preallocated,
    C-contiguous host array and returned as that array."""
    names = output_names or [o.name for o in session.get_outputs()]
    if not bind and not out_buffers:
        return session.run(names, feeds)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    out_buffers = out_buffers or {}
    for name in names:
        buf = out_buffers.get(name)
        if buf is None:
            binding.bind_output(name, "cpu")
        else:
            binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
    session.run_with_iobinding(binding)
    produced = binding.copy_outputs_to_cpu()
    return [out_buffers[n] if n in out_buffers else arr for n, arr in zip(names, produced)]


@contextlib.contextmanager
def home_env(path: str | Path) -> Iterator[Path]:
    """``INFEROS_HOME`` set to ``path`` for a module-scoped fixture (monkeypatch is per test), restored after."""
    old = os.environ.get("INFEROS_HOME")
    os.environ["INFEROS_HOME"] = str(path)
    try:
        yield Path(path)
    finally:
        if old is None:
            os.environ.pop("INFEROS_HOME", None)
        else:
            os.environ["INFEROS_HOME"] = old
