"""Scale to zero on real processes: a managed CPU engine with `idle_stop` is stopped (its process
gone) after that long without traffic; the next request starts it and gets its answer, the wait is
recorded; 20 requests during a cold start, across two worker processes, cause one start; another
healthy engine of the route serves without waiting; and a stopped engine whose port some other
process took is reported, not used."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.ci import require
from testkit.metrics import metric
from testkit.procs import TINY_MODEL, Proc, child_pid_listening_on, cpu_engine, free_port, gateway

IDLE_STOP = 2.0


@pytest.fixture(scope="module")
def gw(logs_dir: Path, fake_engine: Proc) -> Iterator[Proc]:
    require((TINY_MODEL / "config.json").exists(), "tiny model missing")
    port = free_port()
    config = {
        "health": {"interval": 0.3},
        "engines": [
            {**cpu_engine("a", port), "idle_stop": IDLE_STOP, "cold_start_timeout": 90},
            {"name": "fake", "kind": "openai", "url": fake_engine.url},
        ],
        "models": [
            {"name": "tiny", "routes": [{"engine": "a"}]},
            {"name": "mixed", "routes": [{"engines": ["a", "fake"], "model": "tiny-llama"}]},
        ],
        "auth": {"enabled": False},
    }
    proc = gateway(logs_dir, config, name="s2z", workers=2).start()
    proc.engine_port = port  # type: ignore[attr-defined]
    try:
        proc.wait_healthy("/ready", timeout=120)
        yield proc
    finally:
        proc.stop()


def state(gw: Proc, engine: str = "a") -> str:
    return str(httpx.get(gw.url + "/ready", timeout=10).json()["engine_states"][engine])


def wait_state(gw: Proc, wanted: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while state(gw) != wanted:
        assert time.monotonic() < deadline, f"engine a never {wanted}: {state(gw)}\n{gw.log_tail()}"
        time.sleep(0.2)


def starts(gw: Proc) -> int:
    return len(re.findall(r"starting engine a:", gw.log_path.read_text()))


def metrics(gw: Proc) -> str:
    return httpx.get(gw.url + "/metrics", timeout=10).text


def complete(gw: Proc, model: str = "tiny") -> httpx.Response:
    body = {"model": model, "prompt": "The license", "max_tokens": 3}
    return httpx.post(gw.url + "/v1/completions", json=body, timeout=120)


def test_an_idle_engine_stops_and_a_request_wakes_it(gw: Proc) -> None:
    assert gw.proc is not None
    wait_state(gw, "stopped", timeout=IDLE_STOP + 30)
    with pytest.raises(LookupError):  # its process is gone, its memory freed
        child_pid_listening_on(gw.proc.pid, gw.engine_port)  # type: ignore[attr-defined]
    ready = httpx.get(gw.url + "/ready?model=tiny", timeout=10)
    assert ready.status_code == 200  # a stopped engine that can be woken counts as ready
    before = metrics(gw)
    r = complete(gw)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    after = metrics(gw)
    assert metric(after, "gateway_engine_cold_starts_total", engine="a") == (
        metric(before, "gateway_engine_cold_starts_total", engine="a") + 1
    )
    waited = metric(after, "gateway_cold_start_wait_seconds_sum", model="tiny")
    assert waited - metric(before, "gateway_cold_start_wait_seconds_sum", model="tiny") > 0.1
    assert metric(after, "gateway_engine_state", engine="a", state="healthy") == 1


def test_twenty_requests_during_a_cold_start_cause_one_start(gw: Proc) -> None:
    wait_state(gw, "stopped", timeout=IDLE_STOP + 30)
    before_starts, before = starts(gw), metrics(gw)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "tiny", "prompt": "The license", "max_tokens": 3}
            return await asyncio.gather(*(client.post(gw.url + "/v1/completions", json=body) for _ in range(20)))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 20
    assert starts(gw) == before_starts + 1
    after = metrics(gw)
    assert metric(after, "gateway_engine_cold_starts_total", engine="a") == (
        metric(before, "gateway_engine_cold_starts_total", engine="a") + 1
    )
    assert metric(after, "gateway_cold_start_wait_seconds_count", model="tiny") == (
        metric(before, "gateway_cold_start_wait_seconds_count", model="tiny") + 20
    )


def test_a_healthy_engine_of_the_route_serves_without_waiting(gw: Proc) -> None:
    wait_state(gw, "stopped", timeout=IDLE_STOP + 30)
    before_starts = starts(gw)
    started = time.monotonic()
    r = complete(gw, "mixed")
    assert r.status_code == 200 and r.json()["model"] == "fake"  # the fake engine answered
    assert time.monotonic() - started < 2  # no cold start in the way
    wait_state(gw, "healthy")  # the stopped one was started in the background meanwhile
    assert starts(gw) == before_starts + 1


def test_a_taken_port_is_reported_not_used(gw: Proc) -> None:
    wait_state(gw, "stopped", timeout=IDLE_STOP + 30)
    port = gw.engine_port  # type: ignore[attr-defined]
    with socket.socket() as squatter:  # some other process now listens on the engine's port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past our own TIME_WAITs
        squatter.bind(("127.0.0.1", port))
        squatter.listen(16)
        squatter.settimeout(0.1)
        started = time.monotonic()
        r = complete(gw)
        assert r.status_code == 503 and time.monotonic() - started < 10
        assert f"engine a: port {port}" in gw.log_path.read_text()
        assert httpx.get(gw.url + "/ready?model=tiny", timeout=10).status_code == 503
        with pytest.raises(TimeoutError):
            squatter.accept()  # neither a request nor a health check reached it
