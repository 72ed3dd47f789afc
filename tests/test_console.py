"""The admin console (/ui) in a real browser: Debian's chromium driven by Playwright, against a real
gateway with auth on, a private redis-server and a CPU engine with the tiny model.

Screenshots of each page land in artifacts/console/ (CI keeps that folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require
from tests.procs import ROOT, TINY_MODEL, Proc, cpu_engine, free_port, gateway
from tests.redis_fixtures import RedisServer

if importlib.util.find_spec("playwright") is not None:
    from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    *(["--no-sandbox"] if os.geteuid() == 0 else []),  # chromium's sandbox refuses to run as root
]
ARTIFACTS = ROOT / "artifacts" / "console"
ADMIN_KEY = "console-admin-key-for-tests"
MODEL = "tiny-llama"
WAIT_MS = 15_000  # for anything the page shows; generous, the machine is shared


@pytest.fixture(scope="module")
def engine_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gw(logs_dir: Path, redis_session: RedisServer, engine_port: int) -> Iterator[Proc]:
    require((TINY_MODEL / "config.json").exists(), f"tiny model missing at {TINY_MODEL}")
    if not redis_session.running:
        redis_session.start()
    redis_session.flush()
    config = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.url, "timeout": 0.5},
        "auth": {"enabled": True, "default_max_tokens": 64},
        "engines": [cpu_engine("cpu-0", engine_port)],
        "models": [{"name": MODEL, "routes": [{"engine": "cpu-0"}], "tokenizer": str(TINY_MODEL)}],
    }
    proc = gateway(logs_dir, config, name="console-gw", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        yield proc.wait_healthy("/ready", timeout=120)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require(importlib.util.find_spec("playwright") is not None, "the playwright package is missing (dev extra)")
    require(CHROMIUM.exists(), f"no chromium at {CHROMIUM}: run scripts/setup-browser.sh")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, gw: Proc, redis_session: RedisServer) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage) at 1280x800 that must end with no uncaught error, no
    CSP violation and no request to anything but the gateway."""
    if not redis_session.running:
        redis_session.start()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=gw.url)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    uncaught: list[str] = []
    policy: list[str] = []
    elsewhere: list[str] = []
    tab.on("pageerror", lambda exc: uncaught.append(str(exc)))
    tab.on("console", lambda m: policy.append(m.text) if "Content Security Policy" in m.text else None)
    tab.on("console", lambda m: uncaught.append(m.text) if m.text.startswith("console: unexpected error") else None)
    tab.on("request", lambda r: None if r.url.startswith(gw.url + "/") else elsewhere.append(r.url))
    try:
        yield tab
    finally:
        context.close()
    assert not uncaught, uncaught
    assert not policy, policy
    assert not elsewhere, elsewhere


def admin(gw: Proc, method: str, path: str, body: Any = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, gw.url + path, json=body, headers=headers, timeout=10)


