"""Our OTLP encoding (gateway/observe/otlp.py) decodes, with the `opentelemetry-proto` messages, to
what the SDK's own encoder writes, for every kind of attribute value, events, links, statuses,
remote and local parents, and the gRPC path's message parse."""

from __future__ import annotations

import itertools

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.observe.otlp import MAX_PAIRS, encode

RESOURCE = Resource.create({"service.name": "gw", "deployment": "test"})
SCOPE = InstrumentationScope("llm-gateway")
VALUES = ["chat", "", "naïve ✓", 0, 7, 4095, 4096, -3, 2**62, 1.5, -0.0, True, False, ("stop", "length"), (1, 2)]


def spans(count: int) -> list[ReadableSpan]:
    out = []
    kinds = itertools.cycle(SpanKind)
    for i in range(count):
        state = TraceState([("vendor", f"v{i}")]) if i % 4 == 0 else None
        ctx = SpanContext(2**127 + i, 2**63 + i, False, TraceFlags(1), state)
        parent = SpanContext(2**127 + i, 99 + i, i % 3 == 0, TraceFlags(1)) if i % 2 else None
        attributes = {f"k{j}": VALUES[(i + j) % len(VALUES)] for j in range(i % 7)}
        attributes["gateway.request_id"] = f"req-{i}"
        events = (Event("response_headers", {"n": i}, 10 + i), Event("first_token", None, 20 + i)) if i % 5 else ()
        links = (Link(parent, {"why": "batch"}),) if parent is not None and i % 3 == 1 else ()
        code = (StatusCode.UNSET, StatusCode.OK, StatusCode.ERROR)[i % 3]
        status = Status(code, "boom" if code is StatusCode.ERROR else None)
        out.append(
            ReadableSpan(
                f"span {i}",
                ctx,
                parent,
                RESOURCE,
                attributes,
                events,
                links,
                next(kinds),
                None,
                status,
                1_700_000_000_000_000_000 + i,
                1_700_000_000_000_000_500 + i,
                SCOPE,
            )
        )
    return out


def decoded(data: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest.FromString(data)
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                if s.status.code == 0 and not s.status.message:
                    s.ClearField("status")  # the SDK writes an empty status for UNSET, we leave it out
    return request


def test_our_encoding_decodes_to_the_sdks() -> None:
    batch = spans(300)
    ours, theirs = decoded(encode(batch)), decoded(encode_spans(batch).SerializeToString())
    assert len(ours.resource_spans[0].scope_spans[0].spans) == 300
    assert ours.resource_spans[0].resource == theirs.resource_spans[0].resource
    assert ours.resource_spans[0].scope_spans[0].scope.name == "llm-gateway"
    for a, b in zip(
        ours.resource_spans[0].scope_spans[0].spans, theirs.resource_spans[0].scope_spans[0].spans, strict=True
    ):
        assert a == b, (a, b)


def test_the_cache_of_encoded_pairs_stays_bounded_and_right() -> None:
    many = [
        ReadableSpan("s", SpanContext(1, i + 1, False, TraceFlags(1)), None, RESOURCE, {"model": f"m{i}"})
        for i in range(MAX_PAIRS + 10)
    ]
    first, again = decoded(encode(many)), decoded(encode(many))
    sdk = decoded(encode_spans(many).SerializeToString())
    assert first == again
    assert first.resource_spans[0].scope_spans[0].spans == sdk.resource_spans[0].scope_spans[0].spans
    assert encode([]) == b""
