"""The inference log's writer (gateway/monitor/writer.py) on a real store, both backends: batches,
a slow or dead store (drops counted, serving never waits), retention; payload capture and
redaction; the finish reason read from a stream's last events; the config it reads."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import pytest

from gateway.core.metrics import GatewayMetrics
from gateway.core.request import CHAT, ApiRequest
from gateway.monitor.payloads import REDACTED, Capture, Redactor, payload_json
from gateway.monitor.writer import InferenceLog, LogEntry
from gateway.proxy.relay import finish_reason_of
from gateway.settings import ConfigError, InferenceLogSettings, ModelSettings, RouteSettings, parse_settings
from gateway.store import RequestFilter, Store
from testkit.poll import eventually_async
from testkit.stores import FakeClock, StoreEnv, sqlite_locked

T0 = 1_800_000_000.0
MODEL = ModelSettings("m", (RouteSettings(("e",), "m"),))


def entry(i: int, t: float = T0, **kw: Any) -> LogEntry:
    fields: dict[str, Any] = {
        "time": t + i,
        "request_id": f"req-{i}".encode(),
        "key_id": "key_a",
        "model": "m",
        "route": "v2" if i % 2 else "v1",
        "engine": "e",
        "status": 200,
        "error_code": None,
        "stream": bool(i % 2),
        "prompt_tokens": 10 + i,
        "completion_tokens": i,
        "ttft": 0.01 if i % 2 else None,
        "duration": 0.5,
        "finish_reason": "stop",
        "client_disconnect": False,
        "batch_id": None,
    }
    fields.update(kw)
    return LogEntry(**fields)


def new_log(**settings: Any) -> InferenceLog:
    return InferenceLog(
        InferenceLogSettings(**settings), (MODEL,), GatewayMetrics(), clock=FakeClock(T0), rng=random.Random(3)
    )


async def rows(store: Store, limit: int = 1000) -> list[str]:
    page = await store.query_requests(RequestFilter(), limit=limit)
    return sorted(r.request_id for r in page.items)


def value(counter: Any) -> float:
    """A counter's value, read through its public collect()."""
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))


def written(store: Store, log: InferenceLog) -> Callable[[], Awaitable[tuple[int, float]]]:
    """Rows in the store, and rows the log has counted as written."""

    async def probe() -> tuple[int, float]:
        return len(await rows(store)), value(log.written)

    return probe


def held_of(log: InferenceLog) -> Callable[[], Awaitable[int]]:
    async def held() -> int:
        return log.held

    return held


def pending_of(log: InferenceLog) -> Callable[[], Awaitable[int]]:
    """The rows the writer has taken and is writing (it has no public count of them)."""

    async def pending() -> int:
        return len(log._pending)

    return pending


def written_of(counter: Any) -> Callable[[], Awaitable[float]]:
    async def read() -> float:
        return value(counter)

    return read


