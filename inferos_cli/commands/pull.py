"""`inferos pull`: fetch an alias (or take a local .gguf / HF folder), convert it to ONNX, cache it."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from inferos_cli.options import FormatOpt, TableFormat


class DtypeChoice(str, Enum):
    """Weight storage of a conversion."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"


def pull(
    name: Annotated[Optional[str], typer.Argument(help="Alias (smollm2-135m, llama-3.2-1b, ...), .gguf file or model folder. "
                                                       "Default: smollm2-135m.", show_default=False)] = None,
    dtype: Annotated[Optional[DtypeChoice], typer.Option("--dtype", help="Weight storage. Default: the GGUF's own "
                                                         "blocks (Q4_0/Q4_1 -> int4, Q8_0 -> int8, lossless); fp32 "
                                                         "for safetensors folders.", case_sensitive=False,
                                                         show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even when cached.")] = False,
    fmt: FormatOpt = TableFormat.table,
) -> None:
    """Fetch and convert a model into the cache, with a progress bar; prints where it is and its facts.

    Example: inferos pull smollm2-135m --dtype fp32
    """
    from inferos_cli.models.resolve import pull as do_pull
    from inferos_cli.ui.models_table import pull_lines, pull_table
    from inferos_cli.ui.output import print_json, print_table

    result = do_pull(name, dtype=dtype.value if dtype else None, force=force, progress=fmt == TableFormat.table)
    info = result.info
    folder = result.folder
    meta_dtype = None
    if (folder / "inferos.json").is_file():
        import json

        meta_dtype = json.loads((folder / "inferos.json").read_text(encoding="utf-8")).get("dtype")
    snapshot = {
        "name": result.name, "path": str(folder), "action": result.action,
        "size_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        "dtype": meta_dtype, "param_count": info.param_count, "architecture": info.architecture,
        "layers": info.num_layers, "heads": info.num_heads, "kv_heads": info.num_kv_heads, "head_dim": info.head_dim,
        "vocab": info.vocab_size, "context": info.context_length, "source_format": info.source_format,
    }
    if fmt == TableFormat.json:
        print_json(snapshot)
    else:
        print_table(pull_table(snapshot), pull_lines(snapshot))
