"""Single sign-on with a real OpenID Connect provider (panva's oidc-provider on Node, started here):
a browser sign-in through the console (Playwright + Debian's chromium), roles on every admin
endpoint (a table: role x endpoint -> allowed or 403), provider access tokens for automation, JWKS
rotation, and forged, expired or misdirected tokens refused without a 500 or an echo."""

from __future__ import annotations

import asyncio
import html
import importlib.util
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis

from gateway.access.team_fields import TEAM_FIELDS, validate_group_fields
from gateway.access.teams import TeamStore
from testkit.ci import require
from testkit.keyed import ADMIN_KEY
from testkit.procs import Proc, fake_upstream, free_port, write_config
from testkit.redis_server import RedisServer
from tests.oidc_provider import CONSOLE_CLIENT, CONSOLE_SECRET, RESOURCE, OidcProvider, SigningKey

if importlib.util.find_spec("playwright") is not None:
    from playwright.sync_api import expect, sync_playwright

ACCOUNTS = {
    "alice": {"email": "alice@example.com", "groups": ["platform"]},
    "tina": {"email": "tina@example.com", "groups": ["team-a-leads"]},
    "victor": {"email": "victor@example.com", "groups": ["auditors"]},
}
CLIENTS = "urn:llm-gateway-clients"  # the audience of client JWTs on the public API
BOTS = {"bot-admin": ["platform"], "bot-team": ["team-a-leads"], "bot-viewer": ["auditors"], "bot-none": ["other"]}


class World:
    def __init__(self, gw: Proc, provider: OidcProvider, team_a: str, team_b: str) -> None:
        self.gw, self.provider, self.team_a, self.team_b = gw, provider, team_a, team_b
        self.tokens = {role: provider.bot_token(bot) for role, bot in _ROLE_BOTS.items()}

    def call(self, token: str, method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"}
        return httpx.request(method, self.gw.url + path, json=body, headers=headers, timeout=15, **kw)


_ROLE_BOTS = {"admin": "bot-admin", "team_admin": "bot-team", "viewer": "bot-viewer", "none": "bot-none"}


async def _teams(url: str) -> tuple[str, str]:
    client = aioredis.Redis.from_url(url)
    try:
        store = TeamStore(client)
        a = await store.create_team(validate_group_fields({"name": "team a"}, TEAM_FIELDS, partial=False))
        b = await store.create_team(validate_group_fields({"name": "team b"}, TEAM_FIELDS, partial=False))
        return a.id, b.id
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def world(logs_dir: Path, redis_session: RedisServer) -> Iterator[World]:
    redis = redis_session.up()
    team_a, team_b = asyncio.run(_teams(redis.url))
    port = free_port()
    provider = OidcProvider(logs_dir, f"http://127.0.0.1:{port}/ui/auth/callback", ACCOUNTS, BOTS).start()
    fake = fake_upstream(logs_dir, "--model", "fake", "--chunks", "2", name="fake-signin").start().wait_healthy()
    cfg = {
        "redis": {"url": redis.url, "timeout": 1.0},
        "auth": {
            "enabled": True,
            "oidc": {
                "issuer": provider.issuer,
                "client_id": CONSOLE_CLIENT,
                "admin": ["platform"],
                "viewer": ["auditors"],
                "team_admin": {"team-a-leads": [team_a]},
                "audience": RESOURCE,
                "client_audience": CLIENTS,
            },
        },
        "store": {"url": f"sqlite:///{logs_dir / 'signin-store.db'}"},
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake", "model": "fake"}]}],
        "pricing": {"currency": "EUR", "models": {"fake": {"input": 1000, "output": 2000}}},
    }
    path = write_config(logs_dir, f"signin-{port}", cfg)
    # the port is chosen first: the provider must know the gateway's callback before either starts
    args = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(path), "--port", str(port)]
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_OIDC_CLIENT_SECRET": CONSOLE_SECRET}
    gw = Proc("gw-signin", args, port, logs_dir / f"gw-signin-{port}.log", env=env)
    gw.start().wait_healthy("/ready", timeout=60)
    try:
        yield World(gw, provider, team_a, team_b)
    finally:
        gw.stop()
        fake.stop()
        provider.stop()


