"""Parameter counts: read from model files without loading weights, parsed from ``--params``, and the size
class they pick (the profiles ``3b 7b 13b 20b``, applied first by :func:`inferos_cli.profiles.resolve_settings`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from inferos_cli.errors import ModelError, UsageError

SIZE_CLASSES = ("3b", "7b", "13b", "20b")
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def size_class(param_count: int | None) -> str | None:
    """Profile name for a model's parameter count: 3b (<= ~3.5B), 7b (<= ~10B), 13b (<= ~16B), else 20b."""
    if not param_count:
        return None
    billions = param_count / 1e9
    if billions <= 3.5:
        return "3b"
    if billions <= 10:
        return "7b"
    if billions <= 16:
        return "13b"
    return "20b"


def parse_param_count(text: str) -> int:
    """``7B`` / ``135M`` / ``1.5b`` / ``13e9`` / ``7000000000`` -> an integer parameter count."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not match:
        raise UsageError(f"--params {text!r} is not a parameter count", "use e.g. 7B, 135M or 13e9")
    return int(float(match.group(1)) * _COUNT_UNITS[match.group(2)])


def gguf_param_count(path: Path) -> int:
    """Parameter count of a GGUF file from its tensor table (memory-mapped header; no weights are read)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return int(sum(int(t.n_elements) for t in reader.tensors))
    except Exception as exc:  # malformed or truncated file
        raise ModelError(f"{path} is not a readable GGUF file: {str(exc)[:160]}") from None


def safetensors_param_count(folder: Path) -> int:
    """Parameter count of a Hugging Face folder from its ``*.safetensors`` headers (no weights are read)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with file.open("rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
        except (OSError, struct.error, ValueError) as exc:
            raise ModelError(f"{file} has no readable safetensors header: {exc}") from None
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
