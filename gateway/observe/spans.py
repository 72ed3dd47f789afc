"""One request's span tree, written as OTLP protobuf from its observation after the request ends.

    POST /v1/chat/completions        server: the request, GenAI and gateway attributes
    ├── gateway.admission            key, limits checked
    ├── gateway.queue                band, position; a cold start (engine wake-up) as a child
    ├── gateway.route                route, engine, each routing plugin's score
    ├── chat tiny-llama              client: the upstream call; events at the response headers
    │                                (time to first byte) and the first token; its id is the
    │                                engine's parent (the `traceparent` sent upstream)
    └── gateway.settle               quota reconciled, tokens

Why no SDK span objects: the SDK's live spans cost about 40 µs each here (locks, attribute
validation, processors on start and end), and even finished `ReadableSpan`s, made at the end and
encoded later, cost 40 µs a request to make and 40 µs to encode. The SDK's sampler decides at the
start and the ids of the server and upstream spans are drawn then (the upstream one goes to the
engine); at the end the request path only queues the observation (`end`), and the export thread
(gateway/observe/export.py) writes the spans' protobuf straight from it (`encode`): no
intermediate objects, the bytes of repeated attribute values (models, routes, engines, keys,
small counts) cached. An unsampled request makes no span; its context still goes upstream.

Attributes follow the OpenTelemetry GenAI semantic conventions (gen_ai.*) plus ours (gateway.*).
Never a prompt, a completion or a secret: only ids, names, counts and times.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Link, SpanContext, TraceState

from gateway.observe.otlp import FLAGS_LINK, FLAGS_SPAN, Attribute, field, length, status

if TYPE_CHECKING:  # the observer imports this module
    from gateway.observe.observer import Observation

_times = struct.Struct("<BQBQ").pack  # start (field 7) and end (field 8) times, fixed64
_SERVER, _INTERNAL, _CLIENT = b"\x30\x02", b"\x30\x01", b"\x30\x03"  # Span.kind: the proto's enum
_names: dict[str, bytes] = {}  # a span's name field, by name (a few per route and model)
MAX_NAMES = 4096
_bundles: dict[tuple[Any, ...], bytes] = {}  # attributes that repeat together (_who, _upstream)
MAX_BUNDLES = 4096

# Each attribute the spans carry: its key encoded once, its values' KeyValues kept by value where
# they repeat (gateway/observe/otlp.py).
_METHOD, _PATH, _STATUS, _CLIENT_ADDRESS = map(
    Attribute, ("http.request.method", "url.path", "http.response.status_code", "client.address")
)
_OPERATION, _MODEL, _RESPONSE_MODEL, _INPUT, _OUTPUT, _FINISH = map(
    Attribute,
    (
        "gen_ai.operation.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.response.finish_reasons",
    ),
)
_API, _KEY, _TEAM, _ROUTE, _ENGINE, _PRIORITY, _BATCH = map(
    Attribute,
    (
        "gateway.api",
        "gateway.key_id",
        "gateway.team",
        "gateway.route",
        "gateway.engine",
        "gateway.priority",
        "gateway.batch_id",
    ),
)
_STREAM, _HUNG_UP, _LIMITS, _POSITION, _ERROR = map(
    Attribute, ("gateway.stream", "gateway.client_hung_up", "gateway.limits", "gateway.queue.position", "error.type")
)
# a new value every time: not worth keeping
_REQUEST_ID = Attribute("gateway.request_id", cached=False)
_TTFT = Attribute("gateway.time_to_first_token_s", cached=False)
_scores: dict[str, Attribute] = {}  # gateway.routing.score.<plugin>

# Names of the spans whose name never changes (Span.name, field 5), and events' (Event.name)
_ADMISSION = field(b"\x2a", b"gateway.admission")
_QUEUE = field(b"\x2a", b"gateway.queue")
_WAKE = field(b"\x2a", b"gateway.engine_wake")
_ROUTE_NAME = field(b"\x2a", b"gateway.route")
_SETTLE = field(b"\x2a", b"gateway.settle")
_HEADERS_EVENT = field(b"\x12", b"response_headers")
_FIRST_TOKEN_EVENT = field(b"\x12", b"first_token")


class RequestTrace:
    """The ids of one request's trace; `end` queues its spans (the request path calls nothing else)."""

    __slots__ = ("_sink", "_upstream_id", "links", "name", "parent", "recording", "span_id", "trace_id", "trace_state")

    def __init__(
        self,
        sink: Any,  # gateway/observe/tracing.py's Tracing: ids, the export queue
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
        """The request is over: its spans wait for the export thread (the observation is read-only
        from now on)."""
        if self.recording:
            self._sink.queue.put(self.encode, o, self.count(o))

    def count(self, o: Observation) -> int:
        """How many spans `encode` writes."""
        n = 1 + bool(o.admit_start) + bool(self._upstream_id) + bool(o.settle_start)
        if o.queue_start:
            n += 1 + (o.cold_start is not None) + bool(o.upstream_start)
        return n

    def encode(self, o: Observation) -> bytes:
        """The spans, as the `spans` fields of an OTLP ScopeSpans message (runs in the export thread)."""
        new_id = self._sink.new_span_id
        wall, started = o.wall, o.started
        head = b"\x0a\x10" + bytes.fromhex(self.trace_id)  # every span's trace id and state
        if self.trace_state:
            head += field(b"\x1a", self.trace_state.to_header().encode())
        under = b"\x22\x08" + self.span_id.to_bytes(8, "big")  # the children's parent field

        def ns(mark: float) -> int:  # Observation.epoch_ns
            return int((wall + (mark - started)) * 1e9)

        def child(
            name: bytes, start: float, end: float, attributes: bytes, parent: bytes = under, span_id: int = 0
        ) -> bytes:
            own = b"\x12\x08" + (span_id or new_id()).to_bytes(8, "big")
            return _span(head + own + parent + name + _INTERNAL + _times(0x39, ns(start), 0x41, ns(end)) + attributes)

        error, server_error = o.error_code, o.status >= 500
        tokens = _tokens(o)
        spans = [self._server(o, head, _times(0x39, ns(started), 0x41, ns(started + o.duration)), tokens)]
        if o.admit_start:
            attributes = (_KEY(o.key_id) if o.key_id is not None else b"") + (
                _LIMITS(o.limits) if o.limits is not None else b""
            )
            refused = b"" if o.admit_end else status(error or "refused")
            spans.append(child(_ADMISSION, o.admit_start, o.admit_end or o.admit_start, attributes + refused))
        if o.queue_start:
            queue_end, queue_id = o.queue_end or o.queue_start, new_id()
            attributes = (_PRIORITY(o.priority) if o.priority is not None else b"") + _POSITION(o.queue_position)
            spans.append(child(_QUEUE, o.queue_start, queue_end, attributes, span_id=queue_id))
            if o.cold_start is not None:
                spans.append(child(_WAKE, *o.cold_start, b"", b"\x22\x08" + queue_id.to_bytes(8, "big")))
            if o.upstream_start:
                attributes = _route(o) + b"".join(_score(name, score) for name, score in o.scores)
                spans.append(child(_ROUTE_NAME, queue_end, o.upstream_start, attributes))
        if self._upstream_id:
            # a protobuf message's fields may come in any order: the kept name, kind and attributes first
            attributes = tokens + (_FINISH.array(o.finish_reason) if o.finish_reason else b"")
            if o.upstream_headers:
                attributes += _event(ns(o.upstream_headers), _HEADERS_EVENT)
            if o.ttft is not None:
                attributes += _event(ns(started + o.ttft), _FIRST_TOKEN_EVENT)
            if not o.upstream_headers or server_error:
                attributes += status(error or "no answer")
            own = b"\x12\x08" + self._upstream_id.to_bytes(8, "big")
            times = _times(0x39, ns(o.upstream_start), 0x41, ns(o.upstream_end or o.upstream_start))
            spans.append(_span(head + own + under + _upstream(o) + times + attributes))
        if o.settle_start:
            spans.append(child(_SETTLE, o.settle_start, o.settle_end or o.settle_start, tokens))
        return b"".join(spans)

    def _server(self, o: Observation, head: bytes, times: bytes, tokens: bytes) -> bytes:
        """The request's own span (a batch line's: not a server span, no HTTP attributes)."""
        code, error = o.status, o.error_code
        a = [_STATUS(code), _who(o), tokens]
        if o.finish_reason:
            a.append(_FINISH.array(o.finish_reason))
        a.append(_REQUEST_ID(o.request_id))
        if o.hung_up:
            a.append(_HUNG_UP(True))
        if o.ttft is not None:
            a.append(_TTFT(o.ttft))
        if error or code >= 500:
            a.append(_ERROR(error or str(code)))
        parent, remote = b"", False
        if self.parent is not None:
            parent, remote = b"\x22\x08" + self.parent.span_id.to_bytes(8, "big"), bool(self.parent.is_remote)
        return _span(
            head
            + b"\x12\x08"
            + self.span_id.to_bytes(8, "big")
            + parent
            + _name(self.name)
            + (_SERVER if o.path else _INTERNAL)
            + times
            + b"".join(a)
            + b"".join(_link(link) for link in self.links)
            + (status(error or str(code)) if code >= 500 else b""),
            remote,
        )


def _who(o: Observation) -> bytes:
    """The server span's attributes that repeat from request to request (who asked for what, and
    where it went), encoded together and kept by their values."""
    key: tuple[Any, ...] = (o.path, o.method, o.client, o.api, o.model, o.response_model, o.key_id, o.team)
    key += (o.route, o.engine, o.priority, o.batch_id, o.stream)
    found = _bundles.get(key)
    if found is not None:
        return found
    a: list[bytes] = []
    if o.path:
        a += (_METHOD(o.method), _PATH(o.path))
    if o.client is not None:
        a.append(_CLIENT_ADDRESS(o.client))
    if o.model and o.api is not None:
        a.append(_OPERATION(o.api))
    if o.model is not None:
        a.append(_MODEL(o.model))
    if o.response_model is not None:
        a.append(_RESPONSE_MODEL(o.response_model))
    for attribute, value in (
        (_API, o.api),
        (_KEY, o.key_id),
        (_TEAM, o.team),
        (_ROUTE, o.route),
        (_ENGINE, o.engine),
        (_PRIORITY, o.priority),
        (_BATCH, o.batch_id),
    ):
        if value is not None:
            a.append(attribute(value))
    if o.model:
        a.append(_STREAM(o.stream))
    return _keep(key, b"".join(a))


def _upstream(o: Observation) -> bytes:
    """The upstream span's name and its attributes but tokens (kept by their values, as `_who`)."""
    key = ("upstream", o.api, o.response_model, o.route, o.engine)
    found = _bundles.get(key)
    if found is not None:
        return found
    model = o.response_model
    encoded = _name(f"{o.api or 'chat'} {model}") + _CLIENT
    if o.api is not None:
        encoded += _OPERATION(o.api)
    if model is not None:
        encoded += _MODEL(model) + _RESPONSE_MODEL(model)
    return _keep(key, encoded + _route(o))


def _keep(key: tuple[Any, ...], encoded: bytes) -> bytes:
    if len(_bundles) >= MAX_BUNDLES:
        _bundles.clear()
    _bundles[key] = encoded
    return encoded


def _span(body: bytes, remote_parent: bool = False) -> bytes:
    """A Span message as a field of ScopeSpans (field 2), its flags last (field 16)."""
    body += FLAGS_SPAN[remote_parent]
    return b"\x12" + length(len(body)) + body


def _name(name: str) -> bytes:
    found = _names.get(name)
    if found is None:
        if len(_names) >= MAX_NAMES:
            _names.clear()
        found = _names[name] = field(b"\x2a", name.encode())
    return found


def _tokens(o: Observation) -> bytes:
    return (_INPUT(o.prompt_tokens) if o.prompt_tokens is not None else b"") + (
        _OUTPUT(o.completion_tokens) if o.completion_tokens is not None else b""
    )


def _route(o: Observation) -> bytes:
    return (_ROUTE(o.route) if o.route is not None else b"") + (_ENGINE(o.engine) if o.engine is not None else b"")


def _score(name: str, score: float) -> bytes:
    attribute = _scores.get(name)
    if attribute is None:
        attribute = _scores[name] = Attribute(f"gateway.routing.score.{name}", cached=False)
    return attribute(score)


def _event(stamp: int, name: bytes) -> bytes:
    body = b"\x09" + stamp.to_bytes(8, "little") + name
    return b"\x5a" + length(len(body)) + body


def _link(link: Link) -> bytes:
    lc = link.context
    body = b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08" + lc.span_id.to_bytes(8, "big")
    if lc.trace_state:
        body += field(b"\x1a", lc.trace_state.to_header().encode())
    return field(b"\x6a", body + FLAGS_LINK[bool(lc.is_remote)])
