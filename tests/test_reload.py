"""Configuration reload on real processes: two gateway replicas (two workers each) on one Redis, in
front of two paced fake engines; a reload under load (streams, whole answers and a batch running)
that adds a model, moves a route's weight, changes a price and lowers a limit fails nothing and
reaches both replicas within a second; a broken file is refused and changes nothing; managed
engines are started and stopped by a reload (and one that cannot start leaves all as it was); a
renewed TLS certificate is served without a restart; the pure parts (what needs a restart, what
is masked, what a version covers) on their own."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from testkit.batch import chat_line, client, jsonl, results, wait_final
from testkit.ci import require
from testkit.keyed import ADMIN_KEY, admin, create_key, usage
from testkit.poll import eventually, eventually_async
from testkit.procs import ROOT, TINY_MODEL, Proc, all_healthy, cpu_engine, fake_upstream, free_port, gateway, running
from testkit.redis_server import RedisServer
from testkit.stores import fresh_database
from testkit.tls import self_signed

MODEL = "chat"
NEW_MODEL = "chat-new"
CHUNKS = 20  # each stream: 20 chunks 100 ms apart, 2 s in all
TOKENS = 8 + CHUNKS  # what the fake engine reports per request (8 prompt tokens)
LONG_PROMPT = "word " * 400


@pytest.fixture(scope="module")
def engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    paced = ("--chunks", str(CHUNKS), "--pace-ms", "100", "--delay-ms", "100")
    procs = {name: fake_upstream(logs_dir, *paced, name=f"reload-{name}") for name in ("a", "b")}
    with all_healthy(procs):
        yield procs


def config(
    engines: dict[str, Proc],
    redis: RedisServer | None,
    store: dict[str, str] | None = None,
    *,
    weights: tuple[float, float] = (1, 0),
    price: float = 1.0,
    new_model: bool = False,
    max_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    chat: dict[str, Any] = {
        "name": MODEL,
        "routes": [
            {"engine": "a", "name": "v1", "weight": weights[0]},
            {"engine": "b", "name": "v2", "weight": weights[1]},
        ],
    }
    if max_prompt_tokens is not None:
        chat["max_prompt_tokens"] = max_prompt_tokens
    models = [chat, *([{"name": NEW_MODEL, "routes": [{"engine": "b"}]}] if new_model else [])]
    cfg: dict[str, Any] = {
        "health": {"interval": 0.3},
        "auth": {"enabled": redis is not None, "default_max_tokens": 32},
        "batch": {"poll_interval": 0.2, "concurrency": 2},
        "engines": [{"name": name, "kind": "openai", "url": proc.url} for name, proc in engines.items()],
        "models": models,
        "pricing": {"currency": "USD", "models": {MODEL: {"input": price, "output": price}}},
    }
    if redis is not None:
        cfg["redis"] = {"url": redis.url, "timeout": 0.5}
    if store is not None:
        cfg["store"] = store
    return cfg


def config_file(gw: Proc) -> Path:
    return Path(gw.args[gw.args.index("--config") + 1])


def rewrite(gw: Proc, cfg: dict[str, Any]) -> None:
    """The gateway's file, with `cfg` in place of its sections (its store kept, unless `cfg` has one)."""
    path = config_file(gw)
    store = yaml.safe_load(path.read_text()).get("store")
    path.write_text(yaml.safe_dump({"store": store, **cfg}))


def running_version(gw: Proc) -> str:
    r = admin(gw, "GET", "/admin/config")
    assert r.status_code == 200, r.text
    return str(r.json()["version"])


def versions_seen(gw: Proc, tries: int = 6) -> set[str]:
    """The versions its workers answer with (each call on a new connection: any worker takes it)."""
    return {running_version(gw) for _ in range(tries)}


async def versions_now(http: httpx.AsyncClient, gw: Proc, tries: int = 6) -> set[str]:
    """`versions_seen` in one round trip: the calls at once, each on a connection of its own."""
    headers = {**_bearer(ADMIN_KEY), "connection": "close"}
    calls = [http.get(gw.url + "/admin/config", headers=headers) for _ in range(tries)]
    return {r.json()["version"] for r in await asyncio.gather(*calls)}


def reload(gw: Proc) -> httpx.Response:
    return admin(gw, "POST", "/admin/reload")