@asynccontextmanager
async def writes_blocked(env: StoreEnv) -> AsyncIterator[None]:
    """Another client holds the log's table: the writer's next write waits, as on a slow store."""
    if env.backend == "sqlite":
        with sqlite_locked(env):
            yield
    else:
        pg = await asyncpg.connect(env.url)
        tx = pg.transaction()
        await tx.start()
        await pg.execute("LOCK TABLE requests IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            await tx.rollback()
            await pg.close()


def test_rows_are_written_in_batches_by_time_or_count(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            log = new_log(flush_interval=0.05)
            log.start(store)
            for i in range(30):
                log.add(entry(i, error_code="upstream_error" if i == 3 else None))
            await eventually_async(lambda: rows(store), lambda got: len(got) == 30)
            got = (await store.query_requests(RequestFilter(), limit=1000)).items
            by_id = {r.request_id: r for r in got}
            r1, r3 = by_id["req-1"], by_id["req-3"]
            assert (r1.time, r1.key_id, r1.route, r1.stream, r1.ttft, r1.prompt_tokens) == (
                T0 + 1,
                "key_a",
                "v2",
                True,
                0.01,
                11,
            )
            assert r3.error_code == "upstream_error" and r1.payload is None
            await log.stop()

            # flush_rows: a full batch goes at once, long before the interval.
            log = new_log(flush_interval=30, flush_rows=10)
            log.start(store)
            for i in range(100, 110):
                log.add(entry(i))
            # the batch is in, and the writer has counted it (just after the write returned)
            await eventually_async(written(store, log), lambda seen: seen == (40, 10), timeout=5)
            await log.stop()

    asyncio.run(main())


def test_a_slow_store_drops_rows_past_the_buffer_and_never_holds_the_caller(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            log = new_log(flush_interval=0.02, flush_rows=5, buffer_size=20)
            log.start(store)
            log.add(entry(0))
            await eventually_async(lambda: rows(store), lambda got: len(got) == 1)
            async with writes_blocked(store_env):
                for i in range(1, 6):
                    log.add(entry(i))
                # the writer has taken them (a full batch wakes it) and is stuck writing
                await eventually_async(pending_of(log), lambda n: n == 5, timeout=10, what="rows being written")
                assert log.held == 5
                started = time.perf_counter()
                for i in range(6, 106):
                    log.add(entry(i))
                assert time.perf_counter() - started < 1.0  # 100 calls, none waited (for a store blocked for good)
                assert log.held == 20 and value(log.dropped) == 85
            # The store is back: everything held is written, nothing else was lost.
            await eventually_async(lambda: rows(store), lambda got: len(got) == 21)
            await eventually_async(held_of(log), lambda n: n == 0, timeout=5, what="rows held once written")
            await log.stop()
            assert value(log.dropped) == 85

    asyncio.run(main())


def test_a_dead_store_keeps_the_batch_for_retry_then_counts_the_rest_at_shutdown(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            log = new_log(flush_interval=0.02, flush_rows=5, buffer_size=10)
            log.start(store)
        # The store is closed under the writer: every write fails.
        for i in range(15):
            log.add(entry(i))
        await eventually_async(written_of(log.write_errors), lambda n: n >= 1, timeout=10, what="a write error")
        assert log.held == 10 and value(log.dropped) == 5
        await log.stop()
        assert log.held == 0 and value(log.dropped) == 15

    asyncio.run(main())


def test_retention_deletes_rows_older_than_the_setting(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            log = new_log(retention_days=1)
            log.start(store)
            day = 86400.0
            for i, age in enumerate((3 * day, 1.5 * day, 0.5 * day, 60.0)):
                log.add(entry(i, t=T0 - age - i))
            assert await log.flush() == 4
            assert await log.trim() == 2
            assert await rows(store) == ["req-2", "req-3"]
            await log.stop()

    asyncio.run(main())


def test_payloads_are_sampled_redacted_and_written_by_the_writer(store_env: StoreEnv) -> None:
    settings = parse_settings(
        {
            "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
            "models": [
                {
                    "name": "m",
                    "routes": [{"engine": "e"}],
                    "log_payloads": {"sample": 1.0, "redact": ["user", r"re:\d{4}-\d{4}"], "max_bytes": 4096},
                },
                {"name": "quiet", "routes": [{"engine": "e"}]},
            ],
            "auth": {"enabled": False},
        },
        env={},
    )
    body = {"model": "m", "user": "alice", "messages": [{"role": "user", "content": "card 1234-5678 please"}]}

    async def main() -> None:
        async with store_env.open() as store:
            log = InferenceLog(settings.inference_log, settings.models, GatewayMetrics(), rng=random.Random(3))
            log.start(store)
            capture = log.capture(ApiRequest(CHAT, "m", body))
            assert capture is not None and log.capture(ApiRequest(CHAT, "quiet", body)) is None
            sent: list[bytes] = []

            async def send(message: Any) -> None:
                sent.append(message.get("body", b""))

            wrapped = capture.wrap(send)
            await wrapped({"type": "http.response.start", "status": 200, "headers": []})
            await wrapped({"type": "http.response.body", "body": b'{"choices": [{"text": "ok 9999-0000"}], "user": 1}'})
            assert sent[-1].startswith(b'{"choices"')  # the client gets the bytes untouched
            log.add(entry(2, capture=capture))  # not a stream
            await log.flush()
            (row,) = (await store.query_requests(RequestFilter(), limit=5)).items
            assert row.payload is not None
            assert orjson.loads(row.payload) == {
                "request": {
                    "model": "m",
                    "user": REDACTED,
                    "messages": [{"role": "user", "content": f"card {REDACTED} please"}],
                },
                "response": {"choices": [{"text": f"ok {REDACTED}"}], "user": REDACTED},
            }
            assert body["user"] == "alice"  # redaction works on a copy
            await log.stop()

    asyncio.run(main())


def test_sampling_share_and_stream_capture_with_a_size_cap() -> None:
    settings = InferenceLogSettings()
    half = ModelSettings(
        "m",
        MODEL.routes,
        log_payloads=parse_settings(
            {
                "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
                "models": [{"name": "m", "routes": [{"engine": "e"}], "log_payloads": {"sample": 0.25}}],
                "auth": {"enabled": False},
            },
            env={},
        )
        .models[0]
        .log_payloads,
    )
    log = InferenceLog(settings, (half,), GatewayMetrics(), rng=random.Random(5))
    sampled = sum(log.capture(ApiRequest(CHAT, "m", {})) is not None for _ in range(4000))
    assert 850 < sampled < 1150

    capture = Capture({"stream": True}, limit=60)  # the second event is cut
    events = [
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
    ]
    capture.add(events[0] + events[1])
    capture.add(b"data: [DONE]\n\n")
    doc = orjson.loads(payload_json(capture, True, Redactor((), ())))
    assert doc["events"] == [{"choices": [{"delta": {"content": "a"}}]}] and doc["truncated"] is True
    whole = Capture({}, limit=1000)
    whole.add(b"not json")
    assert orjson.loads(payload_json(whole, False, Redactor((), ())))["response"] == "not json"


@pytest.mark.parametrize(
    ("blocks", "reason"),
    [
        # finish, usage and [DONE] in one read
        (
            (
                b'data: {"choices":[{"delta":{},"finish_reason":"length"}]}\n\n'
                b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\ndata: [DONE]\n\n',
            ),
            "length",
        ),
        # each in its own read: the finish event is two blocks back
        (
            (
                b"data: [DONE]\n\n",
                b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n',
                b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}]}\n\n',
            ),
            "stop",
        ),
        # n = 2: the last choice to finish; CRLF event ends; a choice still null before it
        (
            (
                b'data: {"choices":[{"index":1,"finish_reason":"stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n',
                b'data: {"choices":[{"index":0,"finish_reason":"length"}]}\n\n',
            ),
            "stop",
        ),
        ((b'data: {"choices":[{"finish_reason":null}]}\n\ndata: [DONE]\n\n', b"", b""), None),
        ((b"data: [DONE]\n\n", b'data: {"finish_reason": broken\n\n', b""), None),
    ],
)
def test_finish_reason_from_the_last_events_of_a_stream(blocks: tuple[bytes, ...], reason: str | None) -> None:
    assert finish_reason_of(blocks) == reason


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ({"inference_log": {"flush_interval": 0}}, "inference_log.flush_interval"),
        ({"inference_log": {"buffer_size": 10, "flush_rows": 100}}, "inference_log.buffer_size"),
        ({"inference_log": {"retention_days": -1}}, "inference_log.retention_days"),
        ({"inference_log": {"colour": 1}}, "inference_log.colour"),
        ({"log_payloads": {"redact": ["x"]}}, "models[0].log_payloads.sample"),
        ({"log_payloads": {"sample": 2}}, "models[0].log_payloads.sample"),
        ({"log_payloads": {"sample": 0.1, "redact": "user"}}, "models[0].log_payloads.redact"),
        ({"log_payloads": {"sample": 0.1, "redact": ["re:("]}}, "models[0].log_payloads.redact[0]"),
        ({"log_payloads": {"sample": 0.1, "every": 1}}, "models[0].log_payloads.every"),
        ({"log_payloads": [0.1]}, "models[0].log_payloads"),
    ],
)
def test_config_errors_name_the_key(section: dict[str, Any], where: str) -> None:
    model: dict[str, Any] = {"name": "m", "routes": [{"engine": "e"}]}
    if "log_payloads" in section:
        model["log_payloads"] = section.pop("log_payloads")
    cfg = {
        "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
        "models": [model],
        "auth": {"enabled": False},
        **section,
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(cfg, "my.yaml", env={})
    assert str(info.value).startswith(f"my.yaml: {where}:"), str(info.value)


def test_config_defaults() -> None:
    s = parse_settings(
        {
            "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:9"}],
            "models": [{"name": "m", "routes": [{"engine": "e"}]}],
            "auth": {"enabled": False},
        },
        env={},
    )
    assert s.inference_log == InferenceLogSettings(True, 0.5, 1000, 20000, 30.0)
    assert s.models[0].log_payloads is None
