"""Shared command-line options as ``Annotated`` aliases, so every command spells them the same way."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from inferos_cli.errors import UsageError


class TableFormat(str, Enum):
    """Output formats of commands that print one table."""

    table = "table"
    json = "json"


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m",
        help="Alias (smollm2-135m), cached name, .gguf file, Hugging Face folder, ONNX folder or .onnx file. "
        "Default: smollm2-135m, fetched and converted on first use.",
        show_default=False,
    ),
]
ProfileOpt = Annotated[
    Optional[str],
    typer.Option(
        "--profile", "-p",
        help="Profile name or comma list merged left to right (chat, batch, quality, 3b, 7b, 13b, 20b, "
        "int8, int4, ...). The model's size class is applied first. See `inferos profiles list`.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Config file (TOML, or the guide's YAML with `infer_os:`).", show_default=False),
]
FormatOpt = Annotated[
    TableFormat, typer.Option("--format", "-f", help="table for people, json for scripts.", case_sensitive=False)
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="ONNX Runtime intra-op threads (default: half the physical cores, 1-8).", show_default=False),
]
StrictDevicesOpt = Annotated[
    bool,
    typer.Option("--strict-devices", help="Fail instead of falling back to CPU when a requested provider does not work."),
]


class PolicyFormat(str, Enum):
    """Output formats of commands that print a resolved policy."""

    table = "table"
    toml = "toml"
    json = "json"


PolicyFormatOpt = Annotated[
    PolicyFormat,
    typer.Option("--format", "-f", help="table for people, toml (a loadable config) or json for scripts.",
                 case_sensitive=False),
]

KVBudgetOpt = Annotated[
    Optional[str],
    typer.Option("--kv-budget", help="Cap on resident KV bytes (e.g. 64MiB): int8 tokens are demoted to int4, "
                 "then low-importance tokens evicted (models with position_ids). Sets kv.budget_bytes.",
                 show_default=False),
]


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}
_ESCAPE = re.compile(r"\\([nrt'\"\\]|x[0-7][0-9a-fA-F])")


def unescape(text: str) -> str:
    """C-style escapes as llama.cpp reads them (``--escape``, on by default): ``\\n \\r \\t \\' \\" \\\\``
    and ``\\xHH`` (ASCII) become the characters; any other backslash stays as typed. A shell passes
    ``--stop "\\n\\n"`` as backslash-n, so without this the stop string could never match."""
    return _ESCAPE.sub(lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" else _ESCAPES[m[1]], text)


def unescape_all(values: Optional[list[str]]) -> Optional[list[str]]:
    """:func:`unescape` over a repeatable option's values (None stays None)."""
    return None if values is None else [unescape(v) for v in values]


StopOpt = Annotated[
    Optional[list[str]],
    typer.Option("--stop", callback=unescape_all, show_default=False,
                 help='Stop string (repeatable); \\n, \\t, \\\\ and \\" are understood, e.g. --stop "\\n\\n".'),
]


# Sampling: left unset, each takes Ollama's chat default (GenerationConfig.chat in engine/sampling.py).
TemperatureOpt = Annotated[
    Optional[float],
    typer.Option("--temperature", "-t", min=0.0, show_default=False,
                 help="Sampling temperature; 0 = greedy (the same text every run). Default 0.8, as Ollama; "
                 "with --seed a sampled run repeats exactly."),
]
TopKOpt = Annotated[
    Optional[int],
    typer.Option("--top-k", min=0, show_default=False,
                 help="Sample from the k most likely tokens (0 = all). Default 40."),
]
TopPOpt = Annotated[
    Optional[float],
    typer.Option("--top-p", min=0.0, max=1.0, show_default=False,
                 help="Nucleus sampling: the smallest set of tokens with this much probability. Default 0.9."),
]
RepetitionPenaltyOpt = Annotated[
    Optional[float],
    typer.Option("--repetition-penalty", min=0.01, show_default=False,
                 help="Penalty on the tokens of the last 64 (1 = off). Default 1.1; off with --temperature 0 "
                 "unless given."),
]


# Comma lists of the comparing commands (bench, eval).
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
