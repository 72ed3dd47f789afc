"""A request's spans as the export thread writes them from its observation (gateway/observe/spans.py),
decoded by a real OTLP receiver with the `opentelemetry-proto` messages: the tree, kinds, parents,
times, attributes, events, links and statuses of the shapes the end-to-end tests rarely make (a
refusal, a cold start, an engine that never answered, a batch line, a client's remote parent)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.access.base import Usage
from gateway.core.metrics import GatewayMetrics
from gateway.observe.observer import Observation, Observer
from gateway.settings import parse_settings
from tests.otlp_receiver import HttpReceiver, Span

CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
HEADERS = [(b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()), (b"tracestate", b"vendor=1")]
SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "client": ("10.0.0.7", 5000)}


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver() as r:
        yield r


def observer(receiver: HttpReceiver) -> Observer:
    base = {
        "engines": [{"name": "fake", "kind": "openai", "url": "http://127.0.0.1:1"}],
        "models": [{"name": "m", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
        "logging": {"access": {"enabled": False}},
        "tracing": {"endpoint": receiver.endpoint, "service_name": "gw-spans"},
    }
    found = Observer.build(parse_settings(base, "test", env={}), GatewayMetrics())
    assert found is not None and found.tracing is not None
    return found


def exported(obs: Observer, receiver: HttpReceiver, o: Observation) -> dict[str, Span]:
    obs.end(o)
    assert obs.tracing.flush(10)
    asyncio.run(obs.stop())
    spans = receiver.trace(o.trace_id or "")
    by_name = {s.name: s for s in spans}
    assert len(by_name) == len(spans) == o.trace.count(o)
    assert {s.service for s in spans} == {"gw-spans"}
    return by_name


def marks(o: Observation, *names: str) -> None:
    """Sets the observation's marks in this order, a millisecond apart."""
    for i, name in enumerate(names):
        setattr(o, name, o.started + 0.001 * (i + 1))


def ns(o: Observation, mark: float) -> int:
    return o.epoch_ns(mark)


def test_a_refusal_under_a_clients_remote_parent(receiver: HttpReceiver) -> None:
    obs = observer(receiver)
    o = obs.begin({**SCOPE, "headers": HEADERS}, b"req-refused")
    assert o is not None and o.trace_id == CLIENT_TRACE
    o.key_id, o.team, o.priority, o.model, o.api = "key_1", "team_1", "high", "m", "chat"
    marks(o, "admit_start")
    o.status, o.error_code = 429, "team_rpm_exceeded"
    spans = exported(obs, receiver, o)
    server, admission = spans["POST /v1/chat/completions"], spans["gateway.admission"]
    assert server.parent_id == CLIENT_SPAN and server.kind == 2 and server.status == 0
    assert server.attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 429,
        "client.address": "10.0.0.7",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "gateway.request_id": "req-refused",
        "gateway.api": "chat",
        "gateway.key_id": "key_1",
        "gateway.team": "team_1",
        "gateway.priority": "high",
        "gateway.stream": False,
        "error.type": "team_rpm_exceeded",
    }
    assert admission.parent_id == server.span_id and admission.kind == 1 and admission.status == 2  # ERROR
    assert admission.attributes == {"gateway.key_id": "key_1"}
    assert admission.start_ns == admission.end_ns == ns(o, o.admit_start)
    assert server.start_ns == ns(o, o.started) and server.end_ns == ns(o, o.started + o.duration)


def test_a_cold_start_and_an_engine_that_never_answered(receiver: HttpReceiver) -> None:
    obs = observer(receiver)
    o = obs.begin({**SCOPE, "headers": []}, b"req-502")
    assert o is not None and o.trace is not None
    o.model, o.api = "m", "chat"
    marks(o, "admit_start", "admit_end", "queue_start", "queue_end")
    o.cold_start = (o.queue_start + 0.0002, o.queue_start + 0.0005)
    o.note_upstream("r1", "e1", "m-upstream", (("least_loaded", 0.25), ("prefix", 1.0)))
    marks(o, "admit_start", "admit_end", "queue_start", "queue_end", "upstream_start", "upstream_end", "settle_start")
    o.note_outcome(502, "upstream_error", Usage(11, 0, False), None, None, False)
    spans = exported(obs, receiver, o)
    server, queue, wake = spans["POST /v1/chat/completions"], spans["gateway.queue"], spans["gateway.engine_wake"]
    route, upstream = spans["gateway.route"], spans["chat m-upstream"]
    assert server.parent_id == "" and server.status == 2 and server.attributes["error.type"] == "upstream_error"
    assert server.attributes["gen_ai.usage.input_tokens"] == 11 and server.attributes["gen_ai.usage.output_tokens"] == 0
    assert wake.parent_id == queue.span_id and (wake.start_ns, wake.end_ns) == tuple(ns(o, t) for t in o.cold_start)
    assert queue.attributes == {"gateway.queue.position": 0}
    assert route.attributes == {
        "gateway.route": "r1",
        "gateway.engine": "e1",
        "gateway.routing.score.least_loaded": 0.25,
        "gateway.routing.score.prefix": 1.0,
    }
    assert (route.start_ns, route.end_ns) == (ns(o, o.queue_end), ns(o, o.upstream_start))
    assert upstream.kind == 3 and upstream.status == 2 and upstream.events == []  # no headers, no token
    assert upstream.parent_id == server.span_id
    assert upstream.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m-upstream",
        "gen_ai.response.model": "m-upstream",
        "gen_ai.usage.input_tokens": 11,
        "gen_ai.usage.output_tokens": 0,
        "gateway.route": "r1",
        "gateway.engine": "e1",
    }
    settle = spans["gateway.settle"]
    assert settle.attributes == {"gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 0}
    assert settle.start_ns == settle.end_ns == ns(o, o.settle_start)  # no end mark: a point


def test_a_streamed_answer_has_its_events_and_a_batch_line_its_link(receiver: HttpReceiver) -> None:
    obs = observer(receiver)
    assert obs.tracing is not None
    with obs.batch("batch_1", {"gateway.model": "m"}), obs.batch_line("batch_1", "line-1", "chat") as line:
        assert line is not None
        line.model = "m"
        line.stream = True
        line.note_upstream("r1", "e1", "m", ())
        line.upstream_headers = time.perf_counter()
        line.note_outcome(200, None, Usage(3, 5, True), time.perf_counter() - line.started, "stop", False)
    assert obs.tracing.flush(10)
    run = next(s for s in receiver.spans if s.name == "batch")
    spans = {s.name: s for s in receiver.trace(line.trace_id or "")}
    own, upstream = spans["batch line"], spans["chat m"]
    assert own.kind == 1 and own.links == [(run.trace_id, run.span_id)] and own.parent_id == ""
    expected: dict[str, Any] = {"http.response.status_code": 200, "gen_ai.operation.name": "chat"}
    expected |= {"gen_ai.request.model": "m", "gen_ai.response.model": "m", "gateway.stream": True}
    expected |= {"gen_ai.response.finish_reasons": ["stop"], "gateway.batch_id": "batch_1", "gateway.api": "chat"}
    assert {k: own.attributes[k] for k in expected} == expected and "url.path" not in own.attributes
    assert [name for name, _ in upstream.events] == ["response_headers", "first_token"]
    assert upstream.status == 0 and upstream.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    asyncio.run(obs.stop())