def sign_in(page: Page, gw: Proc, then: str = "keys") -> None:
    page.goto(f"{gw.url}/ui/#/signin?next={then}")
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_served_with_strict_headers(gw: Proc) -> None:
    r = httpx.get(gw.url + "/ui")
    assert r.status_code == 308 and r.headers["location"] == "ui/"
    index = httpx.get(gw.url + "/ui/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert index.headers["x-content-type-options"] == "nosniff"
    assert index.headers["referrer-policy"] == "no-referrer"
    assert index.headers["cache-control"] == "no-cache" and index.headers["etag"]
    again = httpx.get(gw.url + "/ui/", headers={"if-none-match": index.headers["etag"]})
    assert again.status_code == 304 and again.headers["content-security-policy"] == csp
    for path in ("app.js", "pages/keys.js", "vendor/uPlot.esm.js"):
        r = httpx.get(f"{gw.url}/ui/{path}")
        assert r.status_code == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8", path
    assert httpx.get(gw.url + "/ui/console.css").headers["content-type"] == "text/css; charset=utf-8"
    for missing in ("/ui/nope.js", "/ui/../gateway/app.py", "/ui/%2e%2e/pyproject.toml"):
        r = httpx.get(gw.url + missing)
        assert r.status_code == 404 and "error" in r.json(), missing


def test_sign_in_refuses_a_wrong_key_and_signs_out(page: Page, gw: Proc) -> None:
    page.goto(gw.url + "/ui")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.url.endswith("/ui/#/signin?next=keys") or page.url.endswith("/ui/#/signin")
    shot(page, "signin")
    page.get_by_label("Admin key").fill("not-the-admin-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert").filter(has_text="Wrong key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="API keys")).to_be_visible()
    assert page.evaluate("Object.values(sessionStorage)") == [ADMIN_KEY]
    assert page.evaluate("localStorage.length") == 0
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_create_a_key_see_its_secret_once_filter_and_change_limits(page: Page, gw: Proc) -> None:
    other = admin(gw, "POST", "/admin/keys", {"name": "other-team"}).json()
    admin(gw, "DELETE", f"/admin/keys/{other['id']}")
    sign_in(page, gw)
    page.get_by_role("button", name="Create key").click()
    page.get_by_label("Name", exact=True).fill("console-team")
    page.get_by_label("Requests per minute").fill("60")
    page.get_by_label(MODEL).check()
    page.get_by_role("button", name="Create", exact=True).click()
    secret_box = page.locator("#new-secret")
    expect(secret_box).to_contain_text("sk-gw-")
    secret = secret_box.inner_text().strip()
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_text("Copied.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    models = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {secret}"})
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    created = page.locator("tr", has_text="console-team")
    expect(created).to_contain_text("rpm 60")
    key_id = created.get_attribute("data-key-id")
    assert key_id is not None

    page.reload()  # the secret is gone: not on the page, not in any storage
    expect(page.get_by_role("heading", name="API keys")).to_be_visible()
    expect(page.locator("tr", has_text="console-team")).to_be_visible()
    assert secret not in page.content()
    assert secret not in page.evaluate("JSON.stringify([sessionStorage, localStorage])")

    page.get_by_label("Name or ID").fill("console")
    expect(page.locator("tbody tr")).to_have_count(1)
    page.get_by_label("Name or ID").fill("")
    page.get_by_label("State").select_option("revoked")
    expect(page.locator("tbody tr")).to_have_count(1)
    expect(page.locator("tbody tr")).to_contain_text("other-team")
    page.get_by_label("State").select_option("")
    page.get_by_label("May use model").select_option(MODEL)
    expect(page.locator("tbody tr")).to_have_count(2)  # other-team may use every model
    shot(page, "keys")

    page.get_by_role("link", name="console-team").click()
    expect(page.get_by_role("heading", name="console-team")).to_be_visible()
    expect(page.locator(".chart canvas")).to_have_count(3)  # tokens and requests per day, the live minute
    page.get_by_label("Requests per minute").fill("30")
    page.get_by_label("Tokens per minute").fill("5000")
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_text("Saved: rpm, tpm.")).to_be_visible()
    key = admin(gw, "GET", f"/admin/keys/{key_id}").json()
    assert (key["rpm"], key["tpm"], key["models"]) == (30, 5000, [MODEL])
    expect(page.get_by_text("This minute:")).to_be_visible()
    expect(page.get_by_text("0 of 30")).to_be_visible()  # the minute's requests against the new rpm


