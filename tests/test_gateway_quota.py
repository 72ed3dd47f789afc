"""API keys, quotas and the admin API end to end: two gateway replicas sharing a private Redis,
a real tiny engine and a fast fake engine behind them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import ADMIN_KEY, admin, chat, create_key, start_gateway
from testkit.poll import eventually
from testkit.procs import TINY_MODEL, Proc
from testkit.redis_server import RedisServer

TINY = "tiny-llama"


def config(redis: RedisServer, tiny: Proc, fake_engine: Proc, failure_mode: str = "closed") -> dict[str, Any]:
    return {
        "health": {"interval": 0.3},
        "redis": {"url": redis.url, "failure_mode": failure_mode, "timeout": 1.0},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "engines": [
            {"name": "tiny", "kind": "openai", "url": tiny.url},
            {"name": "fake", "kind": "openai", "url": fake_engine.url},
        ],
        "models": [
            {"name": TINY, "routes": [{"engine": "tiny", "model": TINY}], "tokenizer": str(TINY_MODEL)},
            {"name": "fake", "routes": [{"engine": "fake", "model": "fake"}]},
        ],
    }


@pytest.fixture(scope="module")
def replicas(
    logs_dir: Path, redis_session: RedisServer, tiny_worker: Proc, fake_engine: Proc
) -> Iterator[tuple[Proc, Proc]]:
    cfg = config(redis_session.up(), tiny_worker, fake_engine)
    a = start_gateway(logs_dir, cfg, "replica-a")
    b = start_gateway(logs_dir, cfg, "replica-b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def gws(replicas: tuple[Proc, Proc], redis_server: RedisServer) -> tuple[Proc, Proc]:
    """Both replicas, over a running and empty Redis."""
    return replicas


def test_keys_are_required_and_checked(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    r = chat(a, None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(a.url + "/v1/chat/completions", json={}, headers={"authorization": "Basic abc"})
    assert r.status_code == 401
    r = chat(a, "sk-gw-not-a-real-key")
    assert r.status_code == 401 and "sk-gw-not" not in r.text
    key_id, secret = create_key(a, models=["fake"])
    assert chat(a, secret).status_code == 200
    denied = chat(a, secret, model=TINY, max_tokens=2)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    models = httpx.get(a.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}).json()
    assert [m["id"] for m in models["data"]] == ["fake"]
    _, expired = create_key(a, expires_at=int(time.time()) + 1)
    eventually(lambda: chat(a, expired).status_code, lambda status: status == 401, timeout=15, what="key expired")
    assert admin(a, "DELETE", f"/admin/keys/{key_id}").json()["revoked"] is True
    assert chat(a, secret).status_code == 401
    # The admin key is not a client key (not configured to be).
    assert chat(a, ADMIN_KEY).status_code == 401


def test_admin_api_authorisation_and_validation(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    _, secret = create_key(a)
    assert admin(a, "GET", "/admin/keys", key=secret).status_code == 403
    assert httpx.get(a.url + "/admin/keys").status_code == 401
    for body, param in [
        ({"name": "x", "rpm": -1}, "rpm"),
        ({"name": "x", "tpm": "many"}, "tpm"),
        ({"name": "x", "max_concurrent": True}, "max_concurrent"),
        ({"rpm": 5}, "name"),
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "x", "expires_at": "next tuesday"}, "expires_at"),
        ({"name": "x", "models": "fake"}, "models"),
    ]:
        r = admin(a, "POST", "/admin/keys", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert admin(a, "GET", "/admin/keys/key_0000000000000000").status_code == 404
    assert admin(a, "PATCH", "/admin/keys/key_0000000000000000", {"rpm": 3}).status_code == 404
    r = httpx.post(a.url + "/admin/keys", content=b"{not json", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400
    listed = admin(a, "GET", "/admin/keys").json()["data"]
    assert listed and all("key" not in k and secret not in json.dumps(k) for k in listed)


def test_rpm_hit_exactly_with_headers(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    _, secret = create_key(a, rpm=5, tpm=100000)
    remaining = []
    for _ in range(5):
        r = chat(a, secret)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert r.headers["x-ratelimit-reset-requests"] and r.headers["x-ratelimit-remaining-tokens"]
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [4, 3, 2, 1, 0]
    r = chat(a, secret)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rpm_exceeded" and r.json()["error"]["type"] == "rate_limit_exceeded"


def test_limits_hold_across_replicas(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    _, secret = create_key(a, rpm=6)
    # rpm counts per calendar minute: ten requests that cross into the next minute get a fresh window
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    statuses = [chat(gw, secret).status_code for gw in (a, b) * 5]
    assert statuses.count(200) == 6 and statuses.count(429) == 4


def test_revoke_and_patch_take_effect_at_once_on_other_replica(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    key_id, secret = create_key(a, rpm=1)
    assert chat(b, secret).status_code == 200
    assert chat(b, secret).status_code == 429
    assert admin(a, "PATCH", f"/admin/keys/{key_id}", {"rpm": 3}).json()["rpm"] == 3
    assert chat(b, secret).status_code == 200
    admin(a, "DELETE", f"/admin/keys/{key_id}")
    assert chat(b, secret).status_code == 401


def test_daily_budget_never_overspent_by_concurrent_requests(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    budget = 300
    key_id, secret = create_key(a, daily_tokens=budget)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers={"authorization": f"Bearer {secret}"}) as c:
            body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True}
            return await asyncio.gather(*(c.post(gw.url + "/v1/chat/completions", json=body) for gw in (a, b) * 25))

    responses = asyncio.run(run())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 50 and ok and refused
    assert all(r.json()["error"]["type"] == "insufficient_quota" for r in refused)
    spent = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert spent <= budget
    usage = admin(a, "GET", f"/admin/keys/{key_id}/usage").json()
    assert usage["day"]["prompt_tokens"] + usage["day"]["completion_tokens"] == spent


def test_usage_equals_what_clients_were_told(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    key_id, secret = create_key(a, tpm=100000, daily_tokens=100000)
    prompt = completion = 0
    for gw in (a, b):
        r = chat(gw, secret, model=TINY, max_tokens=5)
        prompt += r.json()["usage"]["prompt_tokens"]
        completion += r.json()["usage"]["completion_tokens"]
        body = {
            "model": TINY,
            "prompt": "The license",
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream(
            "POST", gw.url + "/v1/completions", json=body, timeout=30, headers={"authorization": f"Bearer {secret}"}
        ) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        usage = json.loads(events[-2])["usage"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    usage = admin(a, "GET", f"/admin/keys/{key_id}/usage").json()
    assert usage["day"]["requests"] == 4 and usage["month"]["requests"] == 4
    assert (usage["day"]["prompt_tokens"], usage["day"]["completion_tokens"]) == (prompt, completion)
    assert usage["month"]["prompt_tokens"] == prompt
    assert usage["minute"]["tokens"] == prompt + completion


def test_aborted_stream_frees_its_slot(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    key_id, secret = create_key(a, max_concurrent=1)
    body = {"model": TINY, "prompt": "Once", "max_tokens": 500, "stream": True, "ignore_eos": True}
    auth = {"authorization": f"Bearer {secret}"}
    with httpx.stream("POST", a.url + "/v1/completions", json=body, headers=auth, timeout=30) as s:
        lines = s.iter_lines()  # keep the iterator: dropping it closes the connection
        assert s.status_code == 200 and next(lines).startswith("data: {")
        busy = chat(a, secret)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "concurrency_exceeded"
    deadline = time.monotonic() + 3
    while chat(a, secret).status_code != 200:
        assert time.monotonic() < deadline, "the aborted stream kept its concurrency slot"
        time.sleep(0.05)
    usage = admin(a, "GET", f"/admin/keys/{key_id}/usage").json()
    assert usage["day"]["completion_tokens"] >= 1  # the aborted stream was charged what it relayed


def test_routes_changed_on_one_replica_apply_on_the_other(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    _, secret = create_key(a)
    assert chat(b, secret).json()["model"] == "fake"
    r = admin(a, "PUT", "/admin/models/fake/routes", {"routes": [{"engine": "tiny", "model": TINY, "weight": 1}]})
    assert r.status_code == 200 and r.json()["overridden"] is True
    deadline = time.monotonic() + 3
    while chat(b, secret, max_tokens=2).json()["model"] != TINY:
        assert time.monotonic() < deadline, "replica b never saw the new route"
        time.sleep(0.05)
    assert admin(b, "GET", "/admin/models/fake").json()["routes"][0]["engines"] == ["tiny"]
    bad = admin(a, "PUT", "/admin/models/fake/routes", {"routes": [{"engine": "nope"}]})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    assert admin(a, "DELETE", "/admin/models/fake/routes").json()["overridden"] is False
    deadline = time.monotonic() + 3
    while chat(b, secret).json()["model"] != "fake":
        assert time.monotonic() < deadline, "replica b never rolled back"
        time.sleep(0.05)


def test_keys_cli(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gateway.cli.main", "keys", "--url", a.url, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)

    created = cli("create", "--name", "from-cli", "--rpm", "7", "--models", "fake")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["rpm"] == 7 and key["models"] == ["fake"]
    assert chat(a, key["key"]).status_code == 200
    assert key["id"] in cli("list").stdout
    assert cli("revoke", key["id"]).returncode == 0
    assert chat(a, key["key"]).status_code == 401
    bad = cli("create", "--name", "x", "--rpm", "-3")
    assert bad.returncode == 1 and "rpm" in bad.stderr


# ---- Redis going away --------------------------------------------------------------------------


def test_redis_down_fail_closed_then_recovers(gws: tuple[Proc, Proc], redis_server: RedisServer) -> None:
    a, _ = gws
    _, secret = create_key(a, rpm=1000)
    assert chat(a, secret).status_code == 200
    redis_server.kill()
    started = time.monotonic()
    r = chat(a, secret)
    assert time.monotonic() - started < 2.0
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "quota_unavailable"
    for method, path in [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/keys/key_0000000000000000")]:
        r = admin(a, method, path, {"name": "x"} if method == "POST" else None)  # 503s, not 500s, for the console
        assert r.status_code == 503 and r.json()["error"]["code"] == "quota_unavailable", (path, r.text)
        assert r.headers["retry-after"] == "1"
    redis_server.start()  # an empty Redis (it keeps nothing on disk)
    deadline = time.monotonic() + 10
    while True:
        r = admin(a, "POST", "/admin/keys", {"name": "after"})
        if r.status_code == 201:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    new_secret = r.json()["key"]
    deadline = time.monotonic() + 5
    while chat(a, new_secret).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_redis_down_fail_open_uses_local_limits(
    logs_dir: Path, redis_server: RedisServer, tiny_worker: Proc, fake_engine: Proc
) -> None:
    gw = start_gateway(logs_dir, config(redis_server, tiny_worker, fake_engine, failure_mode="open"), "fail-open")
    try:
        _, secret = create_key(gw, rpm=3)
        assert chat(gw, secret).status_code == 200  # the key is now known to this replica
        redis_server.kill()
        statuses = [chat(gw, secret).status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429]  # a fresh local window
        metrics = httpx.get(gw.url + "/metrics").text
        assert "gateway_quota_fail_open_total 3.0" in metrics
        redis_server.start()
        deadline = time.monotonic() + 10
        while admin(gw, "POST", "/admin/keys", {"name": "back"}).status_code != 201:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        gw.stop()


def test_usage_history_and_engines_for_the_console(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    key_id, secret = create_key(a)
    assert chat(a, secret).status_code == 200 and chat(a, secret).status_code == 200
    plain = admin(a, "GET", f"/admin/keys/{key_id}/usage").json()
    assert "history" not in plain  # without ?days the answer is as before
    usage = admin(a, "GET", f"/admin/keys/{key_id}/usage?days=7").json()
    history = usage["history"]
    assert len(history) == 7 and history[-1]["date"] == usage["day"]["date"]
    assert [d["date"] for d in history] == sorted(d["date"] for d in history)
    today = {k: usage["day"][k] for k in ("requests", "prompt_tokens", "completion_tokens", "tokens", "spend")}
    assert history[-1] == {"date": usage["day"]["date"], **today} and today["requests"] == 2
    assert all(d["requests"] == 0 for d in history[:-1])
    assert len(admin(a, "GET", f"/admin/keys/{key_id}/usage?days=40").json()["history"]) == 40
    for bad in ("0", "41", "-1", "two", ""):
        r = admin(a, "GET", f"/admin/keys/{key_id}/usage?days={bad}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "days", (bad, r.text)

    engines = admin(a, "GET", "/admin/engines").json()
    assert engines["object"] == "list"
    assert [(e["name"], e["kind"], e["healthy"]) for e in engines["data"]] == [
        ("tiny", "openai", True),
        ("fake", "openai", True),
    ]
    for engine in engines["data"]:
        assert set(engine) == {
            *("name", "kind", "url", "healthy", "health_check", "breaker"),
            *("outstanding", "waiting", "running", "kv_usage"),
        }
        assert engine["breaker"]["state"] == "closed" and engine["health_check"] is True
        assert engine["outstanding"] == 0 and engine["waiting"] >= 0 and 0 <= engine["kv_usage"] <= 1
    assert engines["data"][0]["url"].startswith("http://127.0.0.1:")
    assert admin(a, "GET", "/admin/engines", key=secret).status_code == 403
    assert httpx.get(a.url + "/admin/engines").status_code == 401
