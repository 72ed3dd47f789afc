"""The graceful drain on SIGTERM, on real processes: streams in flight finish, /ready turns 503 at
once, new connections are refused after the grace period, the process exits as soon as the work is
done; a stream that outlives the drain ends with an SSE error event and [DONE] (finding 12), and its
quota reservation and concurrency lease are reconciled before the process exits."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import ADMIN_KEY
from testkit.poll import eventually_async
from testkit.procs import Proc, fake_upstream, gateway, running
from testkit.redis_server import RedisServer


@pytest.fixture(scope="module")
def paced(logs_dir: Path) -> Iterator[Proc]:
    """Streams of 30 chunks 100 ms apart: 3 s each."""
    with running(
        fake_upstream(logs_dir, "--model", "fake", "--chunks", "30", "--pace-ms", "100", name="paced")
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def endless(logs_dir: Path) -> Iterator[Proc]:
    """Streams of 400 chunks 100 ms apart: 40 s, far longer than any drain here."""
    with running(
        fake_upstream(logs_dir, "--model", "fake", "--chunks", "400", "--pace-ms", "100", name="endless")
    ) as proc:
        yield proc


def config(engine: Proc, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "health": {"interval": 0.3},
        "engines": [{"name": "fake", "kind": "openai", "url": engine.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
    }


async def stream(client: httpx.AsyncClient, url: str, first: asyncio.Event, headers: Any = None) -> list[str]:
    """The data lines of one streamed chat completion; `first` is set when its first chunk arrived."""
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 500}
    lines = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                first.set()
    return lines


async def refused(url: str) -> bool:
    """Whether a new connection to the gateway is refused (its listeners closed)."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            await client.get(url)
    except httpx.ConnectError:
        return True
    return False


def wait_exit(gw: Proc, timeout: float) -> float:
    assert gw.proc is not None
    started = time.monotonic()
    gw.proc.wait(timeout)
    return time.monotonic() - started


def test_sigterm_lets_streams_in_flight_finish(logs_dir: Path, paced: Proc) -> None:
    # Far longer than the 3 s streams even on a busy machine: an exit before it is the streams'
    # end, not the timeout.
    drain_timeout = 30.0
    gw = gateway(logs_dir, config(paced, drain_grace=1.0, drain_timeout=drain_timeout), workers=2, name="drain")
    gw.start().wait_healthy("/ready", timeout=60)
    assert gw.proc is not None

    async def run() -> tuple[list[list[str]], float]:
        async with httpx.AsyncClient(timeout=30) as client:
            firsts = [asyncio.Event() for _ in range(10)]
            streams = [asyncio.create_task(stream(client, gw.url, first)) for first in firsts]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 20)
            gw.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            signalled = time.monotonic()
            # /ready turns 503 at once (the listeners are still open during the grace period).
            ready = await eventually_async(
                lambda: client.get(gw.url + "/ready"), lambda r: r.status_code == 503, timeout=10, what="/ready 503"
            )
            assert ready.json()["draining"] is True
            # After the grace period new connections are refused.
            await eventually_async(lambda: refused(gw.url + "/v1/models"), timeout=10, what="connections refused")
            return await asyncio.gather(*streams), signalled

    results, signalled = asyncio.run(run())
    for lines in results:
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(chunks) == 30
    gw.proc.wait(drain_timeout)
    assert time.monotonic() - signalled < drain_timeout
    assert gw.proc.returncode == 0
    log = gw.log_path.read_text()
    assert "llm-gateway stopped" in log


def test_a_stream_longer_than_the_drain_ends_with_an_error_event(
    logs_dir: Path, endless: Proc, redis_server: RedisServer
) -> None:
    drain_timeout = 2.0
    cfg = config(endless, drain_grace=0.2, drain_timeout=drain_timeout)
    cfg["redis"] = {"url": redis_server.url, "timeout": 1.0}
    cfg["auth"] = {"enabled": True}
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY}
    gw = gateway(logs_dir, cfg, name="drain-cut", env=env).start().wait_healthy("/ready", timeout=60)
    other = gateway(logs_dir, cfg, name="drain-other", env=env).start().wait_healthy("/ready", timeout=60)
    try:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        created = httpx.post(other.url + "/admin/keys", json={"name": "d", "max_concurrent": 1}, headers=admin)
        key_id, secret = created.json()["id"], created.json()["key"]
        auth = {"authorization": f"Bearer {secret}"}

        async def run() -> tuple[list[str], float]:
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.Event()
                task = asyncio.create_task(stream(client, gw.url, first, auth))
                await asyncio.wait_for(first.wait(), 20)
                gw.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                return await task, time.monotonic()

        lines, signalled = asyncio.run(run())
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert 10 < len(lines) < 400  # cut in the middle
        wait_exit(gw, 30)
        # out long before the 40 s stream would have ended: cut at the drain timeout (with room
        # for a busy machine)
        assert time.monotonic() - signalled < drain_timeout + 20
        # Reconciled before the exit: the usage is what was relayed (about 20 chunks), not the
        # 500-token reservation, and the concurrency lease is free on the other replica.
        usage = httpx.get(f"{other.url}/admin/keys/{key_id}/usage", headers=admin, timeout=10).json()
        assert usage["day"]["requests"] == 1
        assert 10 < usage["day"]["completion_tokens"] < 100
        r = httpx.post(
            other.url + "/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            headers=auth,
            timeout=30,
        )
        assert r.status_code == 200, r.text
    finally:
        gw.stop()
        other.stop()


def test_ctrl_c_drains_without_a_grace_period(logs_dir: Path, paced: Proc) -> None:
    gw = gateway(logs_dir, config(paced, drain_grace=5.0, drain_timeout=12.0), name="drain-int")
    gw.start().wait_healthy("/ready", timeout=60)

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.Event()
            task = asyncio.create_task(stream(client, gw.url, first))
            await asyncio.wait_for(first.wait(), 20)
            gw.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
            # An interactive stop: no load balancer to wait for, so no grace period (of 5 s here).
            await eventually_async(lambda: refused(gw.url + "/health"), timeout=3, what="connections refused")
            return await task

    lines = asyncio.run(run())
    assert lines[-1] == "[DONE]" and len(lines) == 31  # 30 chunks, then [DONE]: nothing cut
    assert wait_exit(gw, 15) < 10
    assert gw.proc is not None and gw.proc.returncode == 0
