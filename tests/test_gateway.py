"""The gateway with two managed CPU engines (real worker processes), driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from testkit.ci import require
from testkit.metrics import metric
from testkit.procs import (
    TINY_MODEL,
    Proc,
    child_pid_listening_on,
    cpu_engine,
    fake_upstream,
    free_port,
    gateway,
    running,
)

MODEL = "tiny"


@pytest.fixture(scope="module")
def flaky(logs_dir: Path) -> Iterator[Proc]:
    """An engine that passes health checks but answers every request with a 500."""
    with running(fake_upstream(logs_dir, "--fail-status", "500", "--model", "tiny-llama", name="flaky")) as proc:
        yield proc


@pytest.fixture(scope="module")
def gw(logs_dir: Path, flaky: Proc) -> Iterator[Proc]:
    require((TINY_MODEL / "config.json").exists(), "tiny model missing")
    a, b = free_port(), free_port()
    config = {
        "server": {"max_body_bytes": 65536, "idle_timeout": 30},
        "health": {"interval": 0.3},
        "engines": [
            cpu_engine("a", a),
            cpu_engine("b", b),
            {"name": "flaky", "kind": "openai", "url": flaky.url},
        ],
        "models": [
            {"name": MODEL, "routes": [{"engines": ["a", "b"]}]},
            {"name": "split", "routes": [{"engine": "a", "weight": 80}, {"engine": "b", "weight": 20}]},
            {"name": "with-flaky", "routes": [{"engines": ["flaky", "a"], "model": "tiny-llama"}]},
        ],
        "auth": {"enabled": False},
    }
    proc = gateway(logs_dir, config).start()
    proc.engine_ports = (a, b)  # type: ignore[attr-defined]
    try:
        proc.wait_healthy("/ready", timeout=120)
        deadline = time.monotonic() + 60
        while not all(httpx.get(proc.url + "/ready").json()["engines"].values()):
            assert time.monotonic() < deadline, "engines never all healthy"
            time.sleep(0.2)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(gw: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_chat_and_completions_through_the_gateway(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert r.choices[0].message.content is not None and r.usage and r.usage.completion_tokens >= 1
    c = client.completions.create(model=MODEL, prompt="The license", max_tokens=5, extra_body={"ignore_eos": True})
    assert c.usage and c.usage.completion_tokens == 5


def test_streaming_usage_only_when_asked(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "Python", "max_tokens": 6, "stream": True, "extra_body": {"ignore_eos": True}}
    without = list(client.completions.create(**kwargs))  # type: ignore[call-overload]
    assert without and all(not (c.usage and c.usage.total_tokens) for c in without)
    assert without[-1].choices[0].finish_reason == "length"
    asked = list(client.completions.create(**kwargs, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 6


def test_request_id_echoed_or_made(gw: Proc) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    r = httpx.post(gw.url + "/v1/completions", json=body, headers={"x-request-id": "abc-123"}, timeout=30)
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.post(gw.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 32
    with httpx.stream("POST", gw.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        assert s.headers["x-request-id"] and s.headers["content-type"].startswith("text/event-stream")


def test_weighted_routes(gw: Proc) -> None:
    before = httpx.get(gw.url + "/metrics").text
    body = {"model": "split", "prompt": "x", "max_tokens": 1}

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            for start in range(0, 200, 20):
                rs = await asyncio.gather(*(c.post(gw.url + "/v1/completions", json=body) for _ in range(20)))
                assert all(r.status_code == 200 for r in rs), start

    asyncio.run(run())
    after = httpx.get(gw.url + "/metrics").text
    to_a = metric(after, "gateway_routing_decisions_total", model="split", engine="a") - metric(
        before, "gateway_routing_decisions_total", model="split", engine="a"
    )
    to_b = metric(after, "gateway_routing_decisions_total", model="split", engine="b") - metric(
        before, "gateway_routing_decisions_total", model="split", engine="b"
    )
    assert to_a + to_b == 200
    assert 130 <= to_a <= 190, (to_a, to_b)  # 80% of 200 = 160, well inside 5 sigma


def test_retry_before_first_byte(gw: Proc) -> None:
    before = metric(httpx.get(gw.url + "/metrics").text, "gateway_retries_total", model="with-flaky")
    body = {"model": "with-flaky", "prompt": "x", "max_tokens": 2}
    for stream in (False, True):
        for _ in range(6):
            r = httpx.post(gw.url + "/v1/completions", json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 200, r.text
    after = httpx.get(gw.url + "/metrics").text
    assert metric(after, "gateway_retries_total", model="with-flaky") > before
    assert metric(after, "gateway_upstream_errors_total", engine="flaky", kind="5xx") >= 1


BAD = [
    (b"{oops", 400, None),
    (b'"a string"', 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": 5, "prompt": "x"}, 400, "model"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),  # the engine says so
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),  # the engine says so
    ({"model": MODEL, "prompt": "y" * 70000}, 413, None),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_input(gw: Proc, body: object, status: int, param: str | None) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(gw.url + "/v1/completions", timeout=30, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert r.headers["x-request-id"]


def test_unknown_route_and_method(gw: Proc) -> None:
    assert httpx.get(gw.url + "/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(gw.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_models_health_metrics(gw: Proc, client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["split", MODEL, "with-flaky"]
    assert httpx.get(gw.url + "/health").status_code == 200
    text = httpx.get(gw.url + "/metrics").text
    for name in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_time_to_first_token_seconds_bucket",
        "gateway_inter_token_latency_seconds_bucket",
        "gateway_prompt_tokens_total",
        "gateway_completion_tokens_total",
        "gateway_requests_in_flight",
        "gateway_streams_in_flight",
        "gateway_engine_healthy",
        "gateway_engine_outstanding_requests",
    ):
        assert name in text, name


def engine_metric(port: int, name: str) -> float:
    return metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text, name)


def test_client_disconnect_aborts_in_engine(gw: Proc) -> None:
    ports = gw.engine_ports  # type: ignore[attr-defined]
    aborted = sum(engine_metric(p, "engine_requests_aborted_total") for p in ports)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", gw.url + "/v1/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10  # generous: the counter is the evidence, not the time
    while sum(engine_metric(p, "engine_requests_aborted_total") for p in ports) <= aborted:
        assert time.monotonic() < deadline, "the engine never saw the abort"
        time.sleep(0.05)
    assert sum(engine_metric(p, "engine_num_requests_running") for p in ports) == 0
    # Non-streaming too: the client gives up, the engine aborts.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gw.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0)
    deadline = time.monotonic() + 2
    while sum(engine_metric(p, "engine_num_requests_running") for p in ports) != 0:
        assert time.monotonic() < deadline, "the abandoned request still runs"
        time.sleep(0.05)


def test_engine_killed_mid_stream(gw: Proc) -> None:
    a_port, _ = gw.engine_ports  # type: ignore[attr-defined]
    assert gw.proc is not None
    a_pid = child_pid_listening_on(gw.proc.pid, a_port)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "stream": True, "ignore_eos": True}

    async def one(c: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
        events: list[str] = []
        async with c.stream("POST", gw.url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        started.set()
        return events

    async def run() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=60) as c:
            flags = [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.create_task(one(c, f)) for f in flags]
            await asyncio.gather(*(f.wait() for f in flags))
            os.kill(a_pid, signal.SIGKILL)
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    # least-loaded spread the 8 streams over both engines; those on a went on on b (failover:
    # resume, the default): every client got one whole stream, no error event
    assert all(r[-1] == "[DONE]" for r in results)
    for r in results:
        # an error event has an "error" member; a token's text may well be the word "error"
        assert not any("error" in json.loads(e) for e in r[:-1]), r[-3:]
        assert '"finish_reason":"length"' in r[-2], r[-3:]
    # New requests keep working (they go to b), and the gateway restarts a by itself.
    for _ in range(4):
        r = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    deadline = time.monotonic() + 90
    while True:
        try:
            if (
                child_pid_listening_on(gw.proc.pid, a_port) != a_pid
                and httpx.get(gw.url + "/ready").json()["engines"]["a"]
            ):
                break
        except LookupError:
            pass
        assert time.monotonic() < deadline, "engine a was not restarted"
        time.sleep(0.3)


def test_503_when_all_engines_down_then_recovery(logs_dir: Path) -> None:
    up = fake_upstream(logs_dir, "--model", "m", name="solo").start().wait_healthy()
    config = {
        "health": {"interval": 0.2},
        "engines": [{"name": "solo", "kind": "openai", "url": up.url}],
        "models": [{"name": "m", "routes": [{"engine": "solo"}]}],
        "auth": {"enabled": False},
    }
    gw = gateway(logs_dir, config, name="gw-solo").start()
    try:
        gw.wait_healthy("/ready", timeout=60)
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        up.kill()
        statuses = {httpx.post(gw.url + "/v1/chat/completions", json=body).status_code for _ in range(3)}
        assert statuses == {503}
        r = httpx.post(gw.url + "/v1/chat/completions", json=body)
        assert r.json()["error"]["type"] == "service_unavailable" and int(r.headers["retry-after"]) >= 1
        assert httpx.get(gw.url + "/ready").status_code == 503
        up.start().wait_healthy()
        deadline = time.monotonic() + 10
        while httpx.post(gw.url + "/v1/chat/completions", json=body).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not recover"
            time.sleep(0.1)
    finally:
        gw.stop()
        up.stop()


def test_several_workers_share_engines_and_sum_metrics(logs_dir: Path) -> None:
    up = fake_upstream(logs_dir, "--model", "m", name="multi").start().wait_healthy()
    config = {
        "engines": [{"name": "e", "kind": "openai", "url": up.url}],
        "models": [{"name": "m", "routes": [{"engine": "e"}]}],
        "auth": {"enabled": False},
    }
    gw = gateway(logs_dir, config, name="gw-multi", workers=2).start()
    try:
        gw.wait_healthy("/ready", timeout=60)
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        for _ in range(20):  # a new connection each: the kernel spreads them over the workers
            assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
        for _ in range(3):  # whichever worker answers the scrape reports every worker's counts
            text = httpx.get(gw.url + "/metrics").text
            assert metric(text, "gateway_requests_total", model="m", status="200") == 20
    finally:
        gw.stop()
        up.stop()
