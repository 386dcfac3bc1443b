"""Host-side KV caches: the protocol (``base``), the plain, segmented and fused caches, group quantization,
tier assignment, and the layouts that pair a cache with its graph."""
