"""Old import location of the decoder graph builder, kept while callers move (plain re-exports).

New homes: weights and quantization in :mod:`inferos_cli.models.weights`; the builders in
:mod:`inferos_cli.models.builders` (``build_decoder``), ``builders.base`` (``DecoderBuilder``, ``rope_tables``,
``attention_bias``, ``rope_attention``) and ``builders.writer`` (``GraphWriter``).
"""

from inferos_cli.models.builders import build_decoder
from inferos_cli.models.builders.base import (
    ATTENTION_MODES,
    NEG_INF_BIAS,
    DecoderBuilder,
    attention_bias,
    rope_attention,
    rope_tables,
)
from inferos_cli.models.builders.writer import GraphWriter
from inferos_cli.models.weights import (
    BLOCK,
    DecoderSpec,
    DecoderWeights,
    LayerWeights,
    QuantWeight,
    Weight,
    concat_rows,
    pack_nibbles,
    quantize_rtn,
)

__all__ = [
    "ATTENTION_MODES", "BLOCK", "NEG_INF_BIAS", "DecoderBuilder", "DecoderSpec", "DecoderWeights", "GraphWriter",
    "LayerWeights", "QuantWeight", "Weight", "attention_bias", "build_decoder", "concat_rows", "pack_nibbles",
    "quantize_rtn", "rope_attention", "rope_tables",
]
