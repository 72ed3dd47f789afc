"""Spans to OTLP bytes, and the OTLP/HTTP exporter that posts them.

Why our own encoder: the SDK's (opentelemetry-exporter-otlp-proto-common) builds a protobuf object
per span, attribute and value, about 25 µs a span here; six spans a request made tracing cost
0.2 ms of CPU per request, in the export thread but in this process all the same. This writes the
protobuf wire format of `ExportTraceServiceRequest` directly (opentelemetry/proto/trace/v1/
trace.proto; the tests decode what it writes with the `opentelemetry-proto` messages), at a few
µs a span. The gRPC exporter sends the same bytes, parsed into its request message.

The HTTP exporter keeps one connection to the collector and never retries: a failed export is
reported (and counted by the caller) and its spans are gone. After a failure the collector is
left alone for a while (1 s, doubling up to 30 s, reset by a success): the batches of that time
fail at once, unencoded, so a dead collector costs neither latency nor the encoding.
"""

from __future__ import annotations

import http.client
import ssl
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

BACKOFF_START = 1.0  # seconds without exports after one failed, doubling to BACKOFF_MAX
BACKOFF_MAX = 30.0
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


def _len(n: int) -> bytes:
    return _SMALL[n] if n < 16384 else _varint(n)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the length, the bytes."""
    return tag + _len(len(payload)) + payload


_keys: dict[str, bytes] = {}
# The `flags` field (16 in Span, 6 in Link; fixed32): "whether the parent is remote" is known
# (0x100), and it is (0x200), as the SDK's encoder writes it.
_FLAGS_SPAN = {False: b"\x85\x01" + struct.pack("<I", 0x100), True: b"\x85\x01" + struct.pack("<I", 0x300)}
_FLAGS_LINK = {False: b"\x35" + struct.pack("<I", 0x100), True: b"\x35" + struct.pack("<I", 0x300)}


def _any(value: Any) -> bytes:
    """An AnyValue."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if value is True or value is False:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any(v)) for v in value))
    return _field(b"\x0a", str(value).encode())


# Encoded KeyValues whose value repeats (names of models, routes, engines, keys; small counts):
# most attributes of most spans are one dict lookup. Cleared when full, so it stays bounded.
_pairs: dict[tuple[bytes, str, Any, type], bytes] = {}  # the type too: False == 0, True == 1
MAX_PAIRS = 8192
_UNIQUE = frozenset({"gateway.request_id"})  # a new value every time: not worth keeping


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
    """Repeated KeyValue fields."""
    if not attributes:
        return []
    out = []
    pairs = _pairs
    for key, value in attributes.items():
        cacheable = key not in _UNIQUE and (
            value.__class__ is str or value.__class__ is bool or (value.__class__ is int and -1 < value < 4096)
        )
        if cacheable:
            found = pairs.get((tag, key, value, value.__class__))
            if found is not None:
                out.append(found)
                continue
        k = _keys.get(key)
        if k is None:
            k = _keys[key] = _field(b"\x0a", key.encode())
        encoded = _field(tag, k + _field(b"\x12", _any(value)))
        if cacheable:
            if len(pairs) >= MAX_PAIRS:
                pairs.clear()
            pairs[(tag, key, value, value.__class__)] = encoded
        out.append(encoded)
    return out


def _span(s: ReadableSpan) -> bytes:
    ctx = s.context
    assert ctx is not None
    parts = [b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"), b"\x12\x08" + ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        parts.append(_field(b"\x1a", ctx.trace_state.to_header().encode()))
    if s.parent is not None:
        parts.append(b"\x22\x08" + s.parent.span_id.to_bytes(8, "big"))
    parts.append(_field(b"\x2a", s.name.encode()))
    parts.append(b"\x30" + _SMALL[s.kind.value + 1])  # the proto's kinds start at 1 (0: unspecified)
    parts.append(b"\x39" + _pack_q(s.start_time or 0))
    parts.append(b"\x41" + _pack_q(s.end_time or 0))
    parts += _attributes(b"\x4a", s.attributes)
    for event in s.events:
        body = b"\x09" + _pack_q(event.timestamp) + _field(b"\x12", event.name.encode())
        body += b"".join(_attributes(b"\x1a", event.attributes))
        parts.append(_field(b"\x5a", body))
    for link in s.links:
        lc = link.context
        body = b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08" + lc.span_id.to_bytes(8, "big")
        body += b"".join(_attributes(b"\x22", link.attributes)) + _FLAGS_LINK[bool(lc.is_remote)]
        parts.append(_field(b"\x6a", body))
    status = s.status
    if status.status_code.value:
        body = _field(b"\x12", status.description.encode()) if status.description else b""
        parts.append(_field(b"\x7a", body + b"\x18" + _SMALL[status.status_code.value]))
    parts.append(_FLAGS_SPAN[s.parent is not None and bool(s.parent.is_remote)])
    return b"".join(parts)


def encode(spans: Sequence[ReadableSpan], scope: str = "llm-gateway") -> bytes:
    """An ExportTraceServiceRequest holding the spans (all of one resource: the gateway's)."""
    if not spans:
        return b""
    resource = _field(b"\x0a", b"".join(_attributes(b"\x0a", spans[0].resource.attributes)))
    scope_spans = _field(b"\x0a", _field(b"\x0a", scope.encode())) + b"".join(_field(b"\x12", _span(s)) for s in spans)
    return _field(b"\x0a", resource + _field(b"\x12", scope_spans))


class HttpExporter(SpanExporter):
    """OTLP/HTTP with protobuf bodies, one kept-alive connection, no retries."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout: float) -> None:
        url = urlsplit(endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        self._path = url.path or "/v1/traces"
        self._headers = {**headers, "content-type": "application/x-protobuf"}
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._down_until = 0.0
        self._backoff = BACKOFF_START

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                context = ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=context)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._down_until and time.monotonic() < self._down_until:
            return SpanExportResult.FAILURE  # the collector failed a moment ago: not even encoded
        body = encode(spans)
        conn = self._connection()
        try:
            conn.request("POST", self._path, body, self._headers)
            response = conn.getresponse()
            response.read()
            ok = 200 <= response.status < 300
        except (OSError, http.client.HTTPException):
            conn.close()
            self._conn = None
            ok = False
        if ok:
            self._down_until, self._backoff = 0.0, BACKOFF_START
            return SpanExportResult.SUCCESS
        self._down_until = time.monotonic() + self._backoff  # a dead collector costs no encoding
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
