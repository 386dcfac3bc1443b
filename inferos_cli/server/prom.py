"""Prometheus view of the service: a registry per app (never the global one), fed by finished requests
and, at scrape time, by the latest KV and utilisation readings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.server.metrics import RequestRecord
    from inferos_cli.server.service import InferenceService

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: ``outcome`` label of ``inferos_requests`` per RequestRecord.outcome
OUTCOMES = {"completed": "ok", "failed": "error", "cancelled": "cancelled"}


class PromMetrics:
    """The named inferos metrics on a private ``CollectorRegistry``."""

    def __init__(self, service: "InferenceService") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "inferos_time_to_first_token_seconds", "Prompt handed to the engine -> first token (seconds)",
            buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "inferos_time_per_output_token_seconds", "Seconds between consecutive generated tokens",
            buckets=TPOT_BUCKETS, registry=self.registry,
        )
        self.prompt_tokens = Counter("inferos_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("inferos_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("inferos_requests", "Finished requests", ["outcome"], registry=self.registry)
        self.kv_bytes = Gauge("inferos_kv_cache_bytes", "KV bytes holding tokens per tier (latest request)",
                              ["tier"], registry=self.registry)
        self.kv_reserved = Gauge("inferos_kv_cache_reserved_bytes", "KV bytes allocated per tier (latest request)",
                                 ["tier"], registry=self.registry)
        self.util = Gauge("inferos_device_utilization_ratio", "Device utilisation 0..1 (measured devices only)",
                          ["device"], registry=self.registry)
        self.rss = Gauge("inferos_process_resident_bytes", "Process RSS (bytes)", registry=self.registry)
        service.recorder.listeners.append(self.observe)

    def observe(self, rec: "RequestRecord") -> None:
        """Count one finished request."""
        self.requests.labels(outcome=OUTCOMES[rec.outcome]).inc()
        if rec.ttft_s is not None:
            self.ttft.observe(rec.ttft_s)
        for gap in rec.decode_token_times:
            self.tpot.observe(gap)
        self.prompt_tokens.inc(rec.prompt_tokens)
        self.generation_tokens.inc(rec.generated)

    def render(self) -> tuple[bytes, str]:
        """Refresh the gauges from live readings and return the exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from inferos_cli.machine.rss import current_rss

        kv = self.service.recorder.latest_kv
        if kv is not None:
            for tier, value in kv.held.items():
                self.kv_bytes.labels(tier=tier).set(value)
            for tier, value in kv.reserved.items():
                self.kv_reserved.labels(tier=tier).set(value)
        util: dict[str, Any] = self.service.util()
        for device, value in util.items():
            if isinstance(value, (int, float)):
                self.util.labels(device=device).set(float(value) / 100.0)
        rss = current_rss()
        if rss is not None:
            self.rss.set(rss)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
