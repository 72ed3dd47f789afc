"""The app in-process (httpx's ASGI transport, and hand-driven ASGI calls where a test needs to
hang up mid-stream): request ids, the one error mapping, auth, the relay and the exchange's
bookkeeping. The engine is a real fake-engine process and Redis a real redis-server; only the
gateway's HTTP server is left out, so a failure here points at the app, not at the sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.front.app import build_app
from gateway.front.middleware import Front
from gateway.settings import parse_settings
from testkit.keyed import ADMIN_KEY
from testkit.metrics import metric
from testkit.poll import eventually_async
from testkit.procs import Proc, all_healthy, fake_upstream
from testkit.redis_server import RedisServer

CHUNKS = 3  # the fake engine's answer: 3 tokens (one per chunk), 8 prompt tokens
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    """`ok` answers 3 tokens; `broken` is healthy to health checks and answers 500 to every request;
    `slow` streams 50 chunks over 5 s and aborts a request whose client went away."""
    slow = ["--chunks", "50", "--service-ms", "5000", "--capacity", "4"]
    with all_healthy(
        {
            "ok": fake_upstream(logs_dir, "--model", "fake", "--chunks", str(CHUNKS), name="inproc-engine"),
            "broken": fake_upstream(logs_dir, "--model", "fake", "--fail-status", "500", name="inproc-broken"),
            "slow": fake_upstream(logs_dir, "--model", "fake", *slow, name="inproc-slow"),
        }
    ) as procs:
        yield procs


@pytest.fixture(scope="module")
def engine(engines: dict[str, Proc]) -> Proc:
    return engines["ok"]


@pytest.fixture(scope="module")
def broken(engines: dict[str, Proc]) -> Proc:
    return engines["broken"]


def settings_for(tmp: Path, engine_url: str, redis_url: str | None = None) -> Any:
    config: dict[str, Any] = {
        "health": {"interval": 0.2},
        "store": {"data_dir": str(tmp)},
        "engines": [{"name": "fake", "kind": "openai", "url": engine_url}],
        "models": [
            {"name": "fake", "routes": [{"engine": "fake"}]},
            {"name": "other", "routes": [{"engine": "fake", "model": "fake"}]},
        ],
    }
    if redis_url:
        config["redis"] = {"url": redis_url}
    config["auth"] = {"enabled": redis_url is not None}
    return parse_settings(config, "inprocess.yaml", base_dir=tmp, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})


class Lifespan:
    """Drives an ASGI app's lifespan (startup before the first request, shutdown after the last),
    which httpx's ASGI transport leaves to the caller."""

    def __init__(self, app: Front) -> None:
        self.app = app
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _expect(self, message_type: str) -> None:
        message = await asyncio.wait_for(self.outbox.get(), 30)
        assert message["type"] == message_type, message

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))  # type: ignore[arg-type]
        await self.inbox.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        assert self.task is not None
        await self.task


@contextlib.asynccontextmanager
async def served(settings: Any) -> AsyncIterator[tuple[Front, httpx.AsyncClient]]:
    """The app started, and a client that calls it in-process; once every engine is healthy."""
    app = build_app(settings)
    async with Lifespan(app):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            for _ in range(200):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the engine never became ready")
            yield app, client


async def gauges(client: httpx.AsyncClient) -> tuple[float, float, float]:
    """Requests in flight, streams in flight, and requests this process has at the engine."""
    text = (await client.get("/metrics")).text
    return (
        metric(text, "gateway_requests_in_flight"),
        metric(text, "gateway_streams_in_flight"),
        metric(text, "gateway_engine_outstanding_requests"),
    )


async def back_to_zero(client: httpx.AsyncClient) -> None:
    """Every gauge at zero: the outstanding count is a snapshot the pool takes at each health
    check, so it may show a request for one interval after its end."""
    await eventually_async(lambda: gauges(client), lambda seen: seen == (0, 0, 0), timeout=10, what="gauges at zero")


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    return error


def sse_events(text: str) -> list[Any]:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    return [json.loads(e) for e in events[:-1]]


# --- request ids and the one error mapping ----------------------------------------------------------


