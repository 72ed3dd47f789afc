"""The gateway's Prometheus metrics. Label values come only from the config (models, engines,
route names, which the admin API may also set), a fixed status set and key ids, never from free
client input, so label sets stay bounded. `route` is the version label of a model's route (`-`
for a request that never reached one), so versions compare side by side.

Each process keeps its values in memory (prometheus_client's plain values: an update adds a float
under a lock). With `--workers N`, a scrape of any worker shows the sum over all workers
(gateway/core/metrics_sum.py says how each kind adds up; gateway/core/metrics_link.py asks for it).
Each gauge says how its workers' values add up: `sum` (requests in flight) or `max` (engine health).

The latency and time-to-first-token histograms carry exemplars: the trace id of a sampled request
(gateway/observe/), shown in the OpenMetrics exposition when the scraper asks for it (Accept:
application/openmetrics-text); with several workers, each bucket shows the newest of any worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from gateway.core.errors import GatewayError
from gateway.core.metrics_link import MetricsLink
from gateway.core.metrics_sum import Families, Summed, described, snapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COLD_START_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Children(dict[Any, Any]):
    """A labelled metric's children by label values (one value, or a tuple of them), looked up as
    a plain dict: a hit never runs Python code, where prometheus_client's own `labels()`
    validates and locks on every call, which shows in per-request profiles."""

    __slots__ = ("_metric",)

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self._metric = metric

    def __missing__(self, labels: Any) -> Any:
        child = self[labels] = (
            self._metric.labels(*labels) if isinstance(labels, tuple) else self._metric.labels(labels)
        )
        return child


class GatewayMetrics:
    def __init__(self, hub: str | None = None) -> None:
        """`hub`: the main process's metrics hub, with several workers (gateway/process/metrics_hub.py)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauge_merge: dict[str, str] = {}
        r = self.registry
        gauge = self._gauge
        self.requests = Counter(
            "gateway_requests",
            "Requests by public model, engine, status, route (version) and API (chat, responses, messages, ...).",
            ["model", "engine", "status", "route", "api"],
            registry=r,
        )
        self.key_requests = Counter(
            "gateway_key_requests", "Requests by API key id and status.", ["key_id", "status"], registry=r
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Whole request latency.",
            ["model", "route", "api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time to the first streamed chunk.",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Gap between streamed chunks.",
            ["model", "route"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens.", ["model", "route"], registry=r)
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens.", ["model", "route"], registry=r
        )
        self.key_tokens = Counter(
            "gateway_key_tokens", "Tokens by API key id and kind.", ["key_id", "kind"], registry=r
        )
        self.in_flight = gauge("gateway_requests_in_flight", "Requests being served.", across="sum")
        self.streams = gauge("gateway_streams_in_flight", "Streams being relayed.", across="sum")
        self.engine_healthy = gauge(
            "gateway_engine_healthy", "1 when the engine passes health checks.", ["engine"], across="max"
        )
        self.engine_outstanding = gauge(
            "gateway_engine_outstanding_requests", "Requests in flight to the engine.", ["engine"], across="sum"
        )
        self.engine_waiting = gauge(
            "gateway_engine_waiting_requests", "The engine's own waiting queue.", ["engine"], across="max"
        )
        self.routing = Counter(
            "gateway_routing_decisions", "Engines picked per model.", ["model", "engine"], registry=r
        )
        self.retries = Counter("gateway_retries", "Requests retried on another engine.", ["model"], registry=r)
        self.resumes = Counter(
            "gateway_stream_resumes",
            "Streams whose engine failed after the first byte, by outcome: resumed on another engine, or failed.",
            ["model", "outcome"],
            registry=r,
        )
        self.fallbacks = Counter(
            "gateway_fallbacks",
            "Requests served by a fallback model, by model asked and model that served.",
            ["model", "served"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by engine and kind.", ["engine", "kind"], registry=r
        )
        self.client_disconnects = Counter(
            "gateway_client_disconnects",
            "Requests whose client went away before the end.",
            ["model"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "gateway_quota_rejections", "Requests refused by a quota, by limit.", ["limit"], registry=r
        )
        self.redis_errors = Counter("gateway_redis_errors", "Failed Redis operations.", registry=r)
        self.fail_open = Counter(
            "gateway_quota_fail_open",
            "Requests admitted by the per-process limiter while Redis was down.",
            registry=r,
        )
        # The inference log (gateway/monitor/writer.py): rows are dropped, never waited for.
        self.inference_log_dropped = Counter(
            "gateway_inference_log_dropped",
            "Inference log rows dropped because the store was too slow or down (the buffer was full).",
            registry=r,
        )
        self.inference_log_written = Counter("gateway_inference_log_written", "Inference log rows written.", registry=r)
        self.inference_log_write_errors = Counter(
            "gateway_inference_log_write_errors", "Failed writes of a batch of inference log rows.", registry=r
        )
        # Tracing (gateway/observe/tracing.py): spans are dropped, never waited for.
        self.trace_spans_dropped = Counter(
            "gateway_trace_spans_dropped",
            "Spans not exported, by reason: queue_full (the collector is slower than the traffic) or "
            "export_failed (the collector is down or refused them).",
            ["reason"],
            registry=r,
        )
        # The scheduler (gateway/dispatch/scheduler.py): requests waiting for an engine slot, by band.
        self.queued = gauge(
            "gateway_queued_requests", "Requests waiting in the gateway for an engine slot.", ["band"], across="sum"
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a dispatched request waited for an engine slot.",
            ["band"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dispatches = Counter("gateway_dispatches", "Requests dispatched from the queue.", ["band"], registry=r)
        self.queue_timeouts = Counter(
            "gateway_queue_timeouts", "Requests that waited max_queue_wait (429 queue_timeout).", ["band"], registry=r
        )
        self.queue_full = Counter(
            "gateway_queue_full",
            "Requests refused at once: their key had max_queued_per_key waiting.",
            ["band"],
            registry=r,
        )
        # Batch inference (gateway/batch/): counted by the process where each thing happened.
        # Lines per second: rate(gateway_batch_lines_total[1m]).
        self.batches = Counter(
            "gateway_batches", "Batches that reached a status here, by status.", ["status"], registry=r
        )
        self.batch_lines = Counter(
            "gateway_batch_lines",
            "Batch lines finished here, by outcome: completed, failed, expired, cancelled, or discarded "
            "(a result refused because its line was taken over, cancelled or expired meanwhile).",
            ["outcome"],
            registry=r,
        )
        self.batch_lines_in_flight = gauge("gateway_batch_lines_in_flight", "Batch lines running.", across="sum")
        self.batches_by = Children(self.batches)
        self.batch_lines_by = Children(self.batch_lines)
        # Scale to zero (gateway/dispatch/wake.py): engine states, cold starts, the wait they cost.
        self.engine_state = gauge(
            "gateway_engine_state",
            "1 for the engine's current state: stopped, starting, healthy, unhealthy.",
            ["engine", "state"],
            across="max",
        )
        self.engine_breaker = gauge(
            "gateway_engine_breaker_state",
            "1 for the engine's circuit breaker state in this process: closed, open, half_open.",
            ["engine", "state"],
            across="max",
        )
        self.breaker_opens = Counter(
            "gateway_engine_breaker_opens",
            "Times an engine's circuit breaker opened: its requests kept failing.",
            ["engine"],
            registry=r,
        )
        self.cold_starts = Counter(
            "gateway_engine_cold_starts", "Stopped engines started by a request.", ["engine"], registry=r
        )
        # What an autoscaler starts the first engine on (deploy/k8s/base/vllm-scaledobject.yaml).
        self.cold_waiting = gauge(
            "gateway_cold_waiting_requests",
            "Requests waiting for a cold model (engines stopped or scaled to zero) to get its first engine.",
            ["model"],
            across="sum",
        )
        self.cold_start_wait = Histogram(
            "gateway_cold_start_wait_seconds",
            "How long requests waited for a stopped engine of their model to start.",
            ["model"],
            buckets=COLD_START_BUCKETS,
            registry=r,
        )
        # The response cache (gateway/cache/): hit ratio per model = hit / (hit + miss).
        self.cache = Counter(
            "gateway_cache_requests",
            "Requests that consulted the response cache, by model and result.",
            ["model", "result"],
            registry=r,
        )
        self.cache_tokens = Counter(
            "gateway_cache_tokens",
            "Tokens answered from the response cache (not generated), by model.",
            ["model"],
            registry=r,
        )
        self.cache_by = Children(self.cache)
        self.cache_tokens_by = Children(self.cache_tokens)
        # LoRA adapters (gateway/adapters/); labels: configured adapters and engines only.
        self.adapter_loads = Counter(
            "gateway_adapter_loads",
            "Adapter loads onto engines, by adapter, engine and outcome.",
            ["adapter", "engine", "outcome"],
            registry=r,
        )
        self.adapter_unloads = Counter(
            "gateway_adapter_unloads",
            "Adapters unloaded from engines (room for another).",
            ["adapter", "engine"],
            registry=r,
        )
        self.adapter_load_time = Histogram(
            "gateway_adapter_load_seconds",
            "How long loading an adapter onto an engine took.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_requests = Counter(
            "gateway_adapter_requests", "Requests for an adapter, by adapter.", ["adapter"], registry=r
        )
        self.adapter_loads_by = Children(self.adapter_loads)
        self.adapter_unloads_by = Children(self.adapter_unloads)
        self.adapter_requests_by = Children(self.adapter_requests)
        # The children the request path touches, by label values (see Children).
        self.requests_by = Children(self.requests)
        self.key_requests_by = Children(self.key_requests)
        self.latency_by = Children(self.latency)
        self.ttft_by = Children(self.ttft)
        self.itl_by = Children(self.itl)
        self.prompt_tokens_by = Children(self.prompt_tokens)
        self.completion_tokens_by = Children(self.completion_tokens)
        self.key_tokens_by = Children(self.key_tokens)
        self.routing_by = Children(self.routing)
        self.retries_by = Children(self.retries)
        self.resumes_by = Children(self.resumes)
        self.fallbacks_by = Children(self.fallbacks)
        self.breaker_opens_by = Children(self.breaker_opens)
        self.upstream_errors_by = Children(self.upstream_errors)
        self.disconnects_by = Children(self.client_disconnects)

        self._described = described(r)
        self._link = MetricsLink(hub, self.snapshot) if hub else None

    def _gauge(
        self, name: str, documentation: str, labels: Sequence[str] = (), *, across: Literal["sum", "max"]
    ) -> Gauge:
        """A gauge, and how several workers' values of it add up into one scrape."""
        self._gauge_merge[name] = across
        return Gauge(name, documentation, labels, registry=self.registry)

    def observe(self, children: Children, labels: tuple[str, ...], value: float, trace_id: str | None) -> None:
        """A histogram observation, with the trace id of a sampled request as its exemplar."""
        if trace_id is None:
            children[labels].observe(value)
        else:
            children[labels].observe(value, {"trace_id": trace_id})

    async def start(self) -> None:
        if self._link is not None:
            await self._link.start()

    async def stop(self) -> None:
        if self._link is not None:
            await self._link.stop()

    def snapshot(self) -> Families:
        return snapshot(self.registry, self._gauge_merge)

    async def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """/metrics: this process's metrics, or with several workers the sum over all of them."""
        if self._link is None:
            return self.render(accept)
        try:
            families = await self._link.sum()
        except (ConnectionError, TimeoutError):
            raise GatewayError(503, "The metrics of this gateway's other workers cannot be gathered now.") from None
        return self.render(accept, families)

    def render(self, accept: str = "", families: Families | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics (with exemplars) when `accept` asks for it.
        `families`: merged ones (gateway/core/metrics_sum.py) in place of this process's own."""
        registry = self.registry
        if families is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(Summed(families, self._described))
        if "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(registry), TEXT
