"""Graphs derived from a model's ONNX file (KV-boundary rewrite, fused int8 cache, last-position logits,
Attention-op twin, exact-compute twin) and where they are stored (``naming``: inferos' cache, keyed by the
source)."""