def _key(w: World, team: str | None) -> str:
    r = w.call(ADMIN_KEY, "POST", "/admin/keys", {"name": "k", "team": team})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_roles_on_every_admin_endpoint(world: World) -> None:
    w = world
    key_a, key_a2, key_b, key_move = (_key(w, t) for t in (w.team_a, w.team_a, w.team_b, w.team_a))
    a, b = w.team_a, w.team_b
    routes = {"routes": [{"engines": ["fake"], "model": "fake", "weight": 1}]}
    # (method, path, body) -> the roles that may; everyone else gets 403
    table: list[tuple[str, str, Any, set[str]]] = [
        ("GET", "/admin/keys", None, {"admin", "team_admin", "viewer"}),
        ("POST", "/admin/keys", {"name": "x", "team": a}, {"admin", "team_admin"}),
        ("POST", "/admin/keys", {"name": "x"}, {"admin"}),
        ("POST", "/admin/keys", {"name": "x", "team": b}, {"admin"}),
        ("GET", f"/admin/keys/{key_a}", None, {"admin", "team_admin", "viewer"}),
        ("GET", f"/admin/keys/{key_b}", None, {"admin", "viewer"}),
        ("PATCH", f"/admin/keys/{key_a}", {"rpm": 50}, {"admin", "team_admin"}),
        ("PATCH", f"/admin/keys/{key_move}", {"team": b}, {"admin"}),
        ("PATCH", f"/admin/keys/{key_b}", {"rpm": 50}, {"admin"}),
        ("DELETE", f"/admin/keys/{key_a2}", None, {"admin", "team_admin"}),
        ("DELETE", f"/admin/keys/{key_b}", None, {"admin"}),
        ("GET", f"/admin/keys/{key_a}/usage", None, {"admin", "team_admin", "viewer"}),
        ("GET", f"/admin/keys/{key_b}/usage", None, {"admin", "viewer"}),
        ("GET", "/admin/teams", None, {"admin", "team_admin", "viewer"}),
        ("POST", "/admin/teams", {"name": "new"}, {"admin"}),
        ("GET", f"/admin/teams/{a}", None, {"admin", "team_admin", "viewer"}),
        ("GET", f"/admin/teams/{b}", None, {"admin", "viewer"}),
        ("PATCH", f"/admin/teams/{a}", {"rpm": 1000}, {"admin"}),
        ("DELETE", "/admin/teams/team_0000000000000000", None, {"admin"}),
        ("GET", f"/admin/teams/{a}/keys", None, {"admin", "team_admin", "viewer"}),
        ("GET", f"/admin/teams/{b}/keys", None, {"admin", "viewer"}),
        ("GET", f"/admin/teams/{a}/usage", None, {"admin", "team_admin", "viewer"}),
        ("GET", "/admin/orgs", None, {"admin", "viewer"}),
        ("POST", "/admin/orgs", {"name": "o"}, {"admin"}),
        ("GET", "/admin/orgs/org_0000000000000000", None, {"admin", "viewer"}),
        ("PATCH", "/admin/orgs/org_0000000000000000", {"rpm": 5}, {"admin"}),
        ("DELETE", "/admin/orgs/org_0000000000000000", None, {"admin"}),
        ("GET", "/admin/orgs/org_0000000000000000/usage", None, {"admin", "viewer"}),
        ("GET", "/admin/spend?group_by=team", None, {"admin", "team_admin", "viewer"}),
        ("GET", "/admin/audit", None, {"admin", "viewer"}),
        ("GET", "/admin/engines", None, {"admin", "team_admin", "viewer"}),
        ("GET", "/admin/models", None, {"admin", "team_admin", "viewer"}),
        ("GET", "/admin/models/fake", None, {"admin", "team_admin", "viewer"}),
        ("GET", "/admin/requests", None, {"admin", "viewer"}),
        ("GET", "/admin/models/fake/report", None, {"admin", "viewer"}),
        ("GET", "/admin/batches", None, {"admin", "viewer"}),
        ("GET", "/admin/batches/batch_nope", None, {"admin", "viewer"}),
        ("POST", "/admin/batches/batch_nope/cancel", None, {"admin"}),
        ("GET", "/admin/files/file-nope/content", None, {"admin", "viewer"}),
        ("PUT", "/admin/models/fake/routes", routes, {"admin"}),
        ("DELETE", "/admin/models/fake/routes", None, {"admin"}),
    ]
    wrong = []
    # the allowed admin runs last: a DELETE it makes must not turn a 403 check of another role into a 404
    for method, path, body, allowed in table:
        for role in ("viewer", "none", "team_admin", "admin"):
            r = w.call(w.tokens[role], method, path, body)
            assert r.status_code < 500, (role, method, path, r.text)
            may = role in allowed
            if may == (r.status_code == 403):
                wrong.append(f"{role} {method} {path}: {r.status_code} {r.text[:120]}")
            if r.status_code == 403:
                assert r.json()["error"]["code"] in ("forbidden", "not_admin"), r.text
    assert not wrong, "\n".join(wrong)
    # the break-glass admin key still does everything
    assert w.call(ADMIN_KEY, "GET", "/admin/audit").status_code == 200


