"""The admin console (/ui) in a real browser: Debian's chromium driven by Playwright, against a real
gateway with auth on, a private redis-server, a SQLite store, a CPU engine with the tiny model and
a fake engine (testkit/fake_upstream.py) slow enough for a batch to be watched and cancelled.

Screenshots of each page land in artifacts/console/ (CI keeps that folder).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import openai
import pytest

from testkit.ci import require
from testkit.keyed import ADMIN_KEY, admin
from testkit.procs import ROOT, TINY_MODEL, Proc, cpu_engine, fake_upstream, free_port, gateway, running
from testkit.redis_server import RedisServer

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
MODEL = "tiny-llama"
AB_MODEL = "ab-test"  # two versions (v1, v2) on the tiny model: the experiments page's subject
BATCH_MODEL = "slow-fake"  # the fake engine: 300 ms per whole answer
WAIT_MS = 30_000  # an upper bound only: generous, CI shares two cores with the rest of the suite


@pytest.fixture(scope="module")
def engine_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def paced_engine(logs_dir: Path) -> Iterator[Proc]:
    with running(
        fake_upstream(logs_dir, "--delay-ms", "300", "--chunks", "8", "--pace-ms", "5", name="console-fake"),
        "/health",
        timeout=30,
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def gw(
    logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    redis_session: RedisServer,
    engine_port: int,
    paced_engine: Proc,
) -> Iterator[Proc]:
    require((TINY_MODEL / "config.json").exists(), f"tiny model missing at {TINY_MODEL}")
    redis_session.fresh()
    tiny = {"engine": "cpu-0", "model": MODEL}
    config = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.url, "timeout": 0.5},
        "auth": {"enabled": True, "default_max_tokens": 64},
        "store": {"url": "sqlite:///console.db", "data_dir": str(tmp_path_factory.mktemp("console-store"))},
        "inference_log": {"flush_interval": 0.2},
        "batch": {"concurrency": 2, "poll_interval": 0.2},
        "engines": [cpu_engine("cpu-0", engine_port), {"name": "fake", "kind": "openai", "url": paced_engine.url}],
        "models": [
            {"name": MODEL, "routes": [{"engine": "cpu-0"}], "tokenizer": str(TINY_MODEL)},
            {
                "name": AB_MODEL,
                "routes": [{**tiny, "name": "v1"}, {**tiny, "name": "v2"}],
                "tokenizer": str(TINY_MODEL),
            },
            {"name": BATCH_MODEL, "routes": [{"engine": "fake"}]},
        ],
    }
    with running(
        gateway(logs_dir, config, name="console-gw", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}),
        f"/ready?model={MODEL}",
        timeout=120,
    ) as proc:  # the fake engine is up long before
        yield proc


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


@contextmanager
def watched_tab(browser: Browser, base: str) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage) at 1280x800 that must end with no uncaught error, no
    CSP violation and no request to anything but the gateway at `base` (blob: URLs of its page
    included: the console's downloads)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)  # expect()'s own default is 5 s: short on a busy machine
    uncaught: list[str] = []
    policy: list[str] = []
    elsewhere: list[str] = []
    ours = (base + "/", f"blob:{base}/")
    tab.on("pageerror", lambda exc: uncaught.append(str(exc)))
    tab.on("console", lambda m: policy.append(m.text) if "Content Security Policy" in m.text else None)
    tab.on("console", lambda m: uncaught.append(m.text) if m.text.startswith("console: unexpected error") else None)
    tab.on("request", lambda r: None if r.url.startswith(ours) else elsewhere.append(r.url))
    try:
        yield tab
    finally:
        context.close()
    assert not uncaught, uncaught
    assert not policy, policy
    assert not elsewhere, elsewhere


@pytest.fixture
def page(browser: Browser, gw: Proc, redis_session: RedisServer) -> Iterator[Page]:
    redis_session.up()
    with watched_tab(browser, gw.url) as tab:
        yield tab


def sign_in(page: Page, gw: Proc | str, then: str = "keys") -> None:
    base = gw if isinstance(gw, str) else gw.url
    page.goto(f"{base}/ui/#/signin?next={quote(then, safe='')}")
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
    for path in ("app.js", "pages/keys.js", "pages/batches.js", "pages/experiments.js", "vendor/uPlot.esm.js"):
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
    page.get_by_label("Priority").select_option("high")
    page.get_by_label("Weight").fill("2.5")
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
    record = admin(gw, "GET", f"/admin/keys/{key_id}").json()
    assert (record["priority"], record["weight"]) == ("high", 2.5)

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
    expect(page.get_by_label("Priority")).to_have_value("high")
    expect(page.get_by_label("Weight")).to_have_value("2.5")
    page.get_by_label("Priority").select_option("low")
    page.get_by_role("button", name="Save changes").click()
    expect(page.get_by_text("Saved: rpm, tpm, priority.")).to_be_visible()
    key = admin(gw, "GET", f"/admin/keys/{key_id}").json()
    assert (key["rpm"], key["tpm"], key["models"], key["priority"], key["weight"]) == (30, 5000, [MODEL], "low", 2.5)
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
    assert answer.locator(".meta").get_attribute("data-route") == "v1"  # x-gateway-route
    expect(answer.locator(".meta")).to_contain_text("route: v1")
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


def jsonl_lines(count: int, tag: str) -> bytes:
    lines = [
        {
            "custom_id": f"{tag}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": BATCH_MODEL, "messages": [{"role": "user", "content": f"line {i}"}]},
        }
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def file_bytes(gw: Proc, file_id: str) -> tuple[bytes, str]:
    """A file's content and the name its content-disposition gives, through the admin API."""
    r = admin(gw, "GET", f"/admin/files/{file_id}/content")
    assert r.status_code == 200, r.text
    name = re.search(r'filename="([^"]*)"', r.headers["content-disposition"])
    assert name is not None
    return r.content, name.group(1)


