"""The exact response cache against real processes: a gateway with keys on, Redis, and a fake
engine that counts the requests it runs (per `user`), so a hit is one the engine never saw."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import admin, create_key, start_gateway, usage
from testkit.metrics import metric
from testkit.poll import eventually
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer

DET = {"temperature": 0}
PRICE = {"input": 2.0, "output": 4.0, "cached_input": 1.0}  # per million tokens


@pytest.fixture(scope="module")
def fake(logs_dir: Path) -> Iterator[Proc]:
    proc = fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", "--count", name="fake-cache").start()
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def config(redis: RedisServer, fake: Proc, **cache: Any) -> dict[str, Any]:
    return {
        "health": {"interval": 0.3},
        "redis": {"url": redis.url, "timeout": 1.0},
        "auth": {"enabled": True},
        "cache": {"enabled": False, **cache},
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [
            {"name": "fake", "routes": [{"engine": "fake", "model": "fake"}], "cache": True},
            {"name": "plain", "routes": [{"engine": "fake", "model": "fake"}]},
        ],
        "pricing": {"models": {"fake": PRICE}},
    }


@pytest.fixture
def gw(logs_dir: Path, redis_server: RedisServer, fake: Proc) -> Iterator[Proc]:
    proc = start_gateway(logs_dir, config(redis_server, fake, max_memory=20_000), "gw-cache")
    try:
        yield proc
    finally:
        proc.stop()


def ask(
    gw: Proc,
    secret: str,
    user: str,
    model: str = "fake",
    stream: bool = False,
    headers: dict[str, Any] | None = None,
    **extra: Any,
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi " + user}],
        "user": user,
        "stream": stream,
        **extra,
    }
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {secret}", **(headers or {})},
        timeout=30,
    )


def runs(fake: Proc, user: str) -> int:
    return int(httpx.get(fake.url + "/counts").json().get(user, 0))


def text_of(r: httpx.Response) -> str:
    if r.headers["content-type"].startswith("text/event-stream"):
        import json

        parts = []
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    parts.append(c["delta"].get("content") or "")
        assert r.text.rstrip().endswith("data: [DONE]")
        return "".join(parts)
    return str(r.json()["choices"][0]["message"]["content"])


def wait_stored(check: Any) -> None:
    """The store is written just after the answer: poll, never sleep a fixed time."""
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_repeated_deterministic_request_is_a_hit_whole_and_streamed(gw: Proc, fake: Proc) -> None:
    _, secret = create_key(gw)
    first = ask(gw, secret, "u1", **DET)
    assert first.status_code == 200 and first.headers["x-gateway-cache"] == "miss"
    assert runs(fake, "u1") == 1
    hit = None
    deadline = time.monotonic() + 5
    while hit is None or hit.headers["x-gateway-cache"] != "hit":
        assert time.monotonic() < deadline
        hit = ask(gw, secret, "u1", **DET)
    assert hit.json() == first.json()
    streamed = ask(gw, secret, "u1", stream=True, **DET)  # the stored whole answer, replayed as a stream
    assert streamed.headers["x-gateway-cache"] == "hit" and text_of(streamed) == text_of(first)
    usage = ask(gw, secret, "u1", stream=True, stream_options={"include_usage": True}, **DET)
    assert '"usage":{"prompt_tokens":8' in usage.text
    hits_before = runs(fake, "u1")
    # a stream asked first is stored too, and answers a whole request after
    s1 = ask(gw, secret, "s1", stream=True, seed=7)
    assert s1.headers["x-gateway-cache"] == "miss"
    wait_stored(lambda: ask(gw, secret, "s1", stream=True, seed=7).headers["x-gateway-cache"] == "hit")
    whole = ask(gw, secret, "s1", seed=7)
    assert whole.headers["x-gateway-cache"] == "hit" and whole.json()["choices"][0]["message"]["content"] == text_of(s1)
    assert runs(fake, "s1") == 1 and runs(fake, "u1") == hits_before == 1
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'gateway_cache_requests_total{model="fake",result="hit"}' in metrics
    assert metric(metrics, "gateway_requests_total", engine="cache") >= 1


def test_what_is_never_cached_and_the_header(gw: Proc, fake: Proc) -> None:
    _, secret = create_key(gw)
    for extra in (
        {},
        {"temperature": 0.7},
        {"temperature": 0, "n": 2},
        {"temperature": 0, "tools": [{"type": "function", "function": {"name": "f"}}]},
    ):
        for _ in range(3):
            r = ask(gw, secret, "nd", **extra)
            assert r.status_code == 200 and "x-gateway-cache" not in r.headers
    assert runs(fake, "nd") == 12
    # skip: not consulted; refresh: asks the engine and stores; use: a model with the cache off
    ask(gw, secret, "h", **DET)
    wait_stored(lambda: ask(gw, secret, "h", **DET).headers["x-gateway-cache"] == "hit")
    n = runs(fake, "h")
    assert "x-gateway-cache" not in ask(gw, secret, "h", headers={"x-gateway-cache": "skip"}, **DET).headers
    assert ask(gw, secret, "h", headers={"x-gateway-cache": "refresh"}, **DET).headers["x-gateway-cache"] == "miss"
    assert runs(fake, "h") == n + 2
    assert "x-gateway-cache" not in ask(gw, secret, "p", model="plain", **DET).headers
    ask(gw, secret, "p", model="plain", headers={"x-gateway-cache": "use"}, **DET)
    wait_stored(
        lambda: (
            ask(gw, secret, "p", model="plain", headers={"x-gateway-cache": "use"}, **DET).headers["x-gateway-cache"]
            == "hit"
        )
    )
    for bad in ("yes", "USE please", "hit", b"\xe9\xff", ""):
        r = ask(gw, secret, "bad", headers={"x-gateway-cache": bad}, **DET)
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-gateway-cache", (bad, r.text)


def test_keys_stay_apart_and_a_route_change_or_an_admin_call_invalidates(gw: Proc, fake: Proc) -> None:
    _, a = create_key(gw)
    _, b = create_key(gw)
    ask(gw, a, "k", **DET)
    wait_stored(lambda: ask(gw, a, "k", **DET).headers["x-gateway-cache"] == "hit")
    assert ask(gw, b, "k", **DET).headers["x-gateway-cache"] == "miss"  # another key's answer is not b's
    n = runs(fake, "k")
    routes = {"routes": [{"engine": "fake", "model": "fake", "name": "v2"}]}
    assert admin(gw, "PUT", "/admin/models/fake/routes", routes).status_code == 200
    deadline = time.monotonic() + 10
    while (r := ask(gw, a, "k", **DET)).headers.get("x-gateway-route") != "v2":
        assert time.monotonic() < deadline, dict(r.headers)
    assert runs(fake, "k") == n + 1  # the new version answered, not the cache
    wait_stored(lambda: ask(gw, a, "k", **DET).headers["x-gateway-cache"] == "hit")
    r = admin(gw, "POST", "/admin/cache", {"model": "fake"})
    assert r.status_code == 200 and r.json()["generation"] == 1
    assert ask(gw, a, "k", **DET).headers["x-gateway-cache"] == "miss"
    assert admin(gw, "POST", "/admin/cache", {}).json()["model"] is None
    for bad in ({"model": 3}, {"model": "nope"}, [], {"x": 1}):
        assert admin(gw, "POST", "/admin/cache", bad).status_code in (400, 404)
    assert admin(gw, "GET", "/admin/cache").json()["enabled"] is True


def test_an_invalidation_reaches_the_answers_another_replica_keeps(
    logs_dir: Path, redis_server: RedisServer, fake: Proc
) -> None:
    """Each process keeps the answers it stored or read: after an admin call on replica a, a
    stops serving them at once, b within its sync (about a second)."""
    a = start_gateway(logs_dir, config(redis_server, fake), "gw-cache-a")
    b = start_gateway(logs_dir, config(redis_server, fake), "gw-cache-b")
    try:
        _, secret = create_key(a)
        for user in ("ra", "rb"):
            assert ask(a, secret, user, **DET).headers["x-gateway-cache"] == "miss"
            eventually(lambda: ask(b, secret, user, **DET).headers["x-gateway-cache"], lambda h: h == "hit")  # noqa: B023
            for gw in (a, b, a, b):  # both keep it now
                assert ask(gw, secret, user, **DET).headers["x-gateway-cache"] == "hit"
        n = runs(fake, "rb")
        assert admin(a, "POST", "/admin/cache", {"model": "fake"}).status_code == 200
        assert ask(a, secret, "ra", **DET).headers["x-gateway-cache"] == "miss"
        # "rb" only on b: a new answer that a stored would be a hit there, rightly
        eventually(lambda: ask(b, secret, "rb", **DET).headers["x-gateway-cache"], lambda h: h == "miss", timeout=5)
        assert runs(fake, "rb") == n + 1
    finally:
        a.stop()
        b.stop()


def test_the_memory_bound_holds_under_a_flood(gw: Proc, fake: Proc, redis_server: RedisServer) -> None:
    _, secret = create_key(gw)
    with httpx.Client(timeout=30) as client:
        for i in range(150):
            body = {"model": "fake", "messages": [{"role": "user", "content": f"flood {i}"}], "temperature": 0}
            r = client.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"})
            assert r.headers["x-gateway-cache"] == "miss"
    stats: dict[str, Any] = {}

    def settled() -> bool:
        nonlocal stats
        stats = admin(gw, "GET", "/admin/cache").json()
        return bool(stats["entries"]) and stats["entries"] < 150

    wait_stored(settled)
    with redis_server.client() as r:
        keys = list(r.scan_iter(match="gw:{cache}:e:*", count=1000))
        held = sum(int(r.strlen(k)) + len(k) for k in keys)
        assert int(r.get("gw:{cache}:total") or 0) == held
    assert 0 < held <= 20_000 and stats["bytes"] <= 20_000, (held, stats)
    assert len(keys) == stats["entries"]


def spend_by_route(gw: Proc, key_id: str) -> dict[str | None, dict[str, Any]]:
    r = admin(gw, "GET", f"/admin/spend?group_by=route&key={key_id}")
    assert r.status_code == 200, r.text
    return {row["route"]: row for row in r.json()["data"]}


def nanos(prompt: float, completion: float, cached: float = 0) -> int:
    """Spend in nano-units at PRICE (per million tokens: price * tokens * 1000 nanos)."""
    return round(
        ((prompt - cached) * PRICE["input"] + cached * PRICE["cached_input"] + completion * PRICE["output"]) * 1000
    )


def hits_and_misses(gw: Proc, secret: str, rounds: int) -> tuple[int, int, dict[str, Any], str]:
    """Asks one deterministic question until `rounds` hits came back (streamed and whole in turn);
    returns the hits, the misses, the engine's usage and the route that answered a miss."""
    hits = misses = 0
    seen: dict[str, Any] = {}
    route = ""
    deadline = time.monotonic() + 10
    while hits < rounds:
        assert time.monotonic() < deadline
        r = ask(gw, secret, "spend", stream=hits % 2 == 1, **DET)
        assert r.status_code == 200, r.text
        if r.headers["x-gateway-cache"] == "hit":
            hits += 1
        else:
            misses += 1
            seen, route = r.json()["usage"], r.headers["x-gateway-route"]
    return hits, misses, seen, route