@pytest.fixture(scope="module")
def store() -> Iterator[dict[str, str]]:
    """One PostgreSQL database for both replicas, as replicas share one: their files are the same."""
    with fresh_database("gateway_reload") as url:
        yield {"url": url}


@pytest.fixture(scope="module")
def replicas(
    logs_dir: Path, redis_session: RedisServer, engines: dict[str, Proc], store: dict[str, str]
) -> Iterator[list[Proc]]:
    redis_session.fresh()
    cfg = config(engines, redis_session, store)
    procs = [
        gateway(logs_dir, cfg, name=f"reload-{i}", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}, workers=2) for i in range(2)
    ]
    with all_healthy({p.name: p for p in procs}):
        for p in procs:
            p.wait_healthy("/ready", timeout=60)
        yield procs


@pytest.fixture
def gws(
    replicas: list[Proc], engines: dict[str, Proc], redis_session: RedisServer, store: dict[str, str]
) -> Iterator[list[Proc]]:
    """Both replicas on the first configuration; put back after the test."""
    yield replicas
    for gw in replicas:
        rewrite(gw, config(engines, redis_session, store))
    assert reload(replicas[0]).status_code == 200
    eventually(lambda: {v for gw in replicas for v in versions_seen(gw)}, lambda seen: len(seen) == 1, timeout=10)


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What the load saw: every answer, and every stream's route and ending."""

    failures: list[str] = field(default_factory=list)
    answers: list[tuple[float, str]] = field(default_factory=list)  # (started at, route) of whole answers
    streams: list[tuple[float, str]] = field(default_factory=list)  # (started at, route) of finished streams


async def streams(url: str, secret: str, seen: Seen, stop: asyncio.Event) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(timeout=60) as c:
        while not stop.is_set():
            began = time.monotonic()
            try:
                async with c.stream("POST", url + "/v1/chat/completions", json=body, headers=_bearer(secret)) as r:
                    text = (await r.aread()).decode()
                    route = r.headers.get("x-gateway-route", "")
            except httpx.HTTPError as exc:
                seen.failures.append(f"stream: {exc!r}")
                continue
            if r.status_code != 200 or not text.rstrip().endswith("data: [DONE]") or '"error"' in text:
                seen.failures.append(f"stream: {r.status_code} {text[-300:]}")
            else:
                seen.streams.append((began, route))


async def answers(url: str, secret: str, seen: Seen, stop: asyncio.Event) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=60) as c:
        while not stop.is_set():
            began = time.monotonic()
            try:
                r = await c.post(url + "/v1/chat/completions", json=body, headers=_bearer(secret))
            except httpx.HTTPError as exc:
                seen.failures.append(f"answer: {exc!r}")
                continue
            if r.status_code != 200:
                seen.failures.append(f"answer: {r.status_code} {r.text[:300]}")
            else:
                seen.answers.append((began, r.headers["x-gateway-route"]))


def _bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def chat(gw: Proc, secret: str, model: str = MODEL, content: str = "hi", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=_bearer(secret), timeout=30)


def spend(gw: Proc, key_id: str) -> float:
    return float(usage(gw, key_id)["day"]["spend"])


# -- the tests -----------------------------------------------------------------------------------