def test_a_team_admin_sees_only_its_team(world: World) -> None:
    w = world
    mine, theirs = _key(w, w.team_a), _key(w, w.team_b)
    seen = {k["id"] for k in w.call(w.tokens["team_admin"], "GET", "/admin/keys").json()["data"]}
    assert mine in seen and theirs not in seen
    teams = {t["id"] for t in w.call(w.tokens["team_admin"], "GET", "/admin/teams").json()["data"]}
    assert teams == {w.team_a}
    everyone = {k["id"] for k in w.call(w.tokens["viewer"], "GET", "/admin/keys").json()["data"]}
    assert {mine, theirs} <= everyone
    audit = w.call(w.tokens["admin"], "GET", "/admin/audit?action=key.update").json()["data"]
    by_bot = [e for e in audit if e["via"] == "bearer" and e["role"] == "team_admin"]
    assert by_bot and by_bot[0]["actor"].startswith("bot-team")


def test_bad_tokens_are_refused_without_a_trace(world: World) -> None:
    w = world
    p, current = w.provider, w.provider.keys[0]
    stranger = SigningKey()
    forged = {
        "expired": current.sign(p.claims(["platform"], iat=int(time.time()) - 900, exp=int(time.time()) - 600)),
        "wrongly signed": stranger.sign(p.claims(["platform"]), kid=current.kid),
        "unknown key": stranger.sign(p.claims(["platform"])),
        "wrong audience": current.sign(p.claims(["platform"], aud="someone-else")),
        "wrong issuer": current.sign(p.claims(["platform"], iss="http://127.0.0.1:1")),
        "hs256": jwt.encode(p.claims(["platform"]), "secret" * 8, algorithm="HS256", headers={"kid": current.kid}),
        "none": jwt.encode(p.claims(["platform"]), None, algorithm="none", headers={"kid": current.kid}),
        "no kid": jwt.encode(p.claims(["platform"]), current.private, algorithm="RS256"),
        "garbage": "eyJ.eyJ.sig",
        "huge": "a." + "b" * 20000 + ".c",
    }
    for why, token in forged.items():
        r = w.call(token, "GET", "/admin/keys")
        assert r.status_code in (401, 403), (why, r.status_code, r.text)
        assert token not in r.text and token[-20:] not in r.text, why
    good = current.sign(p.claims(["platform"]))
    assert w.call(good, "GET", "/admin/keys").status_code == 200  # the same claims, validly signed
    log = w.gw.log_path.read_text(errors="replace")
    for token in [*forged.values(), good, *w.tokens.values()]:
        assert token[-24:] not in log
    metrics = httpx.get(w.gw.url + "/metrics", timeout=10).text
    assert all(t[-24:] not in metrics for t in w.tokens.values())