def test_config_page_shows_the_running_configuration_masked_and_reloads_it(page: Page, gw: Proc) -> None:
    sign_in(page, gw, then="config")
    running = admin(gw, "GET", "/admin/config").json()
    expect(page.locator('dd[data-fact="version"]')).to_have_text(running["version"])
    expect(page.locator('details[data-section="models"] pre')).to_contain_text(f'"name": "{MODEL}"')
    auth = page.locator('details[data-section="auth"]')
    auth.locator("summary").click()
    expect(auth.locator("pre")).to_contain_text('"admin_key": "***"')
    assert ADMIN_KEY not in page.content()
    page.get_by_role("button", name="Reload the file").click()  # the file has not changed
    expect(page.get_by_text(f"Unchanged: version {running['version']}.")).to_be_visible()
    shot(page, "config")


def test_batches_show_progress_cancel_and_download(page: Page, gw: Proc) -> None:
    owner = admin(gw, "POST", "/admin/keys", {"name": "batch-owner"}).json()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=owner["key"], max_retries=0, timeout=30)

    def submit(count: int, tag: str) -> Any:
        upload = client.files.create(file=(f"{tag}.jsonl", jsonl_lines(count, tag)), purpose="batch")
        return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")

    small = submit(3, "small")
    large = submit(100, "large")  # 100 lines of 300 ms, two at a time: about 15 s if left alone
    sign_in(page, gw, then="batches")
    small_row = page.locator(f'tr[data-batch-id="{small.id}"]')
    large_row = page.locator(f'tr[data-batch-id="{large.id}"]')
    expect(large_row.get_by_role("link", name=owner["id"])).to_be_visible()
    expect(large_row.locator(".counts")).to_contain_text("of 100 done")
    large_row.locator("td.times summary").click()  # stays open across the live refreshes
    seen = large_row.locator(".counts").inner_text()
    expect(large_row.locator(".counts")).not_to_have_text(seen)  # refreshed live while it runs
    expect(large_row.locator("td.times details")).to_have_attribute("open", "")
    expect(large_row.locator("td.times dl")).to_contain_text("in progress")
    expect(small_row).to_have_attribute("data-status", "completed")
    expect(small_row.locator(".counts")).to_have_text("3 of 3 done · 3 completed · 0 failed")
    shot(page, "batches")

    large_row.get_by_role("button", name="Cancel batch").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Cancel {large.id}?")
    dialog.get_by_role("button", name="Cancel the batch").click()
    expect(large_row).to_have_attribute("data-status", "cancelled")  # cancelling, then cancelled: live
    after = admin(gw, "GET", f"/admin/batches/{large.id}").json()
    counts = after["request_counts"]
    assert after["status"] == "cancelled" and counts["total"] == 100 and counts["failed"] > 0
    done = counts["completed"] + counts["failed"]
    expect(large_row.locator(".counts")).to_have_text(
        f"{done} of 100 done · {counts['completed']} completed · {counts['failed']} failed"
    )
    expect(large_row.get_by_role("button", name="Cancel batch")).to_have_count(0)

    output_id = admin(gw, "GET", f"/admin/batches/{small.id}").json()["output_file_id"]
    expected, name = file_bytes(gw, output_id)
    with page.expect_download() as downloading:
        small_row.get_by_role("button", name=f"Output of {small.id}").click()
    download = downloading.value
    assert download.suggested_filename == name
    assert Path(download.path()).read_bytes() == expected
    assert sorted(json.loads(line)["custom_id"] for line in expected.splitlines()) == ["small-0", "small-1", "small-2"]
    expect(page.get_by_text(f"Downloaded {name} ({len(expected):,} bytes).")).to_be_visible()

    expected, name = file_bytes(gw, after["error_file_id"])
    with page.expect_download() as downloading:
        large_row.get_by_role("button", name=f"Errors of {large.id}").click()
    assert Path(downloading.value.path()).read_bytes() == expected
    assert b"batch_cancelled" in expected


