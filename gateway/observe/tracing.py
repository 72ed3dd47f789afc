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

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.core.metrics import GatewayMetrics
from gateway.observe.otlp import HttpExporter, encode
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
    endpoint = settings.endpoint or ""
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        class GrpcExporter(OTLPSpanExporter):
            """The SDK's gRPC exporter, sending our encoding (gateway/observe/otlp.py) of the spans."""

            def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
                return ExportTraceServiceRequest.FromString(encode(data))

        secure = endpoint.startswith("https://")
        return GrpcExporter(endpoint=endpoint, insecure=not secure, headers=headers, timeout=EXPORT_TIMEOUT)
    return HttpExporter(endpoint, headers, EXPORT_TIMEOUT)


class Tracing:
    def __init__(self, settings: TracingSettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.resource = Resource.create({"service.name": settings.service_name})
        self.sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        self.provider = TracerProvider(resource=self.resource, sampler=self.sampler)
        exporter = _CountingExporter(_exporter(settings), metrics.trace_spans_dropped.labels("export_failed"))
        dropped = metrics.trace_spans_dropped.labels("queue_full")
        self.processor = _BoundedProcessor(exporter, settings.queue_size, dropped)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("llm-gateway")
        self.scope = InstrumentationScope("llm-gateway")
        self._ids = RandomIdGenerator()
        self.new_span_id = self._ids.generate_span_id
        self._propagator = TraceContextTextMapPropagator()
        self._batches: dict[str, SpanContext] = {}

    def emit(self, spans: list[ReadableSpan]) -> None:
        on_end = self.processor.on_end
        for span in spans:
            on_end(span)

    def _start(self, o: Observation, name: str, kind: SpanKind, context: Any, links: tuple[Link, ...] = ()) -> None:
        """The sampler's decision for a new span (a child of the context's span, if any)."""
        parent = get_current_span(context).get_span_context() if context is not None else None
        if parent is not None and not parent.is_valid:
            parent = None
        trace_id = parent.trace_id if parent is not None else self._ids.generate_trace_id()
        result = self.sampler.should_sample(context, trace_id, name, kind, None, links)
        state = result.trace_state if result.trace_state is not None else (parent.trace_state if parent else None)
        o.trace = RequestTrace(self, name, trace_id, parent, state, result.decision.is_sampled(), links)

    def begin_server(self, o: Observation, headers: list[tuple[bytes, bytes]]) -> None:
        """The request's server span, continuing the client's traceparent when it sent one."""
        carrier: dict[str, str] | None = None
        for name, value in headers:
            if name == b"traceparent" or name == b"tracestate":
                if carrier is None:
                    carrier = {}
                carrier[name.decode()] = value.decode("latin-1")
        context = self._propagator.extract(carrier) if carrier else None
        self._start(o, f"{o.method} {o.path}", SpanKind.SERVER, context)

    def begin_line(self, o: Observation, batch_id: str) -> None:
        """A batch line's span: a trace of its own, linked to its batch's span here."""
        batch = self._batches.get(batch_id)
        self._start(o, "batch line", SpanKind.INTERNAL, None, (Link(batch),) if batch is not None else ())

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

    async def stop(self) -> None:
        # The SDK's shutdown joins its thread and makes a last export: off the event loop.
        await asyncio.to_thread(self.provider.shutdown)