def test_sign_in_through_the_console_in_a_browser(world: World) -> None:
    require(importlib.util.find_spec("playwright") is not None, "the playwright package is missing (dev extra)")
    require(Path("/usr/bin/chromium").exists(), "no chromium: run scripts/setup-browser.sh")
    from tests.test_console import ARTIFACTS, CHROMIUM_ARGS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    w = world
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context()
            page = context.new_page()
            page.goto(w.gw.url + "/ui/#/signin")
            page.locator("#sso-sign-in").click()
            page.locator('input[name="login"]').fill("alice")
            page.locator('input[name="password"]').fill("any")
            page.locator('button[type="submit"]').click()
            page.wait_for_url(w.gw.url + "/ui/**", timeout=20_000)
            expect(page.get_by_role("button", name="Sign out (alice")).to_be_visible(timeout=15_000)
            cookie = next(c for c in context.cookies() if c["name"] == "gw_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain HTTP here
            assert cookie["value"] not in page.evaluate("JSON.stringify(sessionStorage) + document.cookie")
            # a change made by the console carries the CSRF token; without it the same call is refused
            page.get_by_role("button", name="Create key").click()
            page.get_by_label("Name", exact=True).fill("made-by-alice")
            page.get_by_role("button", name="Create", exact=True).click()
            expect(page.locator("#new-secret")).to_contain_text("sk-gw-")
            status = page.evaluate(
                "fetch('/admin/teams', {method: 'POST', headers: {'content-type': 'application/json'},"
                " body: JSON.stringify({name: 'no-csrf'})}).then(r => r.status)"
            )
            assert status == 403
            audit = w.call(ADMIN_KEY, "GET", "/admin/audit?action=key.create").json()["data"]
            entry = next(e for e in audit if e["after"]["name"] == "made-by-alice")
            assert entry["actor"] == "alice <alice@example.com>" and entry["via"] == "session"
            # the team's page: spend per day as a chart, from two requests of a key of the team
            secret = w.call(ADMIN_KEY, "POST", "/admin/keys", {"name": "spender", "team": w.team_a}).json()["key"]
            for _ in range(2):
                r = httpx.post(
                    w.gw.url + "/v1/chat/completions",
                    json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                    headers={"authorization": f"Bearer {secret}"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
            page.goto(w.gw.url + f"/ui/#/teams/{w.team_a}")
            expect(page.get_by_role("heading", name="team a")).to_be_visible()
            expect(page.locator("#team-spend-total")).to_contain_text("2 requests")
            expect(page.locator("#team-spend-today")).to_contain_text("EUR")
            expect(page.locator(".chart canvas").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "team.png"), full_page=True)
            page.goto(w.gw.url + "/ui/#/audit")
            expect(page.locator("tr", has_text="alice@example.com").first).to_contain_text("key.create")
            page.screenshot(path=str(ARTIFACTS / "audit.png"), full_page=True)
            page.get_by_role("button", name="Sign out (alice").click()
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            me = page.evaluate("fetch('/ui/auth/me').then(r => r.json())")
            assert me["signed_in"] is False
            context.close()
        finally:
            chromium.close()


def test_a_viewer_signs_in_and_changes_nothing(world: World) -> None:
    """The sign-in flow without a browser: follow the provider's forms with one HTTP client."""
    w = world
    with httpx.Client(timeout=15, follow_redirects=True) as c:
        form = c.get(w.gw.url + "/ui/auth/login")
        assert form.status_code == 200 and 'name="login"' in form.text
        action = re.search(r'<form[^>]*action="([^"]+)"', form.text)
        hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form.text))
        assert action is not None
        data = {**hidden, "login": "victor", "password": "x"}
        done = c.post(httpx.URL(str(form.url)).join(html.unescape(action.group(1))), data=data)
        assert done.status_code == 200 and "Signed in" in done.text, done.text[:300]
        me = c.get(w.gw.url + "/ui/auth/me").json()
        assert me["role"] == "viewer" and me["subject"].startswith("victor")
        headers = {"x-csrf-token": me["csrf"]}
        assert c.get(w.gw.url + "/admin/keys").status_code == 200
        refused = c.post(w.gw.url + "/admin/teams", json={"name": "v"}, headers=headers)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        replay = c.get(w.gw.url + "/ui/auth/callback", params={"state": "x" * 32, "code": "stolen"})
        assert replay.status_code == 401 and "stolen" not in replay.text


def test_client_jwts_are_limited_as_their_team(world: World) -> None:
    w = world
    p, key = w.provider, w.provider.keys[0]
    w.call(ADMIN_KEY, "PATCH", f"/admin/teams/{w.team_b}", {"rpm": 2})

    def chat(token: str) -> httpx.Response:
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        return httpx.post(
            w.gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}, timeout=30
        )

    token = key.sign(p.claims([], aud=CLIENTS, sub="ci-runner", gateway_team=w.team_b))
    assert [chat(token).status_code for _ in range(2)] == [200, 200]
    third = chat(token)
    assert third.status_code == 429 and third.json()["error"]["code"] == "team_rpm_exceeded"
    usage = w.call(ADMIN_KEY, "GET", f"/admin/teams/{w.team_b}/usage").json()
    assert usage["minute"]["requests"] == 2
    refused = {
        "admin audience": key.sign(p.claims(["platform"], gateway_team=w.team_b)),
        "no team": key.sign(p.claims([], aud=CLIENTS)),
        "unknown team": key.sign(p.claims([], aud=CLIENTS, gateway_team="team_0123456789abcdef")),
        "two teams": key.sign(p.claims([], aud=CLIENTS, gateway_team=[w.team_a, w.team_b])),
        "hostile team": key.sign(p.claims([], aud=CLIENTS, gateway_team="team_'; DROP TABLE--")),
        "expired": key.sign(p.claims([], aud=CLIENTS, gateway_team=w.team_a, exp=int(time.time()) - 600)),
        "forged": SigningKey().sign(p.claims([], aud=CLIENTS, gateway_team=w.team_a), kid=key.kid),
    }
    for why, bad in refused.items():
        r = chat(bad)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (why, r.text)
        assert bad[-20:] not in r.text


def test_jwks_rotation_needs_no_restart(world: World) -> None:
    w = world
    old = w.provider.keys[0]
    new = SigningKey()
    w.provider.restart([new, old])  # the provider signs with the new key from now on
    token = w.provider.bot_token("bot-admin")
    assert jwt.get_unverified_header(token)["kid"] == new.kid
    deadline = time.monotonic() + 15
    while True:  # the gateway fetches the keys again when it meets the new key id (at most every few s)
        r = w.call(token, "GET", "/admin/keys")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert w.call(old.sign(w.provider.claims(["platform"])), "GET", "/admin/keys").status_code == 200
