"""Engines that stop answering are found out: the circuit breaker per engine, and streams that leave
an engine the moment the pool takes it out.

Real processes: fake engines (testkit/fake_upstream.py) behind a gateway with a private Redis. One
fake answers /health at once but holds every request longer than the gateway waits for a first
byte; another is SIGSTOPped in the middle of streams (its socket stays open, nothing comes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.engines.breaker import Breaker, BreakerState
from testkit.keyed import ADMIN_KEY, admin, create_key
from testkit.procs import Proc, all_healthy, fake_upstream, gateway
from testkit.redis_server import RedisServer

COOLDOWN = 5.0  # long enough that a loaded machine reads the open state before it ends


def test_the_breaker_opens_on_consecutive_failures_and_a_trial_closes_it() -> None:
    b = Breaker(threshold=3)
    assert b.admits
    assert not b.failed("timeout") and not b.failed("timeout")
    b.succeeded()  # an answer resets the count
    assert not b.failed("a") and not b.failed("b")
    assert b.failed("c") and b.state is BreakerState.OPEN and not b.admits and b.opens == 1
    assert not b.succeeded() and b.state is BreakerState.OPEN  # a late answer does not close it
    b.cooled()
    assert b.state is BreakerState.HALF_OPEN and b.admits
    b.trial = True
    assert not b.admits  # one trial at a time
    assert b.failed("trial failed") and b.state is BreakerState.OPEN and b.opens == 2  # opens again at once
    b.cooled()
    assert b.succeeded() and b.state is BreakerState.CLOSED and b.errors == 0
    off = Breaker(threshold=0)
    assert not any(off.failed("x") for _ in range(10)) and off.admits


@pytest.fixture(scope="module")
def breaker_gw(logs_dir: Path, redis_session: RedisServer) -> Iterator[tuple[Proc, Proc, Proc]]:
    # `stuck` answers /health at once and every request after 30 s: past the gateway's 1 s.
    stuck = fake_upstream(logs_dir, "--delay-ms", "30000", name="stuck")
    good = fake_upstream(logs_dir, name="good")
    with all_healthy({"stuck": stuck, "good": good}):
        redis_session.fresh()
        config = {
            "server": {"request_timeout": 1.0},
            "health": {"interval": 0.3, "breaker_failures": 2, "breaker_cooldown": COOLDOWN},
            "redis": {"url": redis_session.url},
            "auth": {"enabled": True},
            "engines": [
                {"name": "stuck", "kind": "openai", "url": stuck.url},
                {"name": "good", "kind": "openai", "url": good.url},
            ],
            "models": [{"name": "fake", "routes": [{"engines": ["stuck", "good"]}]}],
        }
        gw = gateway(logs_dir, config, name="breaker", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
        try:
            yield gw.wait_healthy("/ready"), stuck, good
        finally:
            gw.stop()


def _chat(gw: Proc, secret: str) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"authorization": f"Bearer {secret}"}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def _engine(gw: Proc, name: str) -> dict[str, Any]:
    engines = admin(gw, "GET", "/admin/engines").json()["data"]
    return next(e for e in engines if e["name"] == name)


def _breaker_gauge(gw: Proc, engine: str, state: str) -> float:
    prefix = f'gateway_engine_breaker_state{{engine="{engine}",state="{state}"}} '
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"no {prefix} in /metrics")


def test_an_engine_whose_requests_time_out_while_its_health_passes_is_taken_out(
    breaker_gw: tuple[Proc, Proc, Proc],
) -> None:
    gw, stuck, _ = breaker_gw
    _, secret = create_key(gw)
    statuses = []
    deadline = time.monotonic() + 60
    while (view := _engine(gw, "stuck"))["breaker"]["state"] != "open":
        assert time.monotonic() < deadline, "the breaker never opened"
        statuses.append(_chat(gw, secret).status_code)
    assert statuses.count(504) == 2 and set(statuses) <= {200, 504}, statuses  # two timeouts open it
    assert view["health_check"] is True and view["healthy"] is False, view  # /health passes; no traffic
    assert view["breaker"]["consecutive_failures"] == 2 and view["breaker"]["last_failure"] == "no first byte in time"
    assert _breaker_gauge(gw, "stuck", "open") == 1 and _breaker_gauge(gw, "good", "closed") == 1
    assert 'gateway_engine_breaker_opens_total{engine="stuck"} 1.0' in httpx.get(gw.url + "/metrics").text
    assert "engine stuck: circuit breaker open after 2 consecutive failed requests" in gw.log_tail(200)
    # While it is open every request goes to the good engine, at once.
    assert all(_chat(gw, secret).status_code == 200 for _ in range(3))

    # After the cooldown one request is the trial: it times out, and the breaker opens again.
    time.sleep(COOLDOWN + 0.3)
    assert _engine(gw, "stuck")["breaker"]["state"] == "half_open"
    deadline = time.monotonic() + 30
    while _engine(gw, "stuck")["breaker"]["opens"] < 2:
        assert time.monotonic() < deadline, "the trial never reached the stuck engine"
        _chat(gw, secret)
    assert _engine(gw, "stuck")["breaker"]["state"] == "open"

    # The engine is fixed: the next trial is answered and closes the breaker.
    stuck.stop()
    stuck.args = [a for a in stuck.args if a not in ("--delay-ms", "30000")]
    stuck.start().wait_healthy()
    time.sleep(COOLDOWN + 0.3)
    deadline = time.monotonic() + 30
    while _engine(gw, "stuck")["breaker"]["state"] != "closed":
        assert time.monotonic() < deadline, "the breaker never closed"
        assert _chat(gw, secret).status_code == 200
    assert _engine(gw, "stuck")["healthy"] is True
    assert "engine stuck: circuit breaker closed" in gw.log_tail(200)


# -- streams leave an engine taken out, at once ------------------------------------------------------

STREAMS = 12
CHUNKS = 150
PACE_MS = 30  # a stream lasts about 4.5 s on one engine


@pytest.fixture(scope="module")
def paced_gw(logs_dir: Path, redis_session: RedisServer) -> Iterator[tuple[Proc, dict[str, Proc]]]:
    args = ("--chunks", str(CHUNKS), "--pace-ms", str(PACE_MS))
    fakes = {name: fake_upstream(logs_dir, *args, name=f"paced-{name}") for name in ("a", "b")}
    with all_healthy(fakes):
        config = {
            # The idle timeout is far off: only the health check can find the hung engine.
            "server": {"idle_timeout": 120.0},
            "health": {"interval": 0.3, "timeout": 0.5, "failures_to_eject": 2},
            "redis": {"url": redis_session.url},
            "auth": {"enabled": True},
            "engines": [{"name": n, "kind": "openai", "url": p.url} for n, p in fakes.items()],
            "models": [{"name": "fake", "routes": [{"engines": ["a", "b"]}]}],
        }
        gw = gateway(logs_dir, config, name="paced", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
        try:
            yield gw.wait_healthy("/ready"), fakes
        finally:
            for fake in fakes.values():
                if fake.proc is not None and fake.proc.poll() is None:
                    os.kill(fake.proc.pid, signal.SIGCONT)
            gw.stop()


async def _paced_stream(client: httpx.AsyncClient, secret: str, started: asyncio.Event) -> dict[str, Any]:
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": "a long answer please"}],
        "max_tokens": 400,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, errors, finish, usage, done, ids = 0, [], None, None, False, set()
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}
    ) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                    continue
                ids.add(event["id"])
                usage = event.get("usage") or usage
                for choice in event.get("choices", []):
                    text += 1
                    if text == 5:
                        started.set()
                    finish = choice.get("finish_reason") or finish
    return {"tokens": text, "errors": errors, "finish": finish, "usage": usage, "done": done, "ids": ids}


def test_streams_leave_a_hung_engine_as_soon_as_it_is_taken_out(paced_gw: tuple[Proc, dict[str, Proc]]) -> None:
    gw, fakes = paced_gw
    _, secret = create_key(gw)
    hung = fakes["a"]
    assert hung.proc is not None

    async def run() -> tuple[list[dict[str, Any]], float]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            started = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [asyncio.create_task(_paced_stream(client, secret, e)) for e in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            assert hung.proc is not None
            os.kill(hung.proc.pid, signal.SIGSTOP)  # hangs: sockets open, nothing comes
            stopped = time.monotonic()
            results = await asyncio.gather(*tasks)
            return results, time.monotonic() - stopped

    try:
        results, took = asyncio.run(run())
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    for r in results:
        assert r["errors"] == [] and r["done"] and r["finish"] == "length", r
        assert len(r["ids"]) == 1 and r["usage"] is not None, r
    # The moved streams end well before the idle timeout (120 s) would have broken them: the
    # health check found the engine (about 1 s), and a whole stream on the other takes ~4.5 s.
    assert took < 20, took
    log = gw.log_tail(400)
    assert "engine a failed its health check" in log
    assert "leaving engine a" in log
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_stream_resumes_total{model="fake",outcome="resumed"}' in metrics


@pytest.fixture(scope="module")
def slow_gw(logs_dir: Path, redis_session: RedisServer) -> Iterator[tuple[Proc, dict[str, Proc]]]:
    fakes = {name: fake_upstream(logs_dir, "--delay-ms", "1500", name=f"slow-{name}") for name in ("a", "b")}
    with all_healthy(fakes):
        config = {
            "server": {"request_timeout": 60.0},
            "health": {"interval": 0.3, "timeout": 0.5, "failures_to_eject": 2},
            "redis": {"url": redis_session.url},
            "auth": {"enabled": True},
            "engines": [{"name": n, "kind": "openai", "url": p.url} for n, p in fakes.items()],
            "models": [{"name": "fake", "routes": [{"engines": ["a", "b"]}]}],
        }
        gw = gateway(logs_dir, config, name="slow", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
        try:
            yield gw.wait_healthy("/ready"), fakes
        finally:
            for fake in fakes.values():
                if fake.proc is not None and fake.proc.poll() is None:
                    os.kill(fake.proc.pid, signal.SIGCONT)
            gw.stop()


def test_requests_waiting_on_a_hung_engine_are_sent_to_another(slow_gw: tuple[Proc, dict[str, Proc]]) -> None:
    gw, fakes = slow_gw
    _, secret = create_key(gw)
    hung = fakes["a"]
    assert hung.proc is not None

    async def run() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            headers = {"authorization": f"Bearer {secret}"}
            tasks = [
                asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=headers)) for _ in range(8)
            ]
            await asyncio.sleep(0.5)  # all sent, none answered (each takes 1.5 s)
            assert hung.proc is not None
            os.kill(hung.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            return list(await asyncio.gather(*tasks)), time.monotonic() - stopped

    try:
        answers, took = asyncio.run(run())
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    # Without the move those on the hung engine would wait for request_timeout (60 s).
    assert took < 15, took
    assert "leaving engine a" in gw.log_tail(200)