def test_a_reload_under_load_fails_nothing_and_reaches_both_replicas_within_a_second(
    gws: list[Proc], engines: dict[str, Proc], redis_session: RedisServer, store: dict[str, str]
) -> None:
    _, secret = create_key(gws[0])
    before_id, before_secret = create_key(gws[0])  # one stream that starts before the reload
    after_ids = [create_key(gws[0]) for _ in gws]  # one request each, after it
    limited_id, limited = create_key(gws[0], rpm=100)
    first = running_version(gws[0])
    assert versions_seen(gws[1]) == {first}

    # a batch of whole answers that runs across the reload
    c = client(gws[0], secret)
    lines = [chat_line(f"line-{i}", "hi", model=MODEL) for i in range(30)]
    batch = c.batches.create(
        input_file_id=c.files.create(file=("b.jsonl", jsonl(lines)), purpose="batch").id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )

    async def run() -> tuple[Seen, float, float]:
        seen, stop = Seen(), asyncio.Event()
        load = [
            *(asyncio.create_task(streams(gw.url, secret, seen, stop)) for gw in gws for _ in range(2)),
            *(asyncio.create_task(answers(gw.url, secret, seen, stop)) for gw in gws for _ in range(2)),
        ]
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with http.stream(
                "POST", gws[1].url + "/v1/chat/completions", json=body, headers=_bearer(before_secret)
            ) as early:
                chunks = early.aiter_bytes()
                await anext(chunks)  # it is being relayed on the first configuration
                await asyncio.sleep(0.5)  # the load runs on the first configuration too
                for gw in gws:  # each replica reads its own file: the same new one
                    new = config(engines, redis_session, store, weights=(0, 1), price=1000.0, new_model=True)
                    rewrite(gw, {**new, "models": [{**new["models"][0], "max_prompt_tokens": 64}, new["models"][1]]})
                asked = time.monotonic()
                r = await asyncio.to_thread(reload, gws[0])
                answered = time.monotonic()
                assert r.status_code == 200, r.text
                outcome = r.json()
                assert outcome["status"] == "reloaded" and outcome["previous"] == first, outcome
                assert set(outcome["changed"]) == {"models", "pricing"}, outcome
                # the other replica heard of it through Redis and reloaded its own file
                await eventually_async(
                    lambda: versions_now(http, gws[1]),
                    lambda seen_versions: seen_versions == {outcome["version"]},
                    timeout=1.0,
                    interval=0.02,
                    what="the second replica on the new version",
                )
                reached = time.monotonic() - answered
                rest = b"".join([chunk async for chunk in chunks])
                assert early.status_code == 200 and rest.rstrip().endswith(b"data: [DONE]"), rest[-300:]
                assert early.headers["x-gateway-route"] == "v1"  # its route, as assigned when it started
            await asyncio.sleep(2.5)  # a whole stream's length on the new configuration
            stop.set()
            await asyncio.gather(*load)
        return seen, answered - asked, reached

    seen, took, reached = asyncio.run(run())
    print(f"reload answered in {took:.3f}s; the other replica followed {reached:.3f}s later")
    assert not seen.failures, seen.failures[:5]
    assert len(seen.streams) >= 8 and len(seen.answers) >= 20, (len(seen.streams), len(seen.answers))
    assert {route for _, route in seen.streams + seen.answers} == {"v1", "v2"}  # both configurations served

    # new requests see the new configuration on both replicas
    version = running_version(gws[0])
    for gw, (key_id, fresh) in zip(gws, after_ids, strict=True):
        assert versions_seen(gw) == {version}
        assert {chat(gw, fresh).headers["x-gateway-route"] for _ in range(5)} == {"v2"}  # the weight moved
        assert spend(gw, key_id) == pytest.approx(5 * TOKENS * 1000.0 / 1e6)  # the new price
        assert chat(gw, fresh, NEW_MODEL).status_code == 200  # the model added
        long = chat(gw, fresh, content=LONG_PROMPT)  # the limit lowered
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded", long.text
    # the stream that started before the reload was charged the price it started with
    assert spend(gws[1], before_id) == pytest.approx(TOKENS * 1.0 / 1e6)

    # a key's own limits live in Redis (the admin API), not in the file: lowered meanwhile, too
    assert chat(gws[0], limited).status_code == 200
    assert admin(gws[0], "PATCH", f"/admin/keys/{limited_id}", {"rpm": 1}).status_code == 200
    refused = chat(gws[1], limited)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rpm_exceeded", refused.text

    done = wait_final(c, batch.id, timeout=120)
    assert done.status == "completed" and done.request_counts.failed == 0, done.request_counts
    outputs, errors = results(c, done)
    assert len(outputs) == len(lines) and not errors

    # the replaced configuration is let go once nothing uses it, on every worker
    for gw in gws:
        eventually(lambda gw=gw: gw.log_path.read_text().count(f"configuration {first} let go"), lambda n: n >= 2)