def utc_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def test_experiments_report_matches_the_api_and_flags_drift(page: Page, gw: Proc) -> None:
    secret = admin(gw, "POST", "/admin/keys", {"name": "experiments"}).json()["key"]
    headers = {"authorization": f"Bearer {secret}"}

    def chat(content: str, max_tokens: int, stream: bool) -> None:
        body = {
            "model": AB_MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": stream,
        }
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            r.read()
            assert r.status_code == 200, r.text

    def next_second() -> float:
        mark = math.floor(time.time()) + 1
        time.sleep(max(0.0, mark - time.time()))
        return mark

    # The baseline window: short prompts and answers; the report's window: long ones, streamed.
    t0 = math.floor(time.time())
    for i in range(6):
        chat(f"hi {i}", 2, stream=False)
    t1 = next_second()
    long_prompt = "Tell me everything about the history of open source software licenses. " * 4
    for i in range(6):
        chat(f"{long_prompt} {i}", 8, stream=True)
    t2 = next_second()
    deadline = time.monotonic() + 10  # the inference log is written in the background
    while len(admin(gw, "GET", f"/admin/requests?model={AB_MODEL}").json()["data"]) < 12:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    window = {
        "since": utc_text(t1),
        "until": utc_text(t2),
        "baseline_since": utc_text(t0),
        "baseline_until": utc_text(t1),
    }
    api = admin(gw, "GET", f"/admin/models/{AB_MODEL}/report?{urlencode(window)}").json()
    assert sum(r["requests"] for r in api["routes"]) == 6
    assert api["drift"]["prompt_tokens"]["drifted"] and not api["drift"]["finish_reason"]["drifted"]

    sign_in(page, gw, then=f"experiments?{urlencode({'model': AB_MODEL, **window})}")
    expect(page.get_by_label("Window", exact=True)).to_have_value("custom")
    expect(page.get_by_label("From (UTC)", exact=True)).to_have_value(window["since"])
    table = page.locator("table.versions")
    expect(table.locator("thead th")).to_have_text(["", *[r["route"] for r in api["routes"]]])
    for route in api["routes"]:
        for name, value in route.items():
            if name == "route" or name == "finish_reasons":
                continue
            cell = table.locator(f'tr[data-field="{name}"] td[data-route="{route["route"]}"]')
            assert json.loads(cell.get_attribute("data-value") or "") == value, (route["route"], name)
        expect(table.locator(f'tr[data-field="requests"] td[data-route="{route["route"]}"]')).to_have_text(
            str(route["requests"])
        )
        mix = " · ".join(f"{k} {v * 100:.1f}%" for k, v in route["finish_reason_mix"].items())
        expect(table.locator(f'tr[data-field="finish_reason_mix"] td[data-route="{route["route"]}"]')).to_have_text(mix)

    drift = page.locator("table.drift")
    for feature, d in api["drift"].items():
        row = drift.locator(f'tr[data-feature="{feature}"]')
        expect(row).to_have_attribute("data-drifted", "true" if d["drifted"] else "false")
        assert json.loads(row.locator("td").first.get_attribute("data-value") or "") == d["psi"]
    expect(drift.locator('tr[data-feature="prompt_tokens"]')).to_contain_text("drift: PSI above 0.2")
    expect(page.locator(".notice.warning")).to_contain_text("Drift against the baseline: Prompt length (tokens)")
    # latency and finish reasons per version, and one chart per drifting feature's bins
    expect(page.locator(".report .chart canvas")).to_have_count(2 + sum(1 for d in api["drift"].values() if d["bins"]))
    shot(page, "experiments")

    # A preset window (both phases), then one version's requests in the inference log, paged.
    page.get_by_label("Window", exact=True).select_option("900")
    page.get_by_label("Drift baseline").select_option("before")
    summary = page.locator(".report p[data-window]")
    shown = summary.get_attribute("data-window")
    page.get_by_role("button", name="Show report").click()
    expect(summary).not_to_have_attribute("data-window", shown or "")
    cells = table.locator('tr[data-field="requests"] td')
    values = [int(v or 0) for v in cells.evaluate_all("cells => cells.map(c => c.dataset.value)")]
    assert sum(values) == 12, values
    page.get_by_role("link", name="its requests").first.click()
    expect(page.get_by_role("heading", name="Requests")).to_be_visible()
    expect(page.get_by_label("Model")).to_have_value(AB_MODEL)
    first_route = page.get_by_label("Route").input_value()
    expect(page.locator("table.requests tbody tr")).to_have_count(values[0])
    expect(page.locator("table.requests tbody tr").first).to_contain_text(first_route)
    page.get_by_label("Route").fill("")
    page.get_by_label("Per page").select_option("10")
    page.get_by_role("button", name="Apply").click()
    rows = page.locator("table.requests tbody tr")
    expect(rows).to_have_count(10)
    ids = [int(i or 0) for i in rows.evaluate_all("rows => rows.map(r => r.dataset.id)")]
    page.get_by_role("button", name="Older →").click()
    expect(rows).to_have_count(2)
    ids += [int(i or 0) for i in rows.evaluate_all("rows => rows.map(r => r.dataset.id)")]
    expect(page.get_by_role("button", name="Older →")).to_be_disabled()
    log = admin(gw, "GET", f"/admin/requests?model={AB_MODEL}").json()["data"]
    assert ids == [r["id"] for r in log]  # every row once, newest first
    page.get_by_role("button", name="← Newer").click()
    expect(rows).to_have_count(10)
    expect(rows.first).to_have_attribute("data-id", str(ids[0]))
    shot(page, "requests")


