"""Execution: the plan (graph, KV layout, session and IOBinding per phase), sessions and providers, the
forward step, token generation and its events, continuous batching, sampling, stops, chat, the engine
provider (one engine per policy)."""
