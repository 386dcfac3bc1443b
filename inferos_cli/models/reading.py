"""Reading checkpoint files tensor by tensor (GGUF and safetensors alike): a plain file read into a fresh
array, never a memory map whose touched pages would stay resident for the whole conversion, and the count of
bytes read behind ``pull``'s ``"convert"`` progress stage."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from inferos_cli.errors import ConversionError

#: ``(stage, done, total)``: how conversions and downloads report progress.
ProgressFn = Callable[[str, int, int], None]


def read_at(path: Path, offset: int, out: np.ndarray, name: str) -> None:
    """Fill ``out`` with the bytes of ``path`` at ``offset``; tensor ``name`` running past the end of the file
    is a one-line error."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        if handle.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise ConversionError(f"{path} is truncated: tensor {name} runs past the end of the file",
                                  "download the file again")


class ReadProgress:
    """Bytes read so far of ``total``, reported to ``progress`` as the ``"convert"`` stage."""

    def __init__(self, total: int, progress: ProgressFn | None = None) -> None:
        self.total = total
        self.done = 0
        self.progress = progress

    def report(self, nbytes: int) -> None:
        """Count ``nbytes`` more as read (capped at the total) and report them."""
        self.done = min(self.done + nbytes, self.total)
        if self.progress:
            self.progress("convert", self.done, self.total)

    def finish(self) -> None:
        """Report every byte as read (tensors never needed, e.g. a tied head or rope factors, count as done)."""
        self.report(self.total)
