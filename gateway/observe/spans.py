"""One request's span tree, built from its observation when the request ends.

    POST /v1/chat/completions        server: the request, GenAI and gateway attributes
    ├── gateway.admission            key, limits checked
    ├── gateway.queue                band, position; a cold start (engine wake-up) as a child
    ├── gateway.route                route, engine, each routing plugin's score
    ├── chat tiny-llama              client: the upstream call; events at the response headers
    │                                (time to first byte) and the first token; its id is the
    │                                engine's parent (the `traceparent` sent upstream)
    └── gateway.settle               quota reconciled, tokens

Why not `tracer.start_span` per step: the SDK's live spans cost about 40 µs each here (locks,
attribute validation, processors on start and end), six per request. The SDK's sampler decides
at the start; the ids of the server and upstream spans are drawn then (the upstream one goes to
the engine); and at the end the finished spans are made directly as the SDK's `ReadableSpan`s,
with their real start and end times, and handed to its batch processor and OTLP exporter, as
ended live spans would be. An unsampled request makes no span; its context still goes upstream.

Attributes follow the OpenTelemetry GenAI semantic conventions (gen_ai.*) plus ours (gateway.*).
Never a prompt, a completion or a secret: only ids, names, counts and times.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.observe.record import Observation

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
OK = Status(StatusCode.UNSET)


def _attrs(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


class RequestTrace:
    """The ids of one request's trace; `end` makes its spans (the request path calls nothing else)."""

    __slots__ = ("_sink", "_upstream_id", "links", "name", "parent", "recording", "span_id", "trace_id", "trace_state")

    def __init__(
        self,
        sink: Any,  # gateway/observe/tracing.py's Tracing: ids, resource, scope, processor
        name: str,
        trace_id: int,
        parent: SpanContext | None,
        trace_state: TraceState | None,
        recording: bool,
        links: tuple[Link, ...] = (),
    ) -> None:
        self._sink = sink
        self.name = name
        self.trace_id = format(trace_id, "032x")
        self.span_id = sink.new_span_id()
        self.parent = parent
        self.trace_state = trace_state
        self.recording = recording  # sampled: exported, and its id may go into exemplars
        self.links = links
        self._upstream_id = 0

    def upstream(self, o: Observation) -> bytes:
        """An upstream call begins (a retry: another); answers the header lines that carry the
        context to the engine: the upstream span's id when sampled, else the request's."""
        span_id = self.span_id
        if self.recording:
            span_id = self._upstream_id = self._sink.new_span_id()
        head = b"traceparent: 00-%s-%016x-%s\r\n" % (
            self.trace_id.encode(),
            span_id,
            b"01" if self.recording else b"00",
        )
        if self.trace_state:
            head += b"tracestate: " + self.trace_state.to_header().encode() + b"\r\n"
        return head

    def end(self, o: Observation) -> None:
        if not self.recording:
            return
        sink, ns = self._sink, o.epoch_ns
        ctx = self._context(self.span_id)
        status = o.status
        failed = Status(StatusCode.ERROR, o.error_code or str(status)) if status >= 500 else OK
        spans = [
            self._span(
                self.name,
                ctx,
                self.parent,
                SpanKind.SERVER if o.path else SpanKind.INTERNAL,
                o.started,
                o.started + o.duration,
                o,
                _attrs(
                    {
                        "http.request.method": o.method if o.path else None,
                        "url.path": o.path or None,
                        "http.response.status_code": status,
                        "client.address": o.client,
                        "gen_ai.operation.name": o.api if o.model else None,
                        "gen_ai.request.model": o.model,
                        "gen_ai.response.model": o.response_model,
                        "gen_ai.usage.input_tokens": o.prompt_tokens,
                        "gen_ai.usage.output_tokens": o.completion_tokens,
                        "gen_ai.response.finish_reasons": (o.finish_reason,) if o.finish_reason else None,
                        "gateway.request_id": o.request_id,
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
                    }
                ),
                status=failed,
                links=self.links,
            )
        ]
        if o.admit_start:
            refused = Status(StatusCode.ERROR, o.error_code or "refused") if not o.admit_end else OK
            attributes = _attrs({"gateway.key_id": o.key_id, "gateway.limits": o.limits})
            end = o.admit_end or o.admit_start
            spans.append(self._child("gateway.admission", ctx, o.admit_start, end, o, attributes, refused))
        if o.queue_start:
            queue_end = o.queue_end or o.queue_start
            attributes = _attrs({"gateway.priority": o.priority, "gateway.queue.position": o.queue_position})
            queue = self._child("gateway.queue", ctx, o.queue_start, queue_end, o, attributes)
            spans.append(queue)
            if o.cold_start is not None:
                assert queue.context is not None
                spans.append(self._child("gateway.engine_wake", queue.context, *o.cold_start, o, {}))
            if o.upstream_start:
                attributes = _attrs({"gateway.route": o.route, "gateway.engine": o.engine})
                for name, score in o.scores:
                    attributes[f"gateway.routing.score.{name}"] = score
                spans.append(self._child("gateway.route", ctx, queue_end, o.upstream_start, o, attributes))
        if self._upstream_id:
            events = []
            if o.upstream_headers:
                events.append(Event("response_headers", timestamp=ns(o.upstream_headers)))
            if o.ttft is not None:
                events.append(Event("first_token", timestamp=ns(o.started + o.ttft)))
            broken = not o.upstream_headers or status >= 500
            spans.append(
                self._span(
                    f"{o.api or 'chat'} {o.response_model}",
                    self._context(self._upstream_id),
                    ctx,
                    SpanKind.CLIENT,
                    o.upstream_start,
                    o.upstream_end or o.upstream_start,
                    o,
                    _attrs(
                        {
                            "gen_ai.operation.name": o.api,
                            "gen_ai.request.model": o.response_model,
                            "gen_ai.response.model": o.response_model,
                            "gen_ai.usage.input_tokens": o.prompt_tokens,
                            "gen_ai.usage.output_tokens": o.completion_tokens,
                            "gen_ai.response.finish_reasons": (o.finish_reason,) if o.finish_reason else None,
                            "gateway.route": o.route,
                            "gateway.engine": o.engine,
                        }
                    ),
                    status=Status(StatusCode.ERROR, o.error_code or "no answer") if broken else OK,
                    events=tuple(events),
                )
            )
        if o.settle_start:
            attributes = _attrs(
                {"gen_ai.usage.input_tokens": o.prompt_tokens, "gen_ai.usage.output_tokens": o.completion_tokens}
            )
            spans.append(
                self._child("gateway.settle", ctx, o.settle_start, o.settle_end or o.settle_start, o, attributes)
            )
        sink.emit(spans)

    def _context(self, span_id: int) -> SpanContext:
        return SpanContext(int(self.trace_id, 16), span_id, False, SAMPLED, self.trace_state)

    def _child(
        self,
        name: str,
        parent: SpanContext,
        start: float,
        end: float,
        o: Observation,
        attributes: dict[str, Any],
        status: Status = OK,
    ) -> ReadableSpan:
        ctx = self._context(self._sink.new_span_id())
        return self._span(name, ctx, parent, SpanKind.INTERNAL, start, end, o, attributes, status=status)

    def _span(
        self,
        name: str,
        ctx: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        start: float,
        end: float,
        o: Observation,
        attributes: dict[str, Any],
        status: Status = OK,
        events: tuple[Event, ...] = (),
        links: tuple[Link, ...] = (),
    ) -> ReadableSpan:
        sink = self._sink
        return ReadableSpan(
            name,
            ctx,
            parent,
            sink.resource,
            attributes,
            events,
            links,
            kind,
            None,
            status,
            o.epoch_ns(start),
            o.epoch_ns(end),
            sink.scope,
        )
