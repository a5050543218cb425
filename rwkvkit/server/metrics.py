"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own so that two
servers in one process (tests) do not collide."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rwkvkit.prompt_cache import PromptCache

# seconds: a cached prompt's first token on a small model is ~1 ms, a long prompt's on a CPU minutes
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _CacheCollector(Collector):
    def __init__(self, cache: PromptCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.cache.stats()
        yield CounterMetricFamily("rwkvkit_prompt_cache_hits", "prompts that started from a cached prefix state", value=stats.hits)
        yield CounterMetricFamily("rwkvkit_prompt_cache_misses", "prompts with no cached prefix", value=stats.misses)
        yield GaugeMetricFamily("rwkvkit_prompt_cache_bytes", "memory held by cached prompt states", value=stats.bytes)


class Metrics:
    def __init__(self, cache: PromptCache | None) -> None:
        self.registry = r = CollectorRegistry()
        self.queue_length = Gauge("rwkvkit_queue_length", "sequences waiting for a slot in the batch", registry=r)
        self.active_sequences = Gauge("rwkvkit_active_sequences", "sequences in the batch (prefilling or decoding)", registry=r)
        self.generated_tokens = Counter("rwkvkit_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("rwkvkit_prompt_tokens", "prompt tokens of started sequences", registry=r)
        self.requests = Counter("rwkvkit_requests", "HTTP requests answered, by path and status", ["path", "status"], registry=r)
        self.ttft = Histogram("rwkvkit_time_to_first_token_seconds", "from a request's arrival to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("rwkvkit_time_per_output_token_seconds", "between a sequence's tokens", buckets=TOKEN_BUCKETS, registry=r)
        if cache is not None:
            r.register(_CacheCollector(cache))
