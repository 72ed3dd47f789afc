"""Redis that stops answering, and a gateway that is merely slow (issue 20), on real processes: a
gateway with keys on over a private redis-server, a fast fake engine.

- While Redis is stalled (SIGSTOP), every admin call answers within `redis.timeout` plus a small
  margin: 503 `quota_unavailable` for what needs Redis, the rest as usual.
- With Redis healthy but both cores saturated by other processes (CPU hogs), no request is
  answered 503 `quota_unavailable`: the gateway's own lag is not a Redis outage.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import admin, create_key, start_gateway
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer, private_redis

REDIS_TIMEOUT = 0.5
MARGIN = 0.75
REQUESTS = 300  # scheduling on a loaded 2-core machine, the HTTP round trip


@pytest.fixture(scope="module")
def redis(logs_dir: Path) -> Iterator[RedisServer]:
    with private_redis(logs_dir / "stalls-redis") as server:
        yield server


@pytest.fixture(scope="module")
def gw(logs_dir: Path, redis: RedisServer) -> Iterator[Proc]:
    engine = fake_upstream(logs_dir, "--model", "fake", "--chunks", "2", name="stalls-engine").start()
    engine.wait_healthy()
    data = logs_dir / "stalls-store"
    data.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {
        "redis": {"url": redis.url, "timeout": REDIS_TIMEOUT},
        "auth": {"enabled": True, "default_max_tokens": 8},
        "store": {"url": "sqlite:///stalls.db", "data_dir": str(data)},
        "engines": [{"name": "fake", "kind": "openai", "url": engine.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
    }
    proc = start_gateway(logs_dir, cfg, "stalls")
    try:
        yield proc
    finally:
        proc.stop()
        engine.stop()


def test_admin_calls_are_bounded_while_redis_is_stalled(gw: Proc, redis: RedisServer) -> None:
    key_id, _ = create_key(gw)
    calls: list[tuple[str, str, Any]] = [
        ("GET", f"/admin/keys/{key_id}/usage", None),
        ("GET", f"/admin/keys/{key_id}/usage?days=3", None),
        ("GET", f"/admin/keys/{key_id}", None),
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"name": "n"}),
        ("PATCH", f"/admin/keys/{key_id}", {"rpm": 5}),
        ("DELETE", f"/admin/keys/{key_id}", None),
        ("PUT", "/admin/models/fake/routes", {"routes": [{"engine": "fake"}]}),
        ("DELETE", "/admin/models/fake/routes", None),
        ("GET", "/admin/models", None),
        ("GET", "/admin/models/fake", None),
        ("GET", "/admin/engines", None),
        ("GET", "/admin/batches", None),
        ("GET", "/admin/requests", None),
        ("GET", "/admin/models/fake/report", None),
    ]
    assert redis.proc is not None
    redis.proc.send_signal(signal.SIGSTOP)
    took = {}
    try:
        for _ in range(2):  # the first call of each finds the connection stalled, the second a new one
            for method, path, body in calls:
                start = time.monotonic()
                r = admin(gw, method, path, body)
                took[f"{method} {path}"] = elapsed = time.monotonic() - start
                assert r.status_code in (200, 503), (path, r.status_code, r.text)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "quota_unavailable", (path, r.text)
                assert elapsed < REDIS_TIMEOUT + MARGIN, (method, path, elapsed)
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    print("slowest admin calls while Redis was stalled:", sorted(took.items(), key=lambda t: -t[1])[:4])
    deadline = time.monotonic() + 10  # and back to normal once Redis answers again
    while admin(gw, "GET", f"/admin/keys/{key_id}").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _hog(stop: Any) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def test_own_lag_is_not_a_redis_outage(gw: Proc) -> None:
    """CPU hogs on both cores (two busy loops per core) while a healthy Redis serves the gateway;
    a few hundred requests from many connections, the fuzz's mix (big bodies and small, streams,
    admin reads of the key's usage): not one 503."""
    key_id, secret = create_key(gw, tpm=10**9, daily_tokens=10**12)  # counted: the quota script runs
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    hogs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(2 * (os.cpu_count() or 2))]
    for hog in hogs:
        hog.start()
    statuses: dict[int, int] = {}
    unavailable: list[str] = []
    big = "word " * 3000
    auth = {"authorization": f"Bearer {secret}"}

    def one(i: int) -> None:
        if i % 8 == 0:
            r = admin(gw, "GET", f"/admin/keys/{key_id}/usage")
        else:
            content = big if i % 4 == 1 else "hi"
            body = {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": i % 2 == 0}
            r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            unavailable.append(r.text[:200])

    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(one, range(REQUESTS)))
    finally:
        stop.set()
        for hog in hogs:
            hog.join(5)
            if hog.is_alive():
                hog.kill()
    print("statuses with both cores hogged:", statuses)
    assert unavailable == [], statuses
    assert statuses == {200: REQUESTS}
