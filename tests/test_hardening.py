"""Each finding of the hostile probe of the gateway, reproduced on real processes: a gateway with
keys on, a private Redis, fast fake engines and a real tiny engine with a two-place queue."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.core.errors import GatewayError
from gateway.core.request import MAX_DEPTH, check_depth
from testkit.keyed import admin, chat, create_key, keyed_gateway, usage
from testkit.metrics import metric
from testkit.procs import TINY_MODEL, Proc, all_healthy, fake_upstream, worker
from testkit.redis_server import RedisServer


@pytest.fixture(scope="module")
def engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        "fake": fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", name="fake-h"),
        "paced": fake_upstream(logs_dir, "--model", "paced", "--chunks", "60", "--pace-ms", "50", name="paced-h"),
        "small": worker(logs_dir, "--model", str(TINY_MODEL), "--max-waiting", "2", name="small-h"),
    }
    with all_healthy(procs):
        yield procs


@pytest.fixture(scope="module")
def gw(logs_dir: Path, redis_session: RedisServer, engines: dict[str, Proc]) -> Iterator[Proc]:
    cfg: dict[str, Any] = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.url, "timeout": 0.25},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "engines": [{"name": n, "kind": "openai", "url": p.url} for n, p in engines.items()],
        "models": [
            {"name": "fake", "routes": [{"engine": "fake"}]},
            {"name": "paced", "routes": [{"engine": "paced"}]},
            {"name": "small", "routes": [{"engine": "small", "model": "tiny-llama"}]},
            {"name": "counted", "routes": [{"engine": "fake", "model": "fake"}], "tokenizer": str(TINY_MODEL)},
            {"name": "bounded", "routes": [{"engine": "fake", "model": "fake"}], "max_prompt_bytes": 1000},
        ],
    }
    with keyed_gateway(logs_dir, cfg, "hardened") as proc:
        yield proc


@pytest.fixture
def gwr(gw: Proc, redis_server: RedisServer) -> Proc:
    """The gateway over a running, empty Redis."""
    return gw


def post(gw: Proc, path: str, secret: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers={"authorization": f"Bearer {secret}"}, timeout=30)


# 1, 2: what a request may reserve is bounded; negative or zero counts are refused.
@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"max_tokens": 10**17}, "max_tokens"),
        ("/v1/completions", {"n": 10**17}, "n"),
        ("/v1/completions", {"n": -1}, "n"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"max_completion_tokens": 10**17}, "max_completion_tokens"),
        ("/v1/embeddings", {"max_tokens": 10**17}, "max_tokens"),
    ],
)
def test_reservations_are_bounded(gwr: Proc, path: str, extra: dict[str, Any], param: str) -> None:
    _, secret = create_key(gwr)  # no token limits: nothing else would stop it
    field = {"/v1/completions": "prompt", "/v1/embeddings": "input"}.get(path)
    body = {"model": "fake", **extra, **({field: "The"} if field else {"messages": [{"role": "user", "content": "x"}]})}
    r = post(gwr, path, secret, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# Found by the fuzz suite: a body nested deeper than the gateway can write again for the engine
# (orjson reads 1024 levels, writes 254) was a 500; any body nested past 128 levels is a 400.
@pytest.mark.parametrize("depth", [200, 300, 1000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_deeply_nested_bodies_are_a_400(gwr: Proc, path: str, depth: int) -> None:
    _, secret = create_key(gwr)
    deep = b"[" * depth + b"]" * depth
    field = {"/v1/chat/completions": b'"messages": [{"role": "user", "content": "x", "extra": ' + deep + b"}]"}
    raw = b'{"model": "fake", ' + field.get(path, b'"input": "x", "prompt": "x", "extra": ' + deep) + b"}"
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    r = httpx.post(gwr.url + path, content=raw, headers=headers, timeout=30)
    assert r.status_code == 400 and "nests deeper than 128" in r.json()["error"]["message"], r.text
    # Brackets inside strings, or many side by side, are not nesting.
    flat = {"model": "fake", "prompt": "[" * 500, "input": "{" * 500, "extra": [[1]] * 300}
    assert post(gwr, path, secret, flat | {"messages": [{"role": "user", "content": "[{" * 300}]}).status_code == 200


# Found by the fuzz suite: a path with a trailing slash got a bodiless 307 whose Location was built
# from the client's Host header (Starlette's slash redirect); it is an unknown route, a 404.
def test_a_trailing_slash_is_a_404_not_a_redirect(gwr: Proc) -> None:
    _, secret = create_key(gwr)
    headers = {"authorization": f"Bearer {secret}", "host": "elsewhere.example"}
    with httpx.Client(timeout=10) as c:
        for method, path in [("GET", "/v1/models/"), ("POST", "/v1/chat/completions/"), ("GET", "/admin/keys/")]:
            r = c.request(method, gwr.url + path, headers=headers, json={})
            assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found", (path, r.text)
            assert "location" not in r.headers
        console = c.get(gwr.url + "/ui")  # the console's own redirect stays, and stays relative
        assert console.status_code == 308 and console.headers["location"] == "ui/"


def test_the_depth_bound_is_exact() -> None:
    def nested(depth: int) -> bytes:
        return b'{"a": ' * (depth - 1) + b"[1]" + b"}" * (depth - 1)

    for depth in (MAX_DEPTH, MAX_DEPTH + 1):
        raw = nested(depth)
        if depth > MAX_DEPTH:
            with pytest.raises(GatewayError):
                check_depth(raw, orjson.loads(raw))
        else:
            check_depth(raw, orjson.loads(raw))
    wide = b"[" + b",".join([b"[]"] * 100_000) + b"]"  # many brackets, two levels: not refused
    check_depth(wide, orjson.loads(wide))


# 3, 4, 5, 17: nothing Redis cannot hold, or that would break the admin API for everyone, is stored.
BAD_ADMIN = [
    ("POST", "/admin/keys", b'{"name": "m", "metadata": {"a": "\\udfff"}}'),
    ("POST", "/admin/keys", b'{"name": "\\udfff"}'),
    ("POST", "/admin/keys", b'{"name": "m", "models": ["\\ud800"]}'),
    ("POST", "/admin/keys", b'{"name": "m", "metadata": ' + b'{"a": ' * 1100 + b"1" + b"}" * 1101),
    ("POST", "/admin/keys", b'{"name": "m", "metadata": ' + b'{"a": ' * 300 + b"1" + b"}" * 301),  # fuzz
    ("POST", "/admin/keys", b'{"name": "m", "expires_at": 1' + b"0" * 400 + b"}"),
    ("POST", "/admin/keys", b'{"name": "m", "models": ["nope-model"]}'),
    ("PUT", "/admin/models/fake/routes", b'{"routes": [{"engine": "fake", "weight": NaN}]}'),
    ("PUT", "/admin/models/fake/routes", b'{"routes": [{"engine": "fake", "weight": Infinity}]}'),
    ("PUT", "/admin/models/fake/routes", b'{"routes": [{"engine": "fake", "weight": 1e999}]}'),
    ("PUT", "/admin/models/fake/routes", b'{"routes": [{"engine": "fake", "weight": 1' + b"0" * 400 + b"}]}"),
    ("PUT", "/admin/models/fake/routes", b'{"routes": [{"engine": "fake", "weight": 1e12}]}'),
    ("PUT", "/admin/models/fake/routes", b'{"routes": [{"engine": "fake", "name": "\\udfff"}]}'),
    ("PUT", "/admin/models/fake/routes", b'{"routes": ' + b"[" * 1100 + b"]" * 1100 + b"}"),
    (
        "PUT",
        "/admin/models/fake/routes",
        b'{"routes": [{"engine": "fake", "weight": ' + b"[" * 1000 + b"]" * 1000 + b"}]}",
    ),
]


@pytest.mark.parametrize(("method", "path", "raw"), BAD_ADMIN)
def test_admin_refuses_what_it_cannot_store(gwr: Proc, method: str, path: str, raw: bytes) -> None:
    r = admin(gwr, method, path, content=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    key_id, _ = create_key(gwr)
    patch = raw if path == "/admin/keys" else b'{"metadata": {"a": "\\udfff"}}'
    assert admin(gwr, "PATCH", f"/admin/keys/{key_id}", content=patch).status_code == 400
    assert admin(gwr, "GET", "/admin/keys").status_code == 200  # the key list stays readable
    assert admin(gwr, "GET", "/admin/models").status_code == 200
    assert [k["name"] for k in admin(gwr, "GET", "/admin/keys").json()["data"]] == ["test"]


# 6: a client that hangs up while sending its body is not an error.
def test_hanging_up_mid_body_is_not_an_error(gwr: Proc) -> None:
    log = Path(gwr.log_path)
    before = log.read_text(errors="replace")
    _, secret = create_key(gwr)
    for path in ("/v1/chat/completions", "/admin/keys"):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", gwr.port)) as s:
                head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                head += f"authorization: Bearer {secret}\r\ncontent-length: 1000\r\n\r\n"
                s.sendall(head.encode() + b'{"model": "fa')
    # The barrier: the gateway has one process, whose event loop saw the 40 hang-ups before the
    # connection of this request opened, so it has handled them when this answer comes back.
    assert chat(gwr, secret).status_code == 200
    added = log.read_text(errors="replace")[len(before) :]
    assert "Traceback" not in added and " ERROR " not in added, added[-2000:]


# 9: an aborted stream is charged its prompt even when the key has no token limits.
def test_aborted_stream_charges_its_prompt(gwr: Proc) -> None:
    key_id, secret = create_key(gwr)
    body = {"model": "paced", "prompt": "Once upon a time", "stream": True}
    headers = {"authorization": f"Bearer {secret}"}
    with httpx.Client(timeout=30) as c, c.stream("POST", gwr.url + "/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 5
    while (day := usage(gwr, key_id)["day"])["completion_tokens"] == 0:
        assert time.monotonic() < deadline, day
        time.sleep(0.1)
    assert day["prompt_tokens"] > 0 and 0 < day["completion_tokens"] < 60, day


# 10: the admin API answers 503, not 500, while Redis is down.
def test_admin_answers_503_while_redis_is_down(gwr: Proc, redis_server: RedisServer) -> None:
    key_id, _ = create_key(gwr)
    redis_server.kill()
    try:
        for method, path, body in [
            ("GET", f"/admin/keys/{key_id}/usage", None),
            ("GET", f"/admin/keys/{key_id}", None),
            ("GET", "/admin/keys", None),
            ("POST", "/admin/keys", {"name": "n"}),
            ("PATCH", f"/admin/keys/{key_id}", {"rpm": 5}),
            ("DELETE", f"/admin/keys/{key_id}", None),
            ("PUT", "/admin/models/fake/routes", {"routes": [{"engine": "fake"}]}),
        ]:
            r = admin(gwr, method, path, body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "quota_unavailable", (path, r.text)
            assert r.headers["retry-after"]
    finally:
        redis_server.start()


# 11: requests refused during a Redis stall charge nothing and hold no lease once it resumes.
def test_a_redis_stall_leaks_nothing(gwr: Proc, redis_server: RedisServer) -> None:
    budget_id, budget = create_key(gwr, daily_tokens=100_000)
    pair_id, pair = create_key(gwr, max_concurrent=2)
    assert chat(gwr, budget).status_code == 200 and chat(gwr, pair).status_code == 200  # known keys now
    used = {k: usage(gwr, k)["day"] for k in (budget_id, pair_id)}
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as c:
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
            calls = [
                c.post(gwr.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {s}"})
                for s in (budget, pair) * 10
            ]
            return [r.status_code for r in await asyncio.gather(*calls)]

    try:
        statuses = asyncio.run(burst())
        time.sleep(2.0)  # the stall outlasts every deadline
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert set(statuses) == {503}, statuses
    deadline = time.monotonic() + 10
    while {k: usage(gwr, k)["day"] for k in used} != used:
        if time.monotonic() > deadline:
            with redis_server.client() as client:
                dump = {n: client.type(n) for n in client.keys(f"gw:{{{pair_id}}}:*")}
                dump["leases"] = client.zrange(f"gw:{{{pair_id}}}:leases", 0, -1, withscores=True)
            raise AssertionError(([usage(gwr, k)["day"] for k in used], list(used.values()), dump))
        time.sleep(0.2)
    with redis_server.client() as client:
        assert client.zcard(f"gw:{{{pair_id}}}:leases") == 0
    assert [chat(gwr, pair).status_code for _ in range(3)] == [200, 200, 200]


# 13: a burst with a key this replica has not seen yet is not a Redis outage.
def test_a_burst_with_an_unseen_key_is_served(gwr: Proc) -> None:
    _, secret = create_key(gwr)

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
            headers = {"authorization": f"Bearer {secret}"}
            calls = [c.post(gwr.url + "/v1/chat/completions", json=body, headers=headers) for _ in range(300)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 300, sorted(set(statuses))


# 14: an engine that cannot take a stream says so before the first byte; the client gets a 429.
def test_an_overloaded_engine_is_a_429_not_a_broken_stream(gwr: Proc) -> None:
    _, secret = create_key(gwr)
    body = {"model": "small", "prompt": "Once upon", "max_tokens": 24, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {secret}"}

    async def one(c: httpx.AsyncClient) -> tuple[int, str, str | None]:
        async with c.stream("POST", gwr.url + "/v1/completions", json=body, headers=headers) as r:
            return r.status_code, (await r.aread()).decode(), r.headers.get("retry-after")

    async def flood() -> list[tuple[int, str, str | None]]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c) for _ in range(16)))

    before = httpx.get(gwr.url + "/metrics").text
    results = asyncio.run(flood())
    statuses = [s for s, _, _ in results]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    for status, text, retry in results:
        if status == 200:
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-300:]
        else:
            assert status == 429 and retry and "engines_overloaded" in text, (status, text)
    after = httpx.get(gwr.url + "/metrics").text
    label = {"api": "completions", "engine": "small", "model": "small", "route": "v1", "status": "429"}
    assert metric(after, "gateway_requests_total", **label) - metric(
        before, "gateway_requests_total", **label
    ) == statuses.count(429)


# 15: counting big prompts does not stall the gateway; a model may bound its prompt size.
def test_big_prompts_are_counted_off_the_event_loop(gwr: Proc) -> None:
    _, secret = create_key(gwr, tpm=10**12)  # token-limited: every prompt is counted
    assert post(gwr, "/v1/completions", secret, {"model": "bounded", "prompt": "x" * 2000}).status_code == 413
    big = {"model": "counted", "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 300_000}]}

    async def run() -> tuple[list[int], float]:
        async with httpx.AsyncClient(timeout=120) as c:
            headers = {"authorization": f"Bearer {secret}"}
            calls = [asyncio.create_task(c.post(gwr.url + "/v1/chat/completions", json=big, headers=headers))]
            calls.append(asyncio.create_task(c.post(gwr.url + "/v1/chat/completions", json=big, headers=headers)))
            worst = 0.0
            while not all(t.done() for t in calls):
                started = time.perf_counter()
                assert (await c.get(gwr.url + "/health")).status_code == 200
                worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.05)
            return [t.result().status_code for t in calls], worst

    statuses, worst = asyncio.run(run())
    assert statuses == [200, 200]
    # Counted on the loop, these prompts stalled it for about 9 s; off it, a health check waits at
    # most for the body's JSON parse, and on two shared busy cores for its turn on a core.
    assert worst < 3.0, f"the event loop stalled for {worst:.2f}s"


# 16: a request that could never fit the key's limits is a 400 naming why, not a 429 to retry.
def test_a_request_that_can_never_fit_is_a_400(gwr: Proc) -> None:
    _, secret = create_key(gwr, tpm=100)
    r = chat(gwr, secret, max_tokens=500)
    assert r.status_code == 400 and "tpm limit of 100" in r.json()["error"]["message"], r.text
    assert chat(gwr, secret, max_tokens=20).status_code == 200