def test_a_broken_file_is_refused_with_the_start_message_and_changes_nothing(
    gws: list[Proc], engines: dict[str, Proc], redis_session: RedisServer, store: dict[str, str]
) -> None:
    _, secret = create_key(gws[0])
    first = running_version(gws[0])
    path = config_file(gws[0])
    good = path.read_text()
    broken = config(engines, redis_session, store, new_model=True)
    broken["models"] = [*broken["models"], {"name": "ghost", "routes": [{"engine": "nowhere"}]}]
    for text in ("models: [\n", yaml.safe_dump(broken)):
        path.write_text(text)
        check = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert check.returncode == 2
        said_at_start = check.stderr.strip().removeprefix("llm-gateway: ")
        r = reload(gws[0])
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_config" and said_at_start in error["message"], (error, said_at_start)
        assert f"(version {first}) stays" in error["message"]
        # SIGHUP says the same in the log, and changes nothing either
        os.kill(gws[0].proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        line = said_at_start.splitlines()[0]
        eventually(lambda line=line: gws[0].log_tail(60).count(line), lambda n: n >= 2, timeout=10)
        for gw in gws:
            assert versions_seen(gw) == {first}
            assert chat(gw, secret).status_code == 200
            assert chat(gw, secret, NEW_MODEL).status_code == 404  # the broken file's model is not there

    # what only a restart can change is listed, and refused
    path.write_text(yaml.safe_dump({**yaml.safe_load(good), "server": {"admin_port": free_port()}}))
    r = reload(gws[0])
    assert r.status_code == 409 and r.json()["error"]["code"] == "restart_required", r.text
    assert "server.admin_port: unset -> " in r.json()["error"]["message"]
    assert versions_seen(gws[0]) == {first}

    path.write_text(good)
    r = reload(gws[0])
    assert r.status_code == 200 and r.json() == {**r.json(), "status": "unchanged", "version": first}


def test_reloads_at_once_run_one_after_the_other(
    gws: list[Proc], engines: dict[str, Proc], redis_session: RedisServer, store: dict[str, str]
) -> None:
    first = running_version(gws[0])
    for gw in gws:
        rewrite(gw, config(engines, redis_session, store, new_model=True))

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=_bearer(ADMIN_KEY)) as http:
            return list(await asyncio.gather(*(http.post(gw.url + "/admin/reload") for gw in [*gws, *gws])))

    outcomes = [r.json() for r in asyncio.run(together())]
    assert all(o.get("status") in ("reloaded", "unchanged") for o in outcomes), outcomes
    assert len({o["version"] for o in outcomes}) == 1 and first not in {o["version"] for o in outcomes}
    assert [o["status"] for o in outcomes].count("reloaded") <= 2  # at most once per replica
    for gw in gws:
        assert versions_seen(gw) == {outcomes[0]["version"]}


def test_the_config_is_shown_with_secrets_masked(gws: list[Proc]) -> None:
    r = admin(gws[0], "GET", "/admin/config")
    body = r.json()
    assert set(body) == {"version", "loaded_at", "previous", "reloads", "source", "config"}
    assert body["config"]["auth"]["admin_key"] == "***" and ADMIN_KEY not in r.text
    assert body["config"]["models"][0]["name"] == MODEL
    _, secret = create_key(gws[0])
    refused = admin(gws[0], "POST", "/admin/reload", key=secret)  # a client key is no admin
    assert refused.status_code == 403


# -- managed engines, without Redis ---------------------------------------------------------------


