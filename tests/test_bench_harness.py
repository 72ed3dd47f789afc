"""The request-path benchmark's own parts: the floor proxy relays exactly what the upstream sends, the load
generator counts what it receives, and the profile summary attributes samples as it says. The benchmark's
ratios are only as good as these (a floor that dropped bytes would look cheap)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest

from testkit import pyspy
from testkit.loadgen import closed_loop, paced_streams
from testkit.procs import ROOT, Proc, fake_upstream, free_port

CHUNKS = 8
BODY = b'{"model":"fake","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"fake","messages":[],"stream":true,"stream_options":{"include_usage":true}}'


@pytest.fixture(scope="module")
def upstream_and_floor(logs_dir: Path) -> Iterator[tuple[Proc, Proc]]:
    up = fake_upstream(logs_dir, "--chunks", str(CHUNKS), "--pace-ms", "2", name="bench-fake").start()
    port = free_port()
    args = [sys.executable, str(ROOT / "bench" / "floor_proxy.py"), "--port", str(port), "--upstream", up.url]
    floor = Proc("floor", args, port, logs_dir / f"floor-{port}.log").start()
    try:
        yield up.wait_healthy(), floor.wait_healthy()
    finally:
        floor.stop()
        up.stop()


def test_floor_relays_answers_and_streams_byte_for_byte(upstream_and_floor: tuple[Proc, Proc]) -> None:
    up, floor = upstream_and_floor
    headers = {"content-type": "application/json"}
    path = "/v1/chat/completions"
    for body in (BODY, STREAM_BODY):
        direct = httpx.post(up.url + path, content=body, headers=headers, timeout=10)
        relayed = httpx.post(floor.url + path, content=body, headers=headers, timeout=10)
        assert relayed.status_code == direct.status_code == 200
        assert relayed.headers["content-type"] == direct.headers["content-type"]
        assert relayed.content == direct.content
    assert relayed.content.count(b"data: {") == CHUNKS + 1  # the usage chunk
    assert relayed.content.endswith(b"data: [DONE]\n\n")


def test_load_generator_counts_requests_and_chunks(upstream_and_floor: tuple[Proc, Proc]) -> None:
    _, floor = upstream_and_floor
    url = floor.url + "/v1/chat/completions"

    async def run() -> None:
        headers = {"content-type": "application/json"}
        async with aiohttp.ClientSession(headers=headers) as session:
            closed = await closed_loop(session, url, BODY, 4, requests=40, seconds=30)
            assert (closed.requests, closed.failures) == (40, 0)
            paced = await paced_streams(session, url, STREAM_BODY, 20, chunks=CHUNKS + 1, ramp_s=0.05)
            assert (paced.completed, paced.errors, paced.chunks) == (20, {}, 20 * (CHUNKS + 1))
            assert paced.held_at_once > 1
            # A stream that ends early is reported, with why.
            short = await paced_streams(session, url, STREAM_BODY, 3, chunks=CHUNKS + 2, ramp_s=0)
            assert short.completed == 0
            assert short.errors == {f"{CHUNKS + 1} of {CHUNKS + 2} chunks": 3}

    asyncio.run(run())


def test_profile_summary_counts_self_total_and_drops_idle_waits(tmp_path: Path) -> None:
    raw = tmp_path / "stacks.txt"
    run = "Runner.run (asyncio/runners.py:86)"
    route = "OpenAIRoutes.asgi (gateway/front/routes/openai.py:92)"
    post = "ClientSession._request (aiohttp/client.py:558)"
    wait = "Condition.wait (threading.py:295)"
    raw.write_text(
        f"<module> (gateway/cli/main.py:1);{run} 30\n"
        f"<module> (gateway/cli/main.py:1);{run};{route} 10\n"
        f"<module> (gateway/cli/main.py:1);{run};{route};{post} 60\n"
        f"_bootstrap (threading.py:1002);Supervisor._watch (gateway/engines/supervisor.py:94);{wait} 500\n"
    )
    profile = pyspy.load(raw)
    assert profile.samples == 100  # the supervisor's sleep is not CPU
    assert profile.self_counts[post] == 60 and profile.self_counts[route] == 10
    assert profile.total_counts[route] == 70 and profile.total_counts[run] == 100
    assert profile.package_self == {"aiohttp": 60, "asyncio": 30, "gateway": 10}
    text = pyspy.report("test", profile, top=3)
    assert "60.0%  ClientSession._request (aiohttp/client.py:558)" in text
    assert "70.0%  OpenAIRoutes.asgi (gateway/front/routes/openai.py:92)" in text
    assert "gateway/cli/main.py" not in text.split("gateway functions")[1]
