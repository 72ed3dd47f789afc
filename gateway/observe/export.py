"""Spans on their way to the collector: a bounded queue, and one thread that encodes and sends them.

The request path only appends (an encoder and its input: a finished request's observation, or a
span of the SDK's) to the queue, and never waits: past `max_spans` waiting, a request's spans
are dropped and counted (`gateway_trace_spans_dropped{reason="queue_full"}`). The thread wakes
every `delay` seconds, or as soon as a batch's worth waits, and sends what waits in batches of
about `batch` spans, each one OTLP export request, written with the resource and scope encoded
once per process. A failed export is counted (`reason="export_failed"`) and its spans are gone.
After a failure the collector is left alone for a while (1 s, doubling up to 30 s, reset by a
success): the batches of that time fail at once, unencoded, so a dead collector costs neither
latency nor the encoding.
"""

from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.observe.otlp import request

log = logging.getLogger(__name__)

BACKOFF_START = 1.0  # seconds without exports after one failed, doubling to BACKOFF_MAX
BACKOFF_MAX = 30.0


class Sender(Protocol):
    def send(self, body: bytes, spans: int) -> bool:
        """POSTs one ExportTraceServiceRequest; False if the collector did not take it."""
        ...

    def close(self) -> None: ...


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class SpanQueue:
    def __init__(
        self,
        sender: Sender,
        resource: bytes,
        scope: bytes,
        max_spans: int,
        dropped: Counter,
        failed: Counter,
        *,
        batch: int = 512,
        delay: float = 0.5,
    ) -> None:
        self._sender = sender
        self._resource, self._scope = resource, scope
        self._max = max_spans
        self._batch = min(batch, max_spans)
        self._delay = delay
        self._dropped, self._failed = dropped, failed
        self._items: deque[tuple[Callable[[Any], bytes], Any, int]] = deque()
        # Spans ever queued (written by the request path only) and ever taken (by the thread
        # only): each has one writer, so neither needs a lock.
        self._queued = 0
        self._taken = 0
        self._finished = 0  # spans sent or given up (by the thread), for flush
        self._down_until = 0.0
        self._backoff = BACKOFF_START
        self._wake = threading.Event()
        self._done = threading.Condition()  # notified after each pass over the queue
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def put(self, encoder: Callable[[Any], bytes], item: Any, spans: int) -> None:
        """Queues `spans` spans that `encoder(item)` writes (as ScopeSpans' span fields), from the
        event loop (the one producer). Never blocks: while `max_spans` or more wait, they are
        dropped, and counted."""
        waiting = self._queued - self._taken
        if waiting >= self._max:
            self._dropped.inc(spans)
            return
        self._items.append((encoder, item, spans))
        self._queued += spans
        if waiting + spans >= self._batch and not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Waits until what is queued now has been sent (or dropped); False on timeout."""
        target = self._queued
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._finished >= target or not self._thread.is_alive(), timeout)

    def close(self, timeout: float) -> None:
        """Sends what waits (within `timeout` seconds) and stops the thread."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        self._sender.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            closing = self._closing
            while self._items:
                self._finished += self._send_batch()
            with self._done:
                self._done.notify_all()
            if closing:
                return

    def _send_batch(self) -> int:
        """Sends (or drops) one batch; answers how many spans it held."""
        items, chunks, spans = self._items, [], 0
        while items and spans < self._batch:
            chunk = items.popleft()
            chunks.append(chunk)
            spans += chunk[2]
        self._taken += spans
        taken = spans
        if self._down_until and time.monotonic() < self._down_until:
            self._failed.inc(spans)  # the collector failed a moment ago: not even encoded
            return taken
        parts = []
        for encoder, item, count in chunks:
            try:
                parts.append(encoder(item))
            except Exception:  # one request's spans lost, not the batch's
                log.warning("tracing: %d spans could not be encoded", count, exc_info=True)
                self._failed.inc(count)
                spans -= count
        try:
            sent = self._sender.send(request(self._resource, self._scope, b"".join(parts)), spans)
        except Exception:
            log.warning("tracing: the export of %d spans failed", spans, exc_info=True)
            sent = False
        if sent:
            self._down_until, self._backoff = 0.0, BACKOFF_START
            return taken
        self._failed.inc(spans)
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        return taken


class HttpSender:
    """OTLP/HTTP with protobuf bodies, one kept-alive connection, no retries (but of a stale one)."""

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout: float) -> None:
        url = urlsplit(endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        self._path = url.path or "/v1/traces"
        self._headers = {**headers, "content-type": "application/x-protobuf"}
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                context = ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=context)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def send(self, body: bytes, spans: int) -> bool:
        # A kept-alive connection the collector closed meanwhile fails at once: one more try on a
        # new connection, where a failure means the collector is not there
        for _ in range(2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request("POST", self._path, body, self._headers)
                response = conn.getresponse()
                response.read()
                return 200 <= response.status < 300
            except (OSError, http.client.HTTPException):
                self.close()
                if not reused:
                    return False
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def grpc_sender(endpoint: str, headers: Mapping[str, str], timeout: float) -> Sender:
    """The SDK's gRPC exporter, sending our encoding of the spans (imported only when used)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace.export import SpanExportResult

    class GrpcSender(OTLPSpanExporter):
        def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
            return ExportTraceServiceRequest.FromString(data[0])

        def _count_data(self, data: Any) -> int:
            return int(data[1])

        def send(self, body: bytes, spans: int) -> bool:
            return self._export((body, spans)) is SpanExportResult.SUCCESS  # type: ignore[arg-type]

        def close(self) -> None:
            self.shutdown()

    secure = endpoint.startswith("https://")
    return GrpcSender(endpoint=endpoint, insecure=not secure, headers=dict(headers), timeout=timeout)