def test_hits_are_counted_as_cached_free_by_default(gw: Proc) -> None:
    key_id, secret = create_key(gw)
    hits, misses, seen, route = hits_and_misses(gw, secret, 3)
    p, c = seen["prompt_tokens"], seen["completion_tokens"]
    rows = spend_by_route(gw, key_id)
    assert set(rows) == {"cache", route}
    cached = rows["cache"]
    assert (cached["requests"], cached["prompt_tokens"], cached["completion_tokens"], cached["spend_nanos"]) == (
        hits,
        0,
        0,
        0,
    )
    engine = rows[route]
    assert (engine["requests"], engine["prompt_tokens"], engine["completion_tokens"]) == (
        misses,
        misses * p,
        misses * c,
    )
    assert engine["spend_nanos"] == misses * nanos(p, c)
    day = usage(gw, key_id)["day"]
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (hits + misses, misses * p, misses * c)


def test_hits_priced_by_the_charge_prompt_at_cached_input(
    logs_dir: Path, redis_server: RedisServer, fake: Proc
) -> None:
    gw = start_gateway(logs_dir, config(redis_server, fake, charge=0.5), "gw-cache-charge")
    try:
        key_id, secret = create_key(gw)
        hits, misses, seen, _ = hits_and_misses(gw, secret, 4)
        p, c = round(seen["prompt_tokens"] * 0.5), round(seen["completion_tokens"] * 0.5)
        cached = spend_by_route(gw, key_id)["cache"]
        assert (cached["requests"], cached["prompt_tokens"], cached["completion_tokens"], cached["cached_tokens"]) == (
            hits,
            hits * p,
            hits * c,
            hits * p,
        )
        assert cached["spend_nanos"] == hits * nanos(p, c, cached=p) > 0
        total = admin(gw, "GET", f"/admin/spend?key={key_id}").json()["total"]
        miss_cost = misses * nanos(seen["prompt_tokens"], seen["completion_tokens"])
        assert total["spend"] == pytest.approx((miss_cost + hits * nanos(p, c, cached=p)) / 1e9)
    finally:
        gw.stop()