def test_console_and_playground_on_the_admin_port(
    browser: Browser, logs_dir: Path, paced_engine: Proc, redis_session: RedisServer
) -> None:
    redis_session.up()
    admin_port = free_port()
    config = {
        "server": {"admin_port": admin_port},
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.url, "timeout": 0.5},
        "auth": {"enabled": True},
        # nothing listens there: the store never opens, and the batches page must say so
        "store": {"url": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"},
        "engines": [{"name": "fake", "kind": "openai", "url": paced_engine.url}],
        "models": [{"name": "fake-chat", "routes": [{"engine": "fake"}]}],
    }
    proc = gateway(logs_dir, config, name="console-admin-port", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    base = f"http://127.0.0.1:{admin_port}"
    try:
        proc.wait_healthy("/ready", timeout=60)
        for path in ("/ui", "/ui/", "/ui/app.js"):
            r = httpx.get(proc.url + path, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found", path
        assert httpx.get(base + "/ui/", timeout=10).status_code == 200
        auth = {"authorization": f"Bearer {ADMIN_KEY}"}
        secret = httpx.post(base + "/admin/keys", json={"name": "admin-port"}, headers=auth, timeout=10).json()["key"]
        for url in (proc.url, base):  # the OpenAI API on both listeners, with the same client keys
            assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
            models = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=10)
            assert [m["id"] for m in models.json()["data"]] == ["fake-chat"]
        with watched_tab(browser, base) as tab:
            tab.goto(base + "/ui/#/playground")
            tab.get_by_label("Client key").fill(secret)
            tab.get_by_role("button", name="Load models").click()
            expect(tab.get_by_label("Model")).to_have_value("fake-chat")
            tab.get_by_label("Message", exact=True).fill("Hello from the admin port")
            tab.get_by_role("button", name="Send").click()
            answer = tab.locator(".msg.assistant").last
            expect(answer).to_have_attribute("data-state", "done")
            expect(answer.locator(".text")).to_have_text("x " * 7 + "x")
            expect(answer.locator(".meta")).to_contain_text("route: v1")
            shot(tab, "playground-admin-port")

            sign_in(tab, base, then="batches")
            expect(tab.get_by_role("alert")).to_contain_text("503 · ")
            expect(tab.get_by_role("alert")).to_contain_text("(store_unavailable)")
            expect(tab.get_by_text("The batches could not be loaded")).to_be_visible()
            shot(tab, "batches-store-unavailable")
            for name in ("Experiments", "Requests"):  # the inference log lives in the store too
                tab.get_by_role("link", name=name, exact=True).click()
                expect(tab.get_by_role("heading", name=name)).to_be_visible()
                expect(tab.get_by_role("alert")).to_contain_text("503 · ")
                expect(tab.get_by_role("alert")).to_contain_text("(store_unavailable)")
    finally:
        proc.stop()


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


def test_playground_speaks_responses_and_messages(page: Page, gw: Proc) -> None:
    created = admin(gw, "POST", "/admin/keys", {"name": "agent-apis"}).json()
    page.goto(gw.url + "/ui/#/playground")
    page.get_by_label("Client key").fill(created["key"])
    page.get_by_role("button", name="Load models").click()
    expect(page.get_by_label("Model")).to_have_value(MODEL)
    page.get_by_label("Max tokens").fill("12")
    spent = 0
    for api, label in (("responses", "Responses"), ("messages", "Messages (Anthropic)")):
        page.get_by_label("API").select_option(label=label)
        page.get_by_label("Message", exact=True).fill("Tell me a story")
        page.get_by_role("button", name="Send").click()
        answer = page.locator(".msg.assistant").last
        expect(answer).to_have_attribute("data-state", "done")
        assert answer.get_attribute("data-api") == api
        assert answer.locator(".text").inner_text()
        usage = json.loads(answer.locator(".meta").get_attribute("data-usage") or "{}")
        assert 0 < usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 0
        spent += usage["prompt_tokens"] + usage["completion_tokens"]
    day = admin(gw, "GET", f"/admin/keys/{created['id']}/usage").json()["day"]
    assert day["requests"] == 2 and day["prompt_tokens"] + day["completion_tokens"] == spent
