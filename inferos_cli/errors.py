"""The one exception hierarchy of inferos.

Every error a user can cause is an :class:`InferosError` whose ``message`` is one line saying what went
wrong and ``fix`` one line saying what to do. The top-level handler in :mod:`inferos_cli.cli` prints them
and exits with ``exit_code`` (1 for errors, 2 for usage); a traceback only with ``INFEROS_DEBUG=1``.
"""

from __future__ import annotations

from inferos_cli.units import MiB


class InferosError(Exception):
    """Base of every user-facing error: a one-line message, an optional one-line fix, an exit code."""

    exit_code: int = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def one_line(self) -> str:
        """The message and the fix joined into the single line the CLI prints."""
        return f"{self.message} ({self.fix})" if self.fix else self.message


class UsageError(InferosError):
    """Bad command-line usage: wrong combination of flags, malformed value."""

    exit_code = 2


class ConfigError(InferosError):
    """An invalid setting: names the key, the value and the allowed range."""


class ProfileError(InferosError):
    """An unknown or malformed profile."""


class ModelError(InferosError):
    """A model that cannot be found, read or understood."""


class ModelNotFoundError(ModelError):
    """`--model` names nothing inferos can resolve."""


class ConversionError(ModelError):
    """A GGUF / safetensors file that cannot be converted to ONNX."""


class NetworkError(InferosError):
    """A download that needs a network this machine does not have."""


class ProviderError(InferosError):
    """An execution provider that was required (``--strict-devices``) but does not work."""


class ContextOverflowError(InferosError):
    """A prompt (plus requested tokens) longer than the model's context."""


class BackendError(InferosError):
    """A Lemonade server or GAIA CLI that is missing or answered badly."""


class DeviceMemoryError(InferosError):
    """An execution provider's memory pool could not serve an allocation (a GPU run too big for its cap)."""


def device_memory_error(exc: BaseException) -> DeviceMemoryError | None:
    """The one-line form of an onnxruntime failure caused by a full device memory pool (onnxruntime's
    ``BFCArena``: "Available memory of A is smaller than requested bytes of R", or a CUDA out-of-memory),
    else None. The CUDA pool is capped by ``io.dml_pool_bytes`` (its ``gpu_mem_limit``)."""
    import re

    text = str(exc)
    if "BFCArena" not in text and "out of memory" not in text.lower():
        return None
    node = re.search(r"running (\w+) node", text)
    sizes = re.search(r"Available memory of (\d+) is smaller than requested bytes of (\d+)", text)
    where = f" in {node.group(1)}" if node else ""
    detail = (f": {int(sizes.group(2)) / MiB:.0f} MiB asked, {int(sizes.group(1)) / MiB:.0f} MiB left"
              if sizes else "")
    return DeviceMemoryError(
        f"the device ran out of memory{where}{detail}",
        "raise io.dml_pool_bytes (e.g. INFEROS_IO__DML_POOL_BYTES=16GiB; it caps the CUDA pool), "
        "or use a smaller batch or prompt",
    )