def test_a_reload_starts_and_stops_managed_engines_and_undoes_a_failed_start(
    logs_dir: Path, engines: dict[str, Proc]
) -> None:
    require((TINY_MODEL / "config.json").exists(), f"tiny model missing at {TINY_MODEL}")
    base = config(engines, None)
    gw = gateway(logs_dir, base, name="reload-managed", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    port, bad_port = free_port(), free_port()
    with running(gw, "/ready", timeout=60):
        # logging changes live: Server-Timing turned on
        assert "server-timing" not in chat_open(gw).headers
        rewrite(gw, {**base, "logging": {"server_timing": True}})
        assert reload(gw).json()["changed"] == ["logging"]
        assert "upstream;dur=" in chat_open(gw).headers["server-timing"]
        first = running_version(gw)
        tiny = {"name": "tiny", "routes": [{"engine": "cpu-0", "model": "tiny"}]}
        engine = cpu_engine("cpu-0", port, "--served-model-name", "tiny")
        rewrite(gw, {**base, "engines": [*base["engines"], engine], "models": [*base["models"], tiny]})
        r = reload(gw)  # answers once the engine is up and every worker serves the new configuration
        assert r.status_code == 200 and r.json()["status"] == "reloaded", r.text
        answer = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        pid = engine_pid(gw, port)

        # an engine that cannot start: the reload fails, and takes back what it started
        broken = {**cpu_engine("cpu-bad", bad_port, "--no-such-flag"), "max_restarts_per_minute": 1}
        rewrite(gw, {**base, "engines": [*base["engines"], engine, broken], "models": [*base["models"], tiny]})
        r = reload(gw)
        assert r.status_code == 503 and r.json()["error"]["code"] == "reload_failed", r.text
        assert "engine cpu-bad did not start" in r.json()["error"]["message"]
        assert running_version(gw) != first and engine_pid(gw, bad_port) is None
        assert httpx.get(gw.url + "/ready?model=tiny", timeout=5).status_code == 200

        # dropped from the file: stopped once nothing runs there
        rewrite(gw, base)
        assert reload(gw).json()["status"] == "reloaded"
        eventually(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=30, what="the dropped engine stopped")  # fmt: skip
        assert httpx.get(gw.url + "/ready?model=tiny", timeout=5).status_code == 404


def chat_open(gw: Proc) -> httpx.Response:
    """A chat request to a gateway with auth off."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r


def engine_pid(gw: Proc, port: int) -> int | None:
    assert gw.proc is not None
    for child in psutil.Process(gw.proc.pid).children(recursive=True):
        try:
            if str(port) in child.cmdline():
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


def test_a_process_without_a_main_process_reloads_itself(
    tmp_path: Path, engines: dict[str, Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app under another ASGI server (here Starlette's test client): the admin API reloads
    the file in the process itself."""
    from starlette.testclient import TestClient

    from gateway.front.app import build_app
    from gateway.settings.source import ConfigSource

    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN_KEY)
    path = tmp_path / "gateway.yaml"
    store = {"url": "sqlite:///gateway.db", "data_dir": str(tmp_path)}
    path.write_text(yaml.safe_dump(config(engines, None, store)))
    source = ConfigSource(str(path))
    loaded = source.load()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(build_app(loaded.settings, source=source, version=loaded.version)) as http:
        eventually(lambda: http.get("/ready").status_code == 200)
        assert http.post("/v1/chat/completions", json={**body, "model": NEW_MODEL}).status_code == 404
        path.write_text(yaml.safe_dump(config(engines, None, store, new_model=True)))
        r = http.post("/admin/reload", headers=_bearer(ADMIN_KEY))
        assert r.status_code == 200 and r.json()["status"] == "reloaded" and r.json()["previous"] == loaded.version
        assert http.post("/v1/chat/completions", json={**body, "model": NEW_MODEL}).status_code == 200
        assert http.get("/admin/config", headers=_bearer(ADMIN_KEY)).json()["version"] == r.json()["version"]
        path.write_text("models: [\n")
        refused = http.post("/admin/reload", headers=_bearer(ADMIN_KEY))
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_config"
        assert http.post("/v1/chat/completions", json={**body, "model": NEW_MODEL}).status_code == 200


