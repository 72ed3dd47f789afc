"""One request's span tree, built from its observation.

    POST /v1/chat/completions        server: the request, GenAI and gateway attributes
    ├── gateway.admission            key, limits checked
    ├── gateway.queue                band, position; a cold start (engine wake-up) as a child
    ├── gateway.route                route, engine, routing plugins and their scores
    ├── chat tiny-llama              client: the upstream call; events at the response headers
    │                                (time to first byte) and the first token; its id is the
    │                                engine's parent (the `traceparent` sent upstream)
    └── gateway.settle               quota reconciled, tokens

Only the server and upstream spans are live objects while the request runs (the upstream span's
id must exist before the call). The short steps are made at the end from the marks the exchange
noted, with their real start and end times: no context switching and no span object while the
request waits. An unsampled request makes no child spans; its context still goes upstream.

Attributes follow the OpenTelemetry GenAI semantic conventions (gen_ai.*) plus ours (gateway.*).
Never a prompt, a completion or a secret: only ids, names, counts and times.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.observe.record import Observation


def _set(span: Span, attributes: dict[str, Any]) -> None:
    span.set_attributes({k: v for k, v in attributes.items() if v is not None})


class RequestTrace:
    __slots__ = ("_ctx", "_tracer", "_upstream", "recording", "span", "trace_id")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        context = span.get_span_context()
        self.trace_id = format(context.trace_id, "032x")
        self.recording = span.is_recording()  # sampled: exported, and its id may go into exemplars
        self._ctx: Any = None
        self._upstream: Span | None = None

    def _parent(self) -> Any:
        if self._ctx is None:
            self._ctx = trace.set_span_in_context(self.span)
        return self._ctx

    def upstream(self, o: Observation) -> bytes:
        """Starts the upstream call's span (a retry ends the one before); answers the header
        lines that carry its context to the engine."""
        if not self.recording:
            return _traceparent(self.span)
        if self._upstream is not None:
            self._upstream.set_status(Status(StatusCode.ERROR, "retried on another engine"))
            self._upstream.end()
        operation = o.api or "chat"
        span = self._tracer.start_span(
            f"{operation} {o.response_model}",
            context=self._parent(),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": o.response_model,
                "gateway.route": o.route,
                "gateway.engine": o.engine,
            },
        )
        self._upstream = span
        return _traceparent(span)

    def end(self, o: Observation) -> None:
        span = self.span
        status = o.status
        _set(
            span,
            {
                "http.response.status_code": status,
                "client.address": o.client,
                "gen_ai.operation.name": o.api if o.model else None,
                "gen_ai.request.model": o.model,
                "gen_ai.response.model": o.response_model,
                "gen_ai.usage.input_tokens": o.prompt_tokens,
                "gen_ai.usage.output_tokens": o.completion_tokens,
                "gen_ai.response.finish_reasons": (o.finish_reason,) if o.finish_reason else None,
                "gateway.api": o.api,
                "gateway.key_id": o.key_id,
                "gateway.team": o.team,
                "gateway.route": o.route,
                "gateway.engine": o.engine,
                "gateway.priority": o.priority,
                "gateway.batch_id": o.batch_id,
                "gateway.stream": o.stream if o.model else None,
                "gateway.client_hung_up": o.hung_up or None,
                "gateway.time_to_first_token_s": o.ttft,
                "error.type": o.error_code or (str(status) if status >= 500 else None),
            },
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, o.error_code or str(status)))
        if self.recording:
            self._children(o)
        span.end(end_time=o.epoch_ns(o.started + o.duration))

    def _children(self, o: Observation) -> None:
        ns, start = o.epoch_ns, self._tracer.start_span
        parent = self._parent()
        if o.admit_start:
            admit_end = o.admit_end or o.admit_start
            span = start("gateway.admission", context=parent, start_time=ns(o.admit_start))
            _set(span, {"gateway.key_id": o.key_id, "gateway.limits": o.limits})
            if not o.admit_end:
                span.set_status(Status(StatusCode.ERROR, o.error_code or "refused"))
            span.end(end_time=ns(admit_end))
        if o.queue_start:
            queue_end = o.queue_end or o.queue_start
            span = start("gateway.queue", context=parent, start_time=ns(o.queue_start))
            _set(span, {"gateway.priority": o.priority, "gateway.queue.position": o.queue_position})
            if o.cold_start is not None:
                wake = start(
                    "gateway.engine_wake", context=trace.set_span_in_context(span), start_time=ns(o.cold_start[0])
                )
                wake.end(end_time=ns(o.cold_start[1]))
            span.end(end_time=ns(queue_end))
            if o.upstream_start:
                route = start("gateway.route", context=parent, start_time=ns(queue_end))
                _set(route, {"gateway.route": o.route, "gateway.engine": o.engine})
                for name, score in o.scores:
                    route.set_attribute(f"gateway.routing.score.{name}", score)
                route.end(end_time=ns(o.upstream_start))
        upstream = self._upstream
        if upstream is not None:
            if o.upstream_headers:
                upstream.add_event("response_headers", timestamp=ns(o.upstream_headers))
            if o.ttft is not None:
                upstream.add_event("first_token", timestamp=ns(o.started + o.ttft))
            _set(
                upstream,
                {
                    "gen_ai.response.model": o.response_model,
                    "gen_ai.usage.input_tokens": o.prompt_tokens,
                    "gen_ai.usage.output_tokens": o.completion_tokens,
                    "gen_ai.response.finish_reasons": (o.finish_reason,) if o.finish_reason else None,
                },
            )
            if not o.upstream_headers or o.status >= 500:
                upstream.set_status(Status(StatusCode.ERROR, o.error_code or "no answer"))
            upstream.end(end_time=ns(o.upstream_end or o.upstream_start))
            self._upstream = None
        if o.settle_start:
            span = start("gateway.settle", context=parent, start_time=ns(o.settle_start))
            _set(
                span,
                {"gen_ai.usage.input_tokens": o.prompt_tokens, "gen_ai.usage.output_tokens": o.completion_tokens},
            )
            span.end(end_time=ns(o.settle_end or o.settle_start))


def _traceparent(span: Span) -> bytes:
    c = span.get_span_context()
    head = b"traceparent: 00-%032x-%016x-%02x\r\n" % (c.trace_id, c.span_id, c.trace_flags)
    if c.trace_state:
        head += b"tracestate: " + c.trace_state.to_header().encode() + b"\r\n"
    return head
