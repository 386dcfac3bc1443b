"""The KV-cache quantizer: graph rewrite, group quantization, the segmented cache and its policy."""
