"""OpenTelemetry tracing: the SDK's sampler, ids and context propagation, and our OTLP export,
set up once per process.

Spans leave through gateway/observe/export.py: a finished request's observation is queued (a
bounded queue, never waited for) and a thread writes its spans' protobuf (gateway/observe/spans.py)
and sends them in batches. A full queue drops the spans (counted in
`gateway_trace_spans_dropped{reason="queue_full"}`); a failed export (the collector down or
refusing) is counted with `reason="export_failed"`. A dead collector therefore costs spans, not
latency. A batch's run is a span of the SDK's tracer, which joins the same queue when it ends.

Sampling is parent-based: a client's sampled traceparent is followed, an unsampled one is not,
and a new trace is sampled at `sample_ratio`. The context goes on to the engine either way (its
`traceparent` header), so vLLM's spans join the trace when it is sampled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanContext, SpanKind, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.core.metrics import GatewayMetrics
from gateway.observe.export import HttpSender, Sender, SpanQueue, grpc_sender
from gateway.observe.otlp import resource_of, scope_of, span_field
from gateway.observe.spans import RequestTrace
from gateway.settings import TracingSettings

if TYPE_CHECKING:  # the observer imports this module
    from gateway.observe.observer import Observation

log = logging.getLogger(__name__)

EXPORT_TIMEOUT = 5.0  # seconds one export may take
SHUTDOWN_TIMEOUT = 3.0  # at exit: what is queued gets this long to leave
SCOPE = "llm-gateway"


class _Enqueue(SpanProcessor):
    """The SDK tracer's ended spans (a batch's run) join the export queue."""

    def __init__(self, queue: SpanQueue) -> None:
        self._queue = queue

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self._queue.put(span_field, span, 1)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._queue.flush(timeout_millis / 1000)


def _sender(settings: TracingSettings) -> Sender:
    headers = dict(settings.headers)
    endpoint = settings.endpoint or ""
    if settings.protocol == "grpc":
        return grpc_sender(endpoint, headers, EXPORT_TIMEOUT)
    return HttpSender(endpoint, headers, EXPORT_TIMEOUT)


class Tracing:
    def __init__(self, settings: TracingSettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.resource = Resource.create({"service.name": settings.service_name})
        root = TraceIdRatioBased(settings.sample_ratio)
        self.sampler = ParentBased(root)
        self._bound = root.bound  # a new trace is sampled when its id's low 64 bits are below it
        dropped = metrics.trace_spans_dropped
        self.queue = SpanQueue(
            _sender(settings),
            resource_of(self.resource.attributes),
            scope_of(SCOPE),
            settings.queue_size,
            dropped.labels("queue_full"),
            dropped.labels("export_failed"),
        )
        self.provider = TracerProvider(resource=self.resource, sampler=self.sampler)
        self.provider.add_span_processor(_Enqueue(self.queue))
        self.tracer = self.provider.get_tracer(SCOPE)
        self._ids = RandomIdGenerator()
        self.new_span_id = self._ids.generate_span_id
        self._propagator = TraceContextTextMapPropagator()
        self._batches: dict[str, SpanContext] = {}

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until the spans queued now have been sent (tests and benchmarks)."""
        return self.queue.flush(timeout)

    def _start(self, o: Observation, name: str, kind: SpanKind, context: Any, links: tuple[Link, ...] = ()) -> None:
        """The sampler's decision for a new span (a child of the context's span, if any)."""
        if context is None:  # a new trace: the ratio sampler's decision, without its objects
            trace_id = self._ids.generate_trace_id()
            sampled = trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound
            o.trace = RequestTrace(self, name, trace_id, None, None, sampled, links)
            return
        parent: SpanContext | None = get_current_span(context).get_span_context()
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
        # The export thread's last batches, and its join: off the event loop.
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self.provider.shutdown()
        self.queue.close(SHUTDOWN_TIMEOUT)
