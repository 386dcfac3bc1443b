"""``inferos bench``: configs (what is compared, resolved once), grid (cells, metrics, prompts), runner and
worker (a subprocess per config), peers (onnxruntime-genai, Lemonade), run (the interleaved loop, quality),
results (samples, statistics, host record)."""