def test_request_ids_are_the_clients_when_sane_else_new(tmp_path: Path, engine: Proc) -> None:
    async def go() -> None:
        async with served(settings_for(tmp_path, engine.url)) as (_, client):
            assert (await client.get("/health", headers={"x-request-id": "trace-42"})).headers[
                "x-request-id"
            ] == "trace-42"
            minted = set()
            for bad in ("has space", "x" * 201, ""):
                rid = (await client.get("/health", headers={"x-request-id": bad})).headers["x-request-id"]
                assert re.fullmatch("[0-9a-f]{32}", rid), rid  # a minted one: 32 lowercase hex digits
                minted.add(rid)
            assert len(minted) == 3  # unique
            # errors carry the id too
            r = await client.get("/v1/nowhere", headers={"x-request-id": "trace-43"})
            assert r.headers["x-request-id"] == "trace-43"

    asyncio.run(go())


def test_unknown_routes_methods_models_and_bodies_are_openai_shaped(tmp_path: Path, engine: Proc) -> None:
    async def go() -> None:
        async with served(settings_for(tmp_path, engine.url)) as (_, client):
            r = await client.get("/v1/nowhere")
            assert r.status_code == 404 and error_of(r)["code"] == "route_not_found"
            r = await client.get("/v1/chat/completions")
            assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
            assert "POST" in r.headers["allow"]
            r = await client.post("/v1/chat/completions", json={**BODY, "model": "nope"})
            assert r.status_code in (400, 404) and error_of(r)["code"] == "model_not_found"
            r = await client.post(
                "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
            r = await client.post("/v1/chat/completions", json={**BODY, "max_tokens": "many"})
            assert r.status_code == 400 and "max_tokens" in error_of(r)["message"]
            r = await client.post("/v1/chat/completions", json={"model": "fake"})
            assert r.status_code == 400 and "messages" in error_of(r)["message"]
            await back_to_zero(client)  # none of them reached the engine

    asyncio.run(go())


async def _call_raw(app: Any, scope_extra: dict[str, Any] | None = None) -> list[Message]:
    """One hand-driven HTTP call; the messages the app sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"", **(scope_extra or {})}
    await app(scope, receive, send)
    return sent


def test_a_bug_is_logged_with_its_traceback_and_answered_500_in_our_shape(caplog: pytest.LogCaptureFixture) -> None:
    async def broken_app(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("a bug")

    async def half_sent(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise RuntimeError("a bug mid-stream")

    with caplog.at_level(logging.ERROR, logger="gateway.front.middleware"):
        sent = asyncio.run(_call_raw(Front(broken_app), {"path": "/v1/x"}))
        assert sent[0]["status"] == 500
        assert (b"x-request-id", sent[0]["headers"][-1][1]) in sent[0]["headers"]
        body = json.loads(sent[1]["body"])
        assert body["error"]["code"] == "internal_error" and "a bug" not in sent[1]["body"].decode()
        assert any(r.exc_info and "KeyError" in repr(r.exc_info[1]) for r in caplog.records)
        # once a response has started, no second start: the stream just ends
        sent = asyncio.run(_call_raw(Front(half_sent)))
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


# --- the relay and the exchange's bookkeeping -------------------------------------------------------


def test_whole_answers_and_streams_relay_and_every_gauge_returns_to_zero(tmp_path: Path, engine: Proc) -> None:
    async def go() -> None:
        async with served(settings_for(tmp_path, engine.url)) as (_, client):
            r = await client.post("/v1/chat/completions", json=BODY)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == CHUNKS

            # not asked for usage: the gateway asked the engine for it (to count) and strips it
            r = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.text)
            assert len(events) == CHUNKS and all("usage" not in e or e["usage"] is None for e in events)

            # asked for usage: the client gets the engine's usage chunk
            r = await client.post(
                "/v1/chat/completions", json={**BODY, "stream": True, "stream_options": {"include_usage": True}}
            )
            events = sse_events(r.text)
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == CHUNKS

            text = (await client.get("/metrics")).text
            assert metric(text, "gateway_requests_total") == 3
            assert metric(text, "gateway_prompt_tokens_total") == 3 * 8
            assert metric(text, "gateway_completion_tokens_total") == 3 * CHUNKS
            await back_to_zero(client)

    asyncio.run(go())


def test_an_engine_error_is_openai_shaped_and_leaves_nothing_in_flight(tmp_path: Path, broken: Proc) -> None:
    async def go() -> None:
        async with served(settings_for(tmp_path, broken.url)) as (_, client):
            for stream in (False, True):
                r = await client.post("/v1/chat/completions", json={**BODY, "stream": stream})
                assert r.status_code >= 500 and r.status_code != 500, (r.status_code, r.text)
                assert error_of(r)["code"] == "upstream_error"
            await back_to_zero(client)

    asyncio.run(go())


def test_a_client_that_hangs_up_mid_stream_is_let_go_and_settled(tmp_path: Path, engines: dict[str, Proc]) -> None:
    """Hang up after the first chunk of a slow stream: the exchange ends, its gauges return to zero
    and the engine is told (the fake engine aborts a request whose client went away)."""
    slow = engines["slow"]

    async def go() -> None:
        async with served(settings_for(tmp_path, slow.url)) as (app, client):
            first_chunk = asyncio.Event()
            sent: list[Message] = []
            body = json.dumps({**BODY, "stream": True}).encode()
            delivered = False

            async def receive() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await first_chunk.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                sent.append(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    first_chunk.set()

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/chat/completions",
                "raw_path": b"/v1/chat/completions",
                "query_string": b"",
                "headers": [(b"host", b"gateway"), (b"content-type", b"application/json")],
                "client": ("127.0.0.1", 50001),
                "server": ("127.0.0.1", 80),
            }
            await asyncio.wait_for(app(scope, receive, send), 10)  # well before the 5 s the stream would take
            assert sent[0]["status"] == 200
            await back_to_zero(client)
            async with httpx.AsyncClient() as direct:
                for _ in range(100):  # the engine learns of it over its own connection
                    stats = (await direct.get(slow.url + "/stats")).json()
                    if stats["running"] == 0:
                        break
                    await asyncio.sleep(0.05)
            assert stats["running"] == 0 and stats["served"] == 1

    asyncio.run(go())


# --- auth and quotas --------------------------------------------------------------------------------


def test_keys_are_checked_and_usage_counted_exactly(tmp_path: Path, engine: Proc, redis_server: RedisServer) -> None:
    async def go() -> None:
        async with served(settings_for(tmp_path, engine.url, redis_server.url)) as (_, client):
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            r = await client.post("/admin/keys", json={"name": "inproc", "rpm": 1000}, headers=admin)
            assert r.status_code == 201, r.text
            key_id, secret = r.json()["id"], r.json()["key"]
            other = await client.post("/admin/keys", json={"name": "narrow", "models": ["other"]}, headers=admin)
            narrow = other.json()["key"]

            for headers, status, code in [
                ({}, 401, "missing_api_key"),
                ({"authorization": "Bearer"}, 401, "invalid_api_key"),
                ({"authorization": "Basic abc"}, 401, "invalid_api_key"),
                ({"authorization": "Bearer sk-not-a-key"}, 401, "invalid_api_key"),
                ({"authorization": f"Bearer {narrow}"}, 403, "model_not_allowed"),
                ({"authorization": f"Bearer {secret}"}, 403, "not_admin"),
            ]:
                path = "/admin/keys" if code == "not_admin" else "/v1/chat/completions"
                r = await (
                    client.get(path, headers=headers)
                    if code == "not_admin"
                    else client.post(path, json=BODY, headers=headers)
                )
                assert (r.status_code, error_of(r)["code"]) == (status, code), (headers, r.status_code, r.text)

            mine = {"authorization": f"Bearer {secret}"}
            assert (await client.post("/v1/chat/completions", json=BODY, headers=mine)).status_code == 200
            r = await client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=mine)
            assert r.status_code == 200 and len(sse_events(r.text)) == CHUNKS
            assert "x-ratelimit-remaining-requests" in r.headers

            usage = (await client.get(f"/admin/keys/{key_id}/usage", headers=admin)).json()
            assert usage["day"]["requests"] == 2
            assert usage["day"]["prompt_tokens"] == 2 * 8
            assert usage["day"]["completion_tokens"] == 2 * CHUNKS
            await back_to_zero(client)

    asyncio.run(go())
