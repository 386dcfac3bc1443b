"""Decoder graph builders, one module per architecture family on a shared base (onnxruntime-genai's layout).

:func:`build_decoder` is the entry: it picks the builder for ``spec.arch`` from :data:`BUILDERS`, builds the
graph with its initializers streamed into ``model.onnx.data`` and writes ``model.onnx``. ``base`` holds the
common decoder, ``writer`` the :class:`GraphWriter`, and each architecture module (``llama``, ``qwen3``,
``phi3``, ``gemma``) its builder.
"""

from __future__ import annotations

import os
from pathlib import Path

from inferos_cli.errors import ConversionError
from inferos_cli.models.builders.base import DecoderBuilder
from inferos_cli.models.builders.gemma import GemmaBuilder
from inferos_cli.models.builders.llama import LlamaBuilder
from inferos_cli.models.builders.phi3 import Phi3Builder
from inferos_cli.models.builders.qwen3 import Qwen3Builder
from inferos_cli.models.builders.writer import GraphWriter
from inferos_cli.models.weights import DecoderSpec, DecoderWeights

BUILDERS: dict[str, type[DecoderBuilder]] = {
    arch: cls for cls in (LlamaBuilder, Qwen3Builder, Phi3Builder, GemmaBuilder) for arch in cls.archs}


def builder_for(arch: str) -> type[DecoderBuilder]:
    """The builder class of a ``DecoderSpec.arch``; ConversionError for an architecture none builds."""
    try:
        return BUILDERS[arch]
    except KeyError:
        raise ConversionError(f"no graph builder for architecture {arch!r}",
                              f"inferos builds {', '.join(BUILDERS)}; pass an ONNX folder for others") from None


def build_decoder(spec: DecoderSpec, weights: DecoderWeights, folder: Path, *,
                  accuracy_level: int = 0, attention: str = "op", onnx_name: str = "model.onnx") -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` for ``weights`` into ``folder``; return the .onnx path."""
    builder_cls = builder_for(spec.arch)
    folder.mkdir(parents=True, exist_ok=True)
    writer = GraphWriter(folder / (onnx_name + ".data"))
    try:
        model = builder_cls(spec, writer, accuracy_level=accuracy_level, attention=attention).build(weights)
    finally:
        writer.close()
    path = folder / onnx_name
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    return path
