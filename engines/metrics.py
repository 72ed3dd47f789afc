"""Prometheus metrics of one engine worker, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engines.engine import EngineStats

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _StatsCollector(Collector):
    """Load gauges read from the engine at scrape time, so they are never stale."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("engine_num_requests_running", "Requests in the running batch.", value=s.running)
        yield GaugeMetricFamily("engine_num_requests_waiting", "Requests waiting to join the batch.", value=s.waiting)
        yield GaugeMetricFamily("engine_kv_blocks_used", "KV cache blocks in use.", value=s.kv_blocks_used)
        yield GaugeMetricFamily("engine_kv_blocks_total", "KV cache blocks in all.", value=s.kv_blocks_total)
        yield GaugeMetricFamily("engine_kv_cache_usage_perc", "Fraction of the KV cache in use.", value=s.kv_usage)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "engine_requests", "Finished requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.aborted = Counter("engine_requests_aborted", "Requests aborted by a client disconnect.", registry=r)
        self.prompt_tokens = Counter("engine_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("engine_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "engine_time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        self.registry.register(_StatsCollector(stats))
