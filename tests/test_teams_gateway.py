"""Teams, spend and the audit log end to end: two gateway replicas sharing a private Redis and one
store, a fast fake engine (8 prompt tokens, 4 completion tokens per request) behind them."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.keyed import ADMIN_KEY, admin, start_gateway
from testkit.poll import eventually
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer

PRICES = {"input": 1000.0, "output": 2000.0, "cached_input": 500.0}  # per million tokens: easy sums


def config(redis: RedisServer, fake: Proc, store: Path) -> dict[str, Any]:
    return {
        "health": {"interval": 0.3},
        "redis": {"url": redis.url, "timeout": 1.0},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "store": {"url": f"sqlite:///{store}"},
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [
            {"name": "fake", "routes": [{"engine": "fake", "model": "fake"}]},
            {"name": "fake-b", "routes": [{"engine": "fake", "model": "fake"}]},
        ],
        "pricing": {"currency": "EUR", "models": {"fake": PRICES, "fake-b": {"input": 3.0, "output": 7.5}}},
    }


@pytest.fixture(scope="module")
def replicas(logs_dir: Path, redis_session: RedisServer) -> Iterator[tuple[Proc, Proc]]:
    fake = fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", name="fake-teams").start().wait_healthy()
    cfg = config(redis_session.up(), fake, logs_dir / "teams-store.db")
    a = start_gateway(logs_dir, cfg, "teams-a")
    b = start_gateway(logs_dir, cfg, "teams-b")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
        fake.stop()


@pytest.fixture
def gws(replicas: tuple[Proc, Proc], redis_server: RedisServer) -> tuple[Proc, Proc]:
    return replicas


def make(gw: Proc, path: str, **fields: Any) -> dict[str, Any]:
    r = admin(gw, "POST", path, {"name": "t", **fields})
    assert r.status_code == 201, r.text
    return dict(r.json())


def cost(usage: dict[str, Any], price: dict[str, float]) -> float:
    return (usage["prompt_tokens"] * price["input"] + usage["completion_tokens"] * price["output"]) / 1e6


async def fire(gws: tuple[Proc, ...], secrets: list[str], n: int, model: str = "fake") -> list[httpx.Response]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
    async with httpx.AsyncClient(timeout=60) as c:
        return await asyncio.gather(
            *(
                c.post(
                    gws[i % len(gws)].url + "/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {secrets[i % len(secrets)]}"},
                )
                for i in range(n)
            )
        )


def test_team_rpm_holds_over_its_keys_and_two_replicas(gws: tuple[Proc, Proc]) -> None:
    a, _b = gws
    team = make(a, "/admin/teams", rpm=15)
    secrets = [make(a, "/admin/keys", team=team["id"])["key"] for _ in range(4)]
    start = time.time()
    responses = asyncio.run(fire(gws, secrets, 40))
    same_minute = int(start // 60) == int(time.time() // 60)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 40
    assert {r.json()["error"]["code"] for r in refused} == {"team_rpm_exceeded"}
    assert len(ok) <= 15 * (1 if same_minute else 2)
    if same_minute:
        assert len(ok) == 15


def test_team_money_budget_never_overspent_by_concurrent_first_requests(gws: tuple[Proc, Proc]) -> None:
    a, _b = gws
    team = make(a, "/admin/teams", daily_budget=0.5)
    secrets = [make(a, "/admin/keys", team=team["id"])["key"] for _ in range(4)]
    responses = asyncio.run(fire(gws, secrets, 60))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 60
    errors = [r.json()["error"] for r in refused]
    assert {e["code"] for e in errors} == {"team_budget_exceeded"}
    assert all(e["type"] == "insufficient_quota" and "resets at" in e["message"] for e in errors)
    spent = sum(cost(r.json()["usage"], PRICES) for r in ok)
    assert spent <= 0.5
    # A usage read asks the replicas for their leased slices back and waits up to leases.wait for
    # them; a replica that answers later (two busy cores) returns its slice within leases.idle:
    # the read is exact once it has.
    usage = eventually(
        lambda: admin(a, "GET", f"/admin/teams/{team['id']}/usage").json(),
        lambda u: u["day"]["spend"] == pytest.approx(spent, abs=1e-9 * len(ok)),
        timeout=10,
    )
    assert usage["currency"] == "EUR" and usage["day"]["requests"] == len(ok)


def test_spend_report_is_usage_times_prices(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    org = make(a, "/admin/orgs")
    teams = [make(a, "/admin/teams", org=org["id"]), make(a, "/admin/teams")]
    keys = [make(a, "/admin/keys", team=t["id"]) for t in teams for _ in range(2)]
    lone = make(a, "/admin/keys")
    seen: dict[tuple[str | None, str], float] = {}
    for model, price in (("fake", PRICES), ("fake-b", {"input": 3.0, "output": 7.5})):
        for k in [*keys, lone]:
            for r in asyncio.run(fire(gws, [k["key"]], 3, model)):
                assert r.status_code == 200
                seen[(k["team"], model)] = seen.get((k["team"], model), 0.0) + cost(r.json()["usage"], price)
    ids = {t["id"] for t in teams}

    def report() -> dict[tuple[str | None, str], float]:
        body = admin(b, "GET", "/admin/spend?group_by=team,model,day").json()
        return {(row["team"], row["model"]): row["spend"] for row in body["data"] if row["team"] in ids | {None}}

    deadline = time.monotonic() + 20
    want = {k: v for k, v in seen.items() if k[0] in ids}
    while True:  # the other replica adds its rollups within a few seconds
        got = report()
        if all(got.get(k) == pytest.approx(v, abs=1e-8) for k, v in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for k, v in want.items():
        assert got.get(k) == pytest.approx(v, abs=1e-8), (k, got)
    body = admin(a, "GET", f"/admin/spend?group_by=org,model&org={org['id']}").json()
    assert body["currency"] == "EUR" and {row["org"] for row in body["data"]} == {org["id"]}
    assert body["total"]["spend"] == pytest.approx(sum(v for (t, _), v in seen.items() if t == teams[0]["id"]))
    assert body["total"]["requests"] == 12
    text = admin(a, "GET", f"/admin/spend?group_by=team,day&team={teams[1]['id']}&format=csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 1 and rows[0]["team"] == teams[1]["id"] and int(rows[0]["requests"]) == 12
    for bad in ("group_by=colour", "format=xml", "since=yesterday", "since=2030-01-02&until=2030-01-01", "team=x"):
        r = admin(a, "GET", f"/admin/spend?{bad}")
        assert r.status_code == 400, (bad, r.text)


def test_team_admin_api_and_the_audit_log(gws: tuple[Proc, Proc]) -> None:
    a, b = gws
    org = make(a, "/admin/orgs", monthly_budget=100)
    team = make(a, "/admin/teams", org=org["id"], rpm=100, daily_budget=12.5, metadata={"cost_centre": "42"})
    assert team["org"] == org["id"] and team["daily_budget"] == 12.5 and team["object"] == "team"
    key = make(a, "/admin/keys", team=team["id"], daily_budget=1.25)
    assert key["team"] == team["id"] and key["org"] == org["id"] and key["daily_budget"] == 1.25
    assert admin(b, "GET", f"/admin/teams/{team['id']}/keys").json()["data"][0]["id"] == key["id"]
    r = admin(a, "PATCH", f"/admin/teams/{team['id']}", {"rpm": 5, "name": "renamed"})
    assert r.status_code == 200 and r.json()["rpm"] == 5 and r.json()["name"] == "renamed"
    assert admin(a, "PATCH", f"/admin/teams/{team['id']}", {"org": None}).status_code == 400
    conflict = admin(a, "DELETE", f"/admin/teams/{team['id']}")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflict"
    assert admin(a, "DELETE", f"/admin/orgs/{org['id']}").status_code == 409
    assert admin(a, "PATCH", f"/admin/keys/{key['id']}", {"team": None}).json()["team"] is None
    assert admin(a, "DELETE", f"/admin/teams/{team['id']}").status_code == 200
    assert admin(a, "GET", f"/admin/teams/{team['id']}").status_code == 404
    missing = admin(a, "POST", "/admin/keys", {"name": "x", "team": "team_0123456789abcdef"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "team_not_found"

    entries = admin(b, "GET", "/admin/audit?limit=50").json()["data"]
    mine = [e for e in entries if e["target"] in (team["id"], key["id"], org["id"])]
    actions = [e["action"] for e in reversed(mine)]
    assert actions == ["org.create", "team.create", "key.create", "team.update", "key.update", "team.delete"]
    update = next(e for e in mine if e["action"] == "team.update")
    assert update["before"]["rpm"] == 100 and update["after"]["rpm"] == 5 and update["after"]["name"] == "renamed"
    assert update["actor"] == "admin-key" and update["role"] == "admin" and update["address"] == "127.0.0.1"
    created = next(e for e in mine if e["action"] == "key.create")
    assert key["key"] not in str(entries) and ADMIN_KEY not in str(entries) and "key" not in created["after"]


@pytest.mark.parametrize(
    "raw",
    [
        '{"name": ""}',
        '{"name": "' + "x" * 201 + '"}',
        '{"name": "\\ud800"}',
        '{"name": 5}',
        '{"name": "t", "rpm": -1}',
        '{"name": "t", "daily_budget": -3}',
        '{"name": "t", "daily_budget": 1e300}',
        '{"name": "t", "monthly_budget": NaN}',
        '{"name": "t", "monthly_budget": Infinity}',
        '{"name": "t", "monthly_budget": "12"}',
        '{"name": "t", "monthly_budget": true}',
        '{"name": "t", "org": "org_nope"}',
        '{"name": "t", "org": "org_0123456789abcdef"}',
        '{"name": "t", "models": ["nobody-serves-this"]}',
        '{"name": "t", "colour": "red"}',
        '["not", "an", "object"]',
        '{"name": "t", "metadata": "a string"}',
        '{"name": "t", "team": "team_<script>"}',
    ],
)
def test_hostile_team_payloads_are_4xx(gws: tuple[Proc, Proc], raw: str) -> None:
    a, _ = gws
    for path in ("/admin/teams", "/admin/orgs", "/admin/keys"):
        r = admin(a, "POST", path, content=raw.encode())
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (path, r.text)


def test_teams_and_spend_cli(gws: tuple[Proc, Proc]) -> None:
    a, _ = gws
    env = {**os.environ, "GATEWAY_URL": a.url, "GATEWAY_ADMIN_KEY": ADMIN_KEY}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", *args], env=env, capture_output=True, text=True, timeout=60
        )

    made = cli("teams", "create", "--name", "cli team", "--rpm", "7", "--daily-budget", "2.5")
    assert made.returncode == 0, made.stderr
    team = json.loads(made.stdout)
    assert team["rpm"] == 7 and team["daily_budget"] == 2.5
    key = cli("keys", "create", "--name", "cli key", "--team", team["id"])
    assert key.returncode == 0 and json.loads(key.stdout)["team"] == team["id"]
    assert team["id"] in cli("teams", "list").stdout
    r = asyncio.run(fire((a,), [json.loads(key.stdout)["key"]], 1))[0]
    assert r.status_code == 200
    deadline = time.monotonic() + 20
    while True:
        out = cli("spend", "--group-by", "team", "--team", team["id"], "--format", "csv")
        assert out.returncode == 0, out.stderr
        rows = list(csv.DictReader(io.StringIO(out.stdout)))
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows[0]["team"] == team["id"] and float(rows[0]["spend"]) == pytest.approx(cost(r.json()["usage"], PRICES))
    table = cli("spend", "--group-by", "team,model")
    assert table.returncode == 0 and "spend (EUR)" in table.stdout
    bad = cli("teams", "update", team["id"], "--rpm", "-5")
    assert bad.returncode == 1 and "rpm" in bad.stderr
