"""OpenTelemetry traces (gateway/observe/) against real processes and an OTLP receiver in the test.

A streamed chat request with keys on makes one trace under the client's traceparent: the server
span, then admission, queue, route, the upstream call and settle as its children; the engine is
called with a traceparent whose parent is the upstream span. Over gRPC (set by the OTEL_*
environment) a client's unsampled traceparent is followed: nothing exported, the context still
passed on. A dead collector costs spans (counted), not answers.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.batch import client, jsonl, wait_final
from testkit.keyed import ADMIN_KEY, create_key, start_gateway
from testkit.procs import Proc, fake_upstream, free_port, gateway
from testkit.redis_server import RedisServer
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, Span

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CHILDREN = ["gateway.admission", "gateway.queue", "gateway.route", "chat fake", "gateway.settle"]


@pytest.fixture(scope="module")
def engine(logs_dir: Path) -> Iterator[Proc]:
    proc = fake_upstream(logs_dir, "--chunks", "4", "--record-trace", name="trace-fake").start()
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def engine_traces(engine: Proc) -> list[dict[str, str | None]]:
    return list(httpx.get(engine.url + "/traces", timeout=5).json())


def stream_chat(gw: Proc, headers: dict[str, str]) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "a secret prompt"}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        r.read()
    return r


def config(engine: Proc, **extra: object) -> dict[str, object]:
    return {
        "auth": {"enabled": False},
        "engines": [{"name": "fake", "kind": "openai", "url": engine.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        **extra,
    }


def test_a_keyed_stream_makes_one_trace_under_the_clients_and_the_engine_its_child(
    logs_dir: Path, engine: Proc, redis_server: RedisServer
) -> None:
    with HttpReceiver() as receiver:
        cfg = config(
            engine,
            redis={"url": redis_server.url},
            auth={"enabled": True},
            tracing={"endpoint": receiver.endpoint, "service_name": "gw-test", "headers": {"x-token": "collector"}},
        )
        gw = start_gateway(logs_dir, cfg, "gw-trace-http")
        try:
            key_id, secret = create_key(gw)
            traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            headers = {"authorization": f"Bearer {secret}", "traceparent": traceparent, "tracestate": "vendor=1"}
            r = stream_chat(gw, headers)
            assert r.status_code == 200 and b"[DONE]" in r.content

            def complete(spans: list[Span]) -> bool:
                return len([s for s in spans if s.trace_id == CLIENT_TRACE]) >= 1 + len(CHILDREN)

            receiver.wait_for(complete)
            spans = receiver.trace(CLIENT_TRACE)
        finally:
            gw.stop()
    # one trace: the server span under the client's span, every other span its child
    server = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert server.parent_id == CLIENT_SPAN and server.kind == 2  # SPAN_KIND_SERVER
    children = sorted((s for s in spans if s is not server), key=lambda s: s.start_ns)
    assert [s.name for s in children] == CHILDREN
    assert all(s.parent_id == server.span_id for s in children)
    assert all(server.start_ns <= s.start_ns <= s.end_ns <= server.end_ns for s in children)
    for before, after in itertools.pairwise(children):
        assert before.end_ns <= after.start_ns + 1000  # in order, no overlap (1 µs of rounding)
    assert {s.service for s in spans} == {"gw-test"}
    assert spans[0].headers.get("x-token") == "collector"  # tracing.headers reach the collector

    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "fake"
    assert a["gen_ai.response.model"] == "fake" and a["gen_ai.usage.input_tokens"] == 8
    assert a["gen_ai.usage.output_tokens"] == 4 and a["http.response.status_code"] == 200
    assert (a["gateway.key_id"], a["gateway.route"], a["gateway.engine"], a["gateway.priority"]) == (
        key_id,
        "v1",
        "fake",
        "normal",
    )
    assert a["gateway.request_id"] == r.headers["x-request-id"]
    by_name = {s.name: s for s in children}
    assert by_name["gateway.admission"].attributes["gateway.key_id"] == key_id
    assert by_name["gateway.queue"].attributes["gateway.priority"] == "normal"
    assert by_name["gateway.route"].attributes["gateway.engine"] == "fake"
    upstream = by_name["chat fake"]
    assert upstream.kind == 3  # SPAN_KIND_CLIENT
    assert [e[0] for e in upstream.events] == ["response_headers", "first_token"]
    assert by_name["gateway.settle"].attributes["gen_ai.usage.output_tokens"] == 4
    # never a secret or the prompt
    everything = json.dumps([(s.name, s.attributes) for s in spans])
    for secret_text in (secret, ADMIN_KEY, "a secret prompt"):
        assert secret_text not in everything

    # the engine was called with the upstream span as its parent, the client's tracestate kept
    sent = engine_traces(engine)[-1]
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{upstream.span_id}-01"
    assert sent["tracestate"] == "vendor=1"
    # the access log names the trace
    assert f'"trace_id":"{CLIENT_TRACE}"' in gw.log_path.read_text()


def test_grpc_from_the_environment_and_an_unsampled_parent_followed(logs_dir: Path, engine: Proc) -> None:
    with GrpcReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        gw = gateway(logs_dir, config(engine), name="gw-trace-grpc", env=env).start().wait_healthy("/ready", 60)
        try:
            unsampled = "11111111111111111111111111111111"
            r = stream_chat(gw, {"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"})
            assert r.status_code == 200
            sent = engine_traces(engine)[-1]["traceparent"]
            assert sent is not None and sent.startswith(f"00-{unsampled}-") and sent.endswith("-00")
            r = stream_chat(gw, {})  # a new trace, sampled (ratio 1)
            assert r.status_code == 200
            sent = engine_traces(engine)[-1]["traceparent"]
            assert sent is not None and int(sent[-2:], 16) & 1  # sampled (W3C level 2 adds the random-id bit)
            trace_id = sent.split("-")[1]
            receiver.wait_for(lambda spans: len([s for s in spans if s.trace_id == trace_id]) >= 6)
            time.sleep(1.0)  # one more export interval: the unsampled trace would have arrived too
            assert receiver.trace(unsampled) == []
            names = sorted(s.name for s in receiver.trace(trace_id))
            assert names == sorted(["POST /v1/chat/completions", *CHILDREN])
        finally:
            gw.stop()


def test_a_dead_collector_costs_spans_not_answers(logs_dir: Path, engine: Proc) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = config(engine, tracing={"endpoint": dead, "queue_size": 4})
    gw = gateway(logs_dir, cfg, name="gw-trace-dead").start().wait_healthy("/ready", 60)
    try:
        started = time.monotonic()
        for _ in range(10):
            assert stream_chat(gw, {}).status_code == 200
        assert time.monotonic() - started < 10  # nobody waited for the collector
        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(gw.url + "/metrics", timeout=5).text
            counts = {
                reason: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                for reason in ("queue_full", "export_failed")
                if line.startswith(f'gateway_trace_spans_dropped_total{{reason="{reason}"}}')
            }
            # 10 requests x 6 spans, every one counted: what was queued fails to export (at once,
            # unencoded, while the collector is left alone after a failure), what found the queue
            # full is dropped (tests/test_span_queue.py fills one)
            full, failed = counts.get("queue_full", 0), counts.get("export_failed", 0)
            if full + failed == 60 and failed >= 1:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.5)
    finally:
        gw.stop()
    assert os.path.exists(gw.log_path)


def test_batch_lines_are_traced_and_linked_to_their_batch(logs_dir: Path, engine: Proc, tmp_path: Path) -> None:
    with HttpReceiver() as receiver:
        cfg = config(
            engine,
            store={"url": "sqlite:///batches.db", "data_dir": str(tmp_path)},
            batch={"concurrency": 2, "poll_interval": 0.2, "min_completion_window": 1},
            tracing={"endpoint": receiver.endpoint},
        )
        gw = gateway(logs_dir, cfg, name="gw-trace-batch").start().wait_healthy("/ready", 60)
        try:
            c = client(gw, "unused")
            lines = [
                {
                    "custom_id": str(i),
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
                }
                for i in range(2)
            ]
            uploaded = c.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = c.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1s")
            assert wait_final(c, batch.id, timeout=60).status == "completed"

            def complete(spans: list[Span]) -> bool:
                names = [s.name for s in spans]
                return "batch" in names and names.count("batch line") == 2

            spans = receiver.wait_for(complete)
        finally:
            gw.stop()
    run = next(s for s in spans if s.name == "batch")
    assert run.attributes["gateway.batch_id"] == batch.id
    line_spans = [s for s in spans if s.name == "batch line"]
    for line in line_spans:
        assert line.parent_id == "" and line.links == [(run.trace_id, run.span_id)]  # a trace of its own, linked
        assert line.attributes["gateway.batch_id"] == batch.id
        children = {s.name for s in spans if s.parent_id == line.span_id}
        assert children == set(CHILDREN)