# Records the answer's text length at every change, so the test sees it grow while streaming.
WATCH_ANSWER = """() => {
  window.samples = [];
  const record = () => {
    const answer = [...document.querySelectorAll('.msg.assistant')].pop();
    if (answer) window.samples.push([answer.dataset.state, answer.querySelector('.text').textContent.length]);
  };
  new MutationObserver(record).observe(document.querySelector('.transcript'),
    {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_playground_streams_then_refuses_the_revoked_key(page: Page, gw: Proc) -> None:
    created = admin(gw, "POST", "/admin/keys", {"name": "playground"}).json()
    page.goto(gw.url + "/ui/#/playground")  # no admin sign-in needed: a client key is enough
    page.get_by_label("Client key").fill(created["key"])
    page.get_by_role("button", name="Load models").click()
    expect(page.get_by_label("Model")).to_have_value(MODEL)
    page.get_by_label("Max tokens").fill("40")
    page.get_by_label("Other parameters (JSON)").fill(json.dumps({"ignore_eos": True}))
    page.evaluate(WATCH_ANSWER)
    page.get_by_label("Message", exact=True).fill("Tell me a story")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-state", "done")
    samples: list[tuple[str, int]] = page.evaluate("window.samples")
    final = len(answer.locator(".text").inner_text())
    growing = sorted({n for state, n in samples if state == "streaming" and 0 < n < final})
    assert final > 0 and len(growing) >= 3, samples  # text shown in steps before the stream ended
    usage = json.loads(answer.locator(".meta").get_attribute("data-usage") or "{}")
    assert usage["completion_tokens"] == 40
    expect(answer.locator(".meta")).to_contain_text("40 completion")
    assert answer.locator(".meta").get_attribute("data-route") in (None, "v1")  # x-gateway-route, where sent
    shot(page, "playground")

    sign_in(page, gw, then=f"keys/{created['id']}")  # the chat shows in the key's usage
    page.get_by_text("Usage per day as a table").click()
    today = page.locator("details tbody tr").first.locator("td")
    expect(today).to_have_text(
        [re.compile(r"\d{4}-\d\d-\d\d"), "1", str(usage["prompt_tokens"]), "40", str(usage["total_tokens"])]
    )
    shot(page, "key")
    page.get_by_role("button", name="Revoke key").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Revoke “playground”?")
    dialog.get_by_role("button", name="Revoke").click()
    expect(page.locator("h1 .badge")).to_have_text("revoked")
    assert admin(gw, "GET", f"/admin/keys/{created['id']}").json()["revoked"] is True

    page.get_by_role("link", name="Playground").click()
    expect(page.get_by_label("Client key")).to_have_value(created["key"])  # kept in this tab
    expect(page.get_by_role("alert")).to_contain_text("401 · ")  # its models could not be listed
    expect(page.get_by_label("Model")).to_have_value(MODEL)  # the tab's last choice
    page.get_by_label("Message", exact=True).fill("Still there?")
    page.get_by_role("button", name="Send").click()
    refused = page.locator(".msg.assistant").last
    expect(refused).to_have_attribute("data-state", "error")
    expect(refused).to_contain_text("401 · ")
    expect(refused).to_contain_text("invalid_api_key")


def test_models_page_changes_weights_and_shows_engines_live(page: Page, gw: Proc) -> None:
    sign_in(page, gw, then="models")
    engine = page.locator('tr[data-engine="cpu-0"]')
    expect(engine).to_contain_text("healthy")
    updated = page.get_by_text("updated ").inner_text()
    expect(page.get_by_text("updated ")).not_to_have_text(updated, timeout=6000)  # refreshed live

    model = page.locator(f'form[data-model="{MODEL}"]')
    model.get_by_label("Weight").fill("3")
    model.get_by_role("button", name="Save routes").click()
    expect(page.get_by_text(f"Saved the routes of {MODEL}: weights 3.")).to_be_visible()
    view = admin(gw, "GET", f"/admin/models/{MODEL}").json()
    assert [r["weight"] for r in view["routes"]] == [3] and view["overridden"] is True

    model = page.locator(f'form[data-model="{MODEL}"]')
    model.get_by_role("button", name="Add route").click()
    model.get_by_label("Weight").last.fill("1")
    model.get_by_label("Upstream model").last.fill("tiny-llama-v2")
    model.get_by_role("button", name="Save routes").click()
    expect(page.get_by_text(f"Saved the routes of {MODEL}: weights 3, 1.")).to_be_visible()
    view = admin(gw, "GET", f"/admin/models/{MODEL}").json()
    assert [(r["engines"], r["model"], r["weight"]) for r in view["routes"]] == [
        (["cpu-0"], MODEL, 3),
        (["cpu-0"], "tiny-llama-v2", 1),
    ]
    if "name" in view["routes"][0]:  # gateways with route versions: the new one got the next name
        assert [r["name"] for r in view["routes"]] == ["v1", "v2"]
    expect(page.locator(f'form[data-model="{MODEL}"] .share')).to_have_text(["75%", "25%"])
    shot(page, "models")

    page.locator(f'form[data-model="{MODEL}"]').get_by_role("button", name="Roll back to config").click()
    page.get_by_role("dialog").get_by_role("button", name="Roll back").click()
    expect(page.get_by_text(f"Rolled {MODEL} back")).to_be_visible()
    view = admin(gw, "GET", f"/admin/models/{MODEL}").json()
    assert view["overridden"] is False and [r["weight"] for r in view["routes"]] == [1]


def test_redis_down_shows_a_message_not_a_blank_page(page: Page, gw: Proc, redis_session: RedisServer) -> None:
    sign_in(page, gw)
    expect(page.get_by_role("heading", name="API keys")).to_be_visible()
    redis_session.kill()
    try:
        page.reload()
        expect(page.get_by_role("alert")).to_contain_text("503 · ")
        expect(page.get_by_role("alert")).to_contain_text("unavailable")
        expect(page.get_by_role("heading", name="API keys")).to_be_visible()
        expect(page.get_by_text("The keys could not be loaded")).to_be_visible()
        shot(page, "keys-redis-down")
    finally:
        redis_session.start()
    page.get_by_role("link", name="Keys").click()
    deadline = time.monotonic() + 10  # the gateway's client reconnects on its own
    while page.locator(".notice.error").count():
        assert time.monotonic() < deadline, page.locator(".notice.error").all_inner_texts()
        page.reload()
        page.wait_for_timeout(300)


def test_says_so_when_the_admin_api_is_disabled(browser: Browser, logs_dir: Path, engine_port: int, gw: Proc) -> None:
    config = {
        "engines": [{"name": "cpu-0", "kind": "openai", "url": f"http://127.0.0.1:{engine_port}"}],
        "models": [{"name": MODEL, "routes": [{"engine": "cpu-0"}]}],
        "auth": {"enabled": False},
    }
    plain = gateway(logs_dir, config, name="console-no-admin", env={"GATEWAY_ADMIN_KEY": ""}).start()
    try:
        plain.wait_healthy("/ready", timeout=60)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            tab = context.new_page()
            tab.goto(plain.url + "/ui")
            disabled = tab.get_by_role("alert").filter(has_text="The admin API is disabled on this gateway")
            expect(disabled).to_contain_text("needs Redis", timeout=WAIT_MS)
            expect(tab.get_by_label("Admin key")).to_be_disabled()
            tab.get_by_role("link", name="playground", exact=True).click()  # needs no key when auth is off
            expect(tab.get_by_label("Model")).to_have_value(MODEL, timeout=WAIT_MS)
        finally:
            context.close()
    finally:
        plain.stop()
