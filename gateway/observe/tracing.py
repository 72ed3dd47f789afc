"""OpenTelemetry tracing: the SDK's tracer provider, sampler and OTLP exporter, set up once per process.

Spans leave through a `BatchSpanProcessor`: ending a span appends it to a bounded queue and a
thread of the SDK's exports batches from it, so no request ever waits for the collector. A full
queue drops the span (counted in `gateway_trace_spans_dropped{reason="queue_full"}`, without the
SDK's warning per span); a failed export (the collector down or refusing) is counted with
`reason="export_failed"`. A dead collector therefore costs spans, not latency.

Sampling is parent-based: a client's sampled traceparent is followed, an unsampled one is not,
and a new trace is sampled at `sample_ratio`. The context goes on to the engine either way (its
`traceparent` header), so vLLM's spans join the trace when it is sampled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.core.metrics import GatewayMetrics
from gateway.observe.record import Observation
from gateway.observe.spans import RequestTrace
from gateway.settings import TracingSettings

log = logging.getLogger(__name__)

EXPORT_TIMEOUT = 5.0  # seconds one export may take (the SDK's thread retries within it)
SHUTDOWN_TIMEOUT_MS = 3000  # at exit: what is queued gets this long to leave


class _CountingExporter(SpanExporter):
    """The OTLP exporter, with its failures counted."""

    def __init__(self, inner: SpanExporter, failed: Any) -> None:
        self._inner = inner
        self._failed = failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            log.warning("tracing: the export of %d spans failed", len(spans), exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedProcessor(BatchSpanProcessor):
    """The SDK's batch processor, which counts the spans a full queue drops (and does not log each)."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int, dropped: Any) -> None:
        batch = min(512, max_queue_size)  # spans per export (the SDK's default, at most the queue)
        super().__init__(
            exporter, max_queue_size=max_queue_size, schedule_delay_millis=500, max_export_batch_size=batch
        )
        self._max = max_queue_size
        self._dropped = dropped
        self._queue = getattr(self._batch_processor, "_queue", None)  # the SDK's deque; its length only

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= self._max:
            self._dropped.inc()
            return
        super().on_end(span)

    def shutdown(self) -> None:
        self._batch_processor.shutdown(timeout_millis=SHUTDOWN_TIMEOUT_MS)


def _exporter(settings: TracingSettings) -> SpanExporter:
    headers = dict(settings.headers)
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        endpoint = settings.endpoint or ""
        secure = endpoint.startswith("https://")
        return GrpcExporter(endpoint=endpoint, insecure=not secure, headers=headers, timeout=EXPORT_TIMEOUT)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=settings.endpoint, headers=headers, timeout=EXPORT_TIMEOUT)


class Tracing:
    def __init__(self, settings: TracingSettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        resource = Resource.create({"service.name": settings.service_name})
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        exporter = _CountingExporter(_exporter(settings), metrics.trace_spans_dropped.labels("export_failed"))
        dropped = metrics.trace_spans_dropped.labels("queue_full")
        self.provider.add_span_processor(_BoundedProcessor(exporter, settings.queue_size, dropped))
        self.tracer = self.provider.get_tracer("llm-gateway")
        self._propagator = TraceContextTextMapPropagator()
        self._batches: dict[str, trace.SpanContext] = {}

    def begin_server(self, o: Observation, headers: list[tuple[bytes, bytes]]) -> None:
        """The request's server span, continuing the client's traceparent when it sent one."""
        carrier: dict[str, str] | None = None
        for name, value in headers:
            if name == b"traceparent" or name == b"tracestate":
                if carrier is None:
                    carrier = {}
                carrier[name.decode()] = value.decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"{o.method} {o.path}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=o.epoch_ns(o.started),
            attributes={"http.request.method": o.method, "url.path": o.path, "gateway.request_id": o.request_id},
        )
        o.trace = RequestTrace(self.tracer, span)

    def begin_line(self, o: Observation, batch_id: str) -> None:
        """A batch line's span: a trace of its own, linked to its batch's span here."""
        batch = self._batches.get(batch_id)
        span = self.tracer.start_span(
            "batch line",
            kind=SpanKind.INTERNAL,
            start_time=o.epoch_ns(o.started),
            links=[Link(batch)] if batch is not None else None,
            attributes={"gateway.batch_id": batch_id, "gateway.request_id": o.request_id},
        )
        o.trace = RequestTrace(self.tracer, span)

    @contextmanager
    def batch(self, batch_id: str, attributes: dict[str, Any]) -> Iterator[None]:
        """The span of a batch's run in this process (the runner's job): its lines link to it."""
        span = self.tracer.start_span(
            "batch", kind=SpanKind.INTERNAL, attributes={"gateway.batch_id": batch_id, **attributes}
        )
        self._batches[batch_id] = span.get_span_context()
        try:
            yield
        finally:
            self._batches.pop(batch_id, None)
            span.end()

    @contextmanager
    def background(self, name: str, attributes: dict[str, Any]) -> Iterator[None]:
        with self.tracer.start_as_current_span(name, kind=SpanKind.INTERNAL, attributes=attributes):
            yield

    async def stop(self) -> None:
        # The SDK's shutdown joins its thread and makes a last export: off the event loop.
        await asyncio.to_thread(self.provider.shutdown)
