"""The span export queue (gateway/observe/export.py): bounded, never blocking the caller, every
span counted as sent, dropped or failed; and batches that reach a real OTLP receiver whole."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.observe.export import HttpSender, SpanQueue
from gateway.observe.otlp import resource_of, scope_of, span_field
from testkit.poll import eventually
from tests.otlp_receiver import HttpReceiver
from tests.test_otlp_encode import RESOURCE, spans


def counters() -> tuple[Counter, Counter]:
    registry = CollectorRegistry()
    dropped = Counter("dropped", "spans", registry=registry)
    failed = Counter("failed", "spans", registry=registry)
    return dropped, failed


def value(counter: Counter) -> float:
    return counter._value.get()


def broken(item: object) -> bytes:
    raise ValueError(f"cannot encode {item!r}")


@pytest.fixture
def hanging() -> Iterator[socket.socket]:
    """A collector that takes connections and never answers (nothing reads them)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server
    server.close()


def test_a_stuck_collector_fills_the_queue_and_drops_are_counted(hanging: socket.socket) -> None:
    dropped, failed = counters()
    port = hanging.getsockname()[1]
    queue = SpanQueue(HttpSender(f"http://127.0.0.1:{port}/v1/traces", {}, 2.0), b"", b"", 10, dropped, failed, batch=1)
    batch = spans(30)
    started = time.perf_counter()
    for s in batch:
        queue.put(span_field, s, 3)  # as if each were a request of three spans
    assert time.perf_counter() - started < 0.5  # never waited for the collector
    # the thread took the first and hangs in its POST; the queue then holds 10 spans (4 requests:
    # one enters while fewer than 10 wait), the rest were dropped
    assert eventually(lambda: value(dropped), lambda n: n >= 3 * (30 - 1 - 4), what="drops counted")
    hanging.close()  # the POST fails; what waits fails too (the collector is left alone a while)
    assert queue.flush(10)
    assert value(dropped) + value(failed) == 90 and value(failed) >= 3
    queue.close(5)


def test_batches_reach_the_collector_whole() -> None:
    dropped, failed = counters()
    with HttpReceiver() as receiver:
        sender = HttpSender(receiver.endpoint, {"x-token": "t"}, 5.0)
        resource = resource_of(RESOURCE.attributes)
        queue = SpanQueue(sender, resource, scope_of("llm-gateway"), 1000, dropped, failed, batch=64, delay=60)
        for i, s in enumerate(spans(200)):
            queue.put(span_field, s, 1)
            if i == 100:
                queue.put(broken, s, 3)  # an item that cannot be encoded costs its own spans only
        assert queue.flush(10)  # 64 at a time as they came, then what was left on flush
        assert sorted(int(s.span_id, 16) - 2**63 for s in receiver.spans) == list(range(200))
        assert {s.service for s in receiver.spans} == {"gw"} and receiver.spans[0].headers.get("x-token") == "t"
        assert (value(dropped), value(failed)) == (0, 3)
        queue.close(5)
