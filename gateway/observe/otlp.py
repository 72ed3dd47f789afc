"""OTLP's protobuf wire format, written directly: the trace export request and its parts.

Why our own encoder: the SDK's (opentelemetry-exporter-otlp-proto-common) builds a protobuf object
per span, attribute and value, about 25 µs a span here; six spans a request made tracing cost
0.2 ms of CPU per request. This writes the protobuf wire format of `ExportTraceServiceRequest`
directly (opentelemetry/proto/trace/v1/trace.proto; the tests decode what it writes with the
`opentelemetry-proto` messages). A request's spans are written straight from its observation
(gateway/observe/spans.py) with the helpers here; `encode` writes the SDK's `ReadableSpan`s (a
batch's span, made by the SDK's tracer). The gRPC exporter sends the same bytes, parsed into its
request message (gateway/observe/export.py).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(i) for i in range(1 << 14)]


def length(n: int) -> bytes:
    """A length prefix (a varint)."""
    return _SMALL[n] if n < 16384 else _varint(n)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the length, the bytes."""
    return tag + length(len(payload)) + payload


_keys: dict[str, bytes] = {}
# The `flags` field (16 in Span, 6 in Link; fixed32): "whether the parent is remote" is known
# (0x100), and it is (0x200), as the SDK's encoder writes it.
FLAGS_SPAN = {False: b"\x85\x01" + struct.pack("<I", 0x100), True: b"\x85\x01" + struct.pack("<I", 0x300)}
FLAGS_LINK = {False: b"\x35" + struct.pack("<I", 0x100), True: b"\x35" + struct.pack("<I", 0x300)}


def _any(value: Any) -> bytes:
    """An AnyValue."""
    if isinstance(value, str):
        return field(b"\x0a", value.encode())
    if value is True or value is False:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return field(b"\x3a", value)
    if isinstance(value, Sequence):
        return field(b"\x2a", b"".join(field(b"\x0a", _any(v)) for v in value))
    return field(b"\x0a", str(value).encode())


# Encoded KeyValues whose value repeats (names of models, routes, engines, keys; small counts):
# most attributes of most spans are one dict lookup. Cleared when full, so it stays bounded.
_pairs: dict[tuple[bytes, str, Any, type], bytes] = {}  # the type too: False == 0, True == 1
MAX_PAIRS = 8192
_UNIQUE = frozenset({"gateway.request_id"})  # a new value every time: not worth keeping


def _repeats(value: Any) -> bool:
    """Whether a value is worth keeping encoded: a name, a flag, a small count."""
    kind = value.__class__
    return kind is str or kind is bool or (kind is int and -1 < value < 4096)


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
    """Repeated KeyValue fields."""
    if not attributes:
        return []
    out = []
    pairs = _pairs
    for key, value in attributes.items():
        cacheable = key not in _UNIQUE and _repeats(value)
        if cacheable:
            found = pairs.get((tag, key, value, value.__class__))
            if found is not None:
                out.append(found)
                continue
        k = _keys.get(key)
        if k is None:
            k = _keys[key] = field(b"\x0a", key.encode())
        encoded = field(tag, k + field(b"\x12", _any(value)))
        if cacheable:
            if len(pairs) >= MAX_PAIRS:
                pairs.clear()
            pairs[(tag, key, value, value.__class__)] = encoded
        out.append(encoded)
    return out


class Attribute:
    """One attribute key of a request's spans (gateway/observe/spans.py): the key encoded once, and
    each value's whole KeyValue field (a Span's attributes) kept by value where values repeat.
    A key's values have one type (so True and 1 never meet). Used by the export thread only."""

    __slots__ = ("cached", "key", "values")

    def __init__(self, name: str, cached: bool = True) -> None:
        self.key = field(b"\x0a", name.encode())
        self.cached = cached  # False: a new value every time (ids, times), not worth keeping
        self.values: dict[Any, bytes] = {}

    def __call__(self, value: Any) -> bytes:
        found = self.values.get(value)
        if found is None:
            found = field(b"\x4a", self.key + field(b"\x12", _any(value)))
            if self.cached and _repeats(value):
                self._keep(value, found)
        return found

    def array(self, value: str) -> bytes:
        """The KeyValue of a one-string array (finish reasons), kept by the string."""
        found = self.values.get(value)
        if found is None:
            found = field(b"\x4a", self.key + field(b"\x12", _any((value,))))
            self._keep(value, found)
        return found

    def _keep(self, value: Any, encoded: bytes) -> None:
        if len(self.values) >= MAX_PAIRS:
            self.values.clear()
        self.values[value] = encoded


def status(message: str) -> bytes:
    """A Span's status field: an error, with its message."""
    return field(b"\x7a", field(b"\x12", message.encode()) + b"\x18\x02")


def _span(s: ReadableSpan) -> bytes:
    ctx = s.context
    assert ctx is not None
    parts = [b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"), b"\x12\x08" + ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        parts.append(field(b"\x1a", ctx.trace_state.to_header().encode()))
    if s.parent is not None:
        parts.append(b"\x22\x08" + s.parent.span_id.to_bytes(8, "big"))
    parts.append(field(b"\x2a", s.name.encode()))
    parts.append(b"\x30" + _SMALL[s.kind.value + 1])  # the proto's kinds start at 1 (0: unspecified)
    parts.append(b"\x39" + _pack_q(s.start_time or 0))
    parts.append(b"\x41" + _pack_q(s.end_time or 0))
    parts += _attributes(b"\x4a", s.attributes)
    for event in s.events:
        body = b"\x09" + _pack_q(event.timestamp) + field(b"\x12", event.name.encode())
        body += b"".join(_attributes(b"\x1a", event.attributes))
        parts.append(field(b"\x5a", body))
    for link in s.links:
        lc = link.context
        body = b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08" + lc.span_id.to_bytes(8, "big")
        body += b"".join(_attributes(b"\x22", link.attributes)) + FLAGS_LINK[bool(lc.is_remote)]
        parts.append(field(b"\x6a", body))
    status = s.status
    if status.status_code.value:
        body = field(b"\x12", status.description.encode()) if status.description else b""
        parts.append(field(b"\x7a", body + b"\x18" + _SMALL[status.status_code.value]))
    parts.append(FLAGS_SPAN[s.parent is not None and bool(s.parent.is_remote)])
    return b"".join(parts)


def span_field(s: ReadableSpan) -> bytes:
    """A span of the SDK's as a field of ScopeSpans (its `spans`, field 2)."""
    return field(b"\x12", _span(s))


def resource_of(attributes: Mapping[str, Any]) -> bytes:
    """A Resource message (ResourceSpans' field 1) with these attributes."""
    return field(b"\x0a", b"".join(_attributes(b"\x0a", attributes)))


def scope_of(name: str) -> bytes:
    """An InstrumentationScope (ScopeSpans' field 1) of this name."""
    return field(b"\x0a", field(b"\x0a", name.encode()))


def request(resource: bytes, scope: bytes, spans: bytes) -> bytes:
    """An ExportTraceServiceRequest of one resource and scope; `spans` are ScopeSpans' span fields."""
    return field(b"\x0a", resource + field(b"\x12", scope + spans))


def encode(spans: Sequence[ReadableSpan], scope: str = "llm-gateway") -> bytes:
    """An ExportTraceServiceRequest holding the SDK's spans (all of one resource: the gateway's)."""
    if not spans:
        return b""
    return request(resource_of(spans[0].resource.attributes), scope_of(scope), b"".join(map(span_field, spans)))