def test_a_renewed_certificate_is_served_without_a_restart(
    logs_dir: Path, tmp_path: Path, engines: dict[str, Proc]
) -> None:
    cert, key = self_signed(tmp_path, "first")
    cfg = {**config(engines, None), "server": {"tls": {"cert": str(cert), "key": str(key)}}}
    gw = gateway(logs_dir, cfg, name="reload-tls", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    https = f"https://127.0.0.1:{gw.port}"
    gw.start()
    try:
        eventually(lambda: httpx.get(https + "/ready", verify=False, timeout=2).status_code, lambda s: s == 200)
        assert served_name(gw.port) == "first"
        with httpx.Client(verify=False, timeout=10) as kept:  # a connection opened before the renewal
            assert kept.get(https + "/health").status_code == 200
            self_signed(tmp_path, "second")  # certbot's way: new files under the same paths
            os.kill(gw.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
            eventually(lambda: served_name(gw.port), lambda name: name == "second", timeout=10)
            assert kept.get(https + "/health").status_code == 200
        config_body = httpx.get(https + "/admin/config", headers=_bearer(ADMIN_KEY), verify=False).json()
        assert config_body["reloads"] == 1 and config_body["config"]["server"]["tls"]["cert"] == str(cert)
    finally:
        gw.stop()


def served_name(port: int) -> str:
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    names = x509.load_pem_x509_certificate(pem.encode()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value)


# -- the pure parts --------------------------------------------------------------------------------


def small(**sections: Any) -> dict[str, Any]:
    return {
        "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
        "models": [{"name": "m", "routes": [{"engine": "e"}]}],
        "auth": {"enabled": False},
        **sections,
    }


def test_what_needs_a_restart_is_listed_and_the_rest_is_not() -> None:
    from gateway.settings import parse_settings
    from gateway.settings.changes import changed_sections, restart_needed

    managed = {"name": "cpu-0", "kind": "cpu", "model": str(TINY_MODEL), "port": 8101}
    old = parse_settings(small(engines=[managed, *small()["engines"]]), env={})
    live = small(
        engines=[{**managed, "idle_stop": 60}, *small()["engines"]],
        models=[{"name": "m", "routes": [{"engine": "e", "weight": 3}]}, {"name": "n", "routes": [{"engine": "e"}]}],
        pricing={"models": {"m": {"input": 1, "output": 2}}},
        server={"max_connections": 10, "first_byte_timeout": 5},
    )
    new = parse_settings(live, env={})
    assert restart_needed(old, new) == []
    assert changed_sections(old, new) == ["server", "engines", "models", "pricing"]
    moved = parse_settings(
        {
            **small(engines=[{**managed, "args": ["--threads", "2"]}, *small()["engines"]]),
            "server": {"port": 9000, "admin_port": 9001},
            "redis": {"url": "redis://127.0.0.1:1/0"},
        },
        env={},
    )
    assert restart_needed(old, moved) == [
        "server.port: 8080 -> 9000",
        "server.admin_port: unset -> 9001",
        "redis.url: changed (keys, quotas and reload announcements live there)",
        "engines cpu-0: a managed engine's launch settings changed (args); to replace it without a restart, "
        "give the new one another name and port",
    ]


def test_secrets_are_masked_and_their_presence_shown() -> None:
    from gateway.settings import parse_settings
    from gateway.settings.masked import masked

    env = {"GATEWAY_ADMIN_KEY": "s3cret-admin", "ENGINE_KEY": "s3cret-engine", "GATEWAY_REDIS_URL": "redis://:pw@h:1/0"}
    engine = {"name": "e", "kind": "openai", "url": "http://127.0.0.1:9", "api_key_env": "ENGINE_KEY"}
    tracing = {"endpoint": "http://127.0.0.1:4318/v1/traces", "headers": {"authorization": "Bearer s3cret-otel"}}
    shown = masked(parse_settings(small(engines=[engine], tracing=tracing), env=env))
    text = repr(shown)
    assert "s3cret" not in text and ":pw@" not in text
    assert shown["auth"]["admin_key"] == "***" and shown["engines"][0]["api_key"] == "***"
    assert shown["tracing"]["headers"] == {"authorization": "***"}
    assert shown["redis"]["url"] == "redis://:***@h:1/0"
    assert shown["auth"]["oidc"] is None and shown["models"][0]["routes"][0]["engines"] == ["e"]


def test_a_version_covers_the_file_and_the_certificate_it_names(tmp_path: Path) -> None:
    from gateway.settings import ConfigError
    from gateway.settings.source import ConfigSource

    cert, key = self_signed(tmp_path, "one")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(small(server={"tls": {"cert": str(cert), "key": str(key)}})))
    source = ConfigSource(str(path), port=8443)
    first = source.load()
    assert first.settings.server.port == 8443 and source.load().version == first.version
    self_signed(tmp_path, "two")  # renewed under the same paths
    assert source.load().version != first.version
    with pytest.raises(ConfigError, match=r"--port 8443 is also server\.admin_port"):
        ConfigSource(str(path), port=8443).parse(yaml.safe_dump(small(server={"admin_port": 8443})))
    key.write_text(key.read_text().replace("A", "B", 3))  # a key that is not the certificate's
    with pytest.raises(ConfigError, match=r"server\.tls: cannot load"):
        source.load()
