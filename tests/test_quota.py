from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.crc import key_slot

import gateway.access.quota
from gateway.access.key_fields import validate_key_fields
from gateway.access.keys import ApiKey, KeyStore
from gateway.access.local_limiter import LocalLimiter
from gateway.access.quota import Admission, Quota
from gateway.access.quota_windows import reset_after, window
from gateway.core.errors import GatewayError
from gateway.resp.client import RespClient
from testkit.redis_server import RedisServer

Body = Callable[[KeyStore, Quota, aioredis.Redis], Awaitable[Any]]
T = datetime(2030, 1, 15, 12, 0, 10, tzinfo=UTC).timestamp()  # 50 s before the minute turns
MODEL = "tiny"


# Generous by default: CI machines are shared and noisy. The fault tests pass a short one.
TIMEOUT = 1.0


def connect(server: RedisServer, decode: bool = False, timeout: float = TIMEOUT) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        server.url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=decode
    )


def run(server: RedisServer, body: Body, *, decode: bool = False, timeout: float = TIMEOUT, **quota_kw: Any) -> Any:
    async def main() -> Any:
        client = connect(server, decode, timeout)
        resp = RespClient(server.url, timeout)  # the client the request path uses
        try:
            return await body(KeyStore(client), Quota(resp, redis_timeout=timeout, **quota_kw), client)
        finally:
            await client.aclose()
            await resp.close()

    return asyncio.run(main())


async def new_key(store: KeyStore, **limits: Any) -> ApiKey:
    key, _ = await store.create(validate_key_fields({"name": "t", **limits}, partial=False))
    return key


async def refused(awaitable: Awaitable[Any]) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        await awaitable
    return err.value


async def restart(server: RedisServer, client: aioredis.Redis, saved: dict[Any, Any]) -> None:
    """Restart the killed server (it has no persistence) and put the saved records back."""
    server.start()
    for name, record in saved.items():
        for attempt in range(3):  # the client's pooled connection died with the old server
            try:
                await client.hset(name, mapping=record)
                break
            except redis.exceptions.ConnectionError:
                if attempt == 2:
                    raise


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.012, "12ms"), (1, "1s"), (1.5, "1.5s"), (50, "50s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_after(seconds: float, text: str) -> None:
    assert reset_after(seconds) == text


def test_key_refusals(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, models=[MODEL])
        assert (await quota.admit(key, MODEL, 10)).headers == {}  # no rpm/tpm: no rate-limit headers
        err = await refused(quota.admit(key, "other", 10))
        assert (err.status, err.code, err.type) == (403, "model_not_allowed", "permission_error")

        expired = await new_key(store, expires_at=time.time() + 0.2)
        await quota.admit(expired, MODEL, 1)
        err = await refused(quota.admit(expired, MODEL, 1, now=time.time() + 1))
        assert (err.status, err.code) == (401, "invalid_api_key") and "expired" in err.message

        await store.revoke(key.id)
        err = await refused(quota.admit(key, MODEL, 10))  # the stale `key` object does not matter
        assert (err.status, err.code) == (401, "invalid_api_key") and "revoked" in err.message

        ghost = ApiKey(id="key_0000000000000000", name="ghost")
        assert (await refused(quota.admit(ghost, MODEL, 1))).status == 401

    run(redis_server, body)


def test_rpm_boundary(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, rpm=3)
        for remaining in (2, 1, 0):
            adm = await quota.admit(key, MODEL, 5, now=T)
            assert adm.headers == {
                "x-ratelimit-limit-requests": "3",
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": "50s",
            }
        err = await refused(quota.admit(key, MODEL, 5, now=T))
        assert (err.status, err.code, err.type) == (429, "rpm_exceeded", "rate_limit_exceeded")
        assert err.headers["retry-after"] == "50" and err.headers["x-ratelimit-remaining-requests"] == "0"
        assert (await quota.admit(key, MODEL, 5, now=T + 50)).minute == window(T).minute + 1

    run(redis_server, body)


def test_tpm_boundary_with_reservations(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, tpm=100)
        first = await quota.admit(key, MODEL, 60, now=T)
        second = await quota.admit(key, MODEL, 40, now=T)  # exactly at the limit
        assert second.headers["x-ratelimit-remaining-tokens"] == "0" and "x-ratelimit-limit-requests" not in (
            second.headers
        )
        err = await refused(quota.admit(key, MODEL, 1, now=T))
        assert (err.status, err.code, err.headers["retry-after"]) == (429, "tpm_exceeded", "50")
        await quota.release(first, 5, 5)  # the unused 50 go back to the window
        await quota.admit(key, MODEL, 50, now=T)
        err = await refused(quota.admit(key, MODEL, 101, now=T + 60))  # alone over the limit: never admitted
        assert err.code == "tpm_exceeded" and "never fit" in err.message

    run(redis_server, body)


def test_concurrency_boundary(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, max_concurrent=2)
        first = await quota.admit(key, MODEL, 1)
        await quota.admit(key, MODEL, 1)
        err = await refused(quota.admit(key, MODEL, 1))
        assert (err.status, err.code, err.headers["retry-after"]) == (429, "concurrency_exceeded", "1")
        await quota.release(first, 1, 0)
        await quota.admit(key, MODEL, 1)

    run(redis_server, body)


def test_daily_tokens_boundary(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, daily_tokens=100)
        late = datetime(2030, 1, 15, 23, 59, 0, tzinfo=UTC).timestamp()
        await quota.admit(key, MODEL, 100, now=late)
        err = await refused(quota.admit(key, MODEL, 1, now=late))
        assert (err.status, err.code, err.type) == (429, "daily_tokens_exceeded", "insufficient_quota")
        assert err.headers["retry-after"] == "60"  # until midnight UTC
        adm = await quota.admit(key, MODEL, 100, now=late + 60)
        assert adm.day == "2030-01-16"
        assert (await refused(quota.admit(key, MODEL, 101, now=late + 86400))).code == "daily_tokens_exceeded"

    run(redis_server, body)


def test_monthly_tokens_boundary(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, monthly_tokens=100, daily_tokens=1000)
        late = datetime(2030, 1, 31, 23, 0, 0, tzinfo=UTC).timestamp()
        await quota.admit(key, MODEL, 70, now=late - 86400)
        await quota.admit(key, MODEL, 30, now=late)
        err = await refused(quota.admit(key, MODEL, 1, now=late))
        assert (err.code, err.type, err.headers["retry-after"]) == (
            "monthly_tokens_exceeded",
            "insufficient_quota",
            "3600",
        )
        assert (await quota.admit(key, MODEL, 100, now=late + 3600)).month == "2030-02"

    run(redis_server, body)


def test_concurrent_admissions_never_overspend(redis_server: RedisServer) -> None:
    """50 admissions at once from two replicas against a 500-token day."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, daily_tokens=500)
        other = RespClient(redis_server.url, TIMEOUT)
        replicas = [quota, Quota(other, redis_timeout=TIMEOUT)]
        rng = random.Random(7)
        try:
            results = await asyncio.gather(
                *(replicas[i % 2].admit(key, MODEL, rng.randint(10, 60)) for i in range(50)),
                return_exceptions=True,
            )
            admitted = [r for r in results if isinstance(r, Admission)]
            refusals = [r for r in results if not isinstance(r, Admission)]
            assert refusals and all(isinstance(e, GatewayError) and e.code == "daily_tokens_exceeded" for e in refusals)
            assert sum(a.reserved for a in admitted) <= 500
            usage = [(rng.randint(0, a.reserved // 2), rng.randint(0, a.reserved // 2)) for a in admitted]
            await asyncio.gather(*(quota.release(a, p, c) for a, (p, c) in zip(admitted, usage, strict=True)))
        finally:
            await other.close()
        figures = await quota.usage(key.id)
        assert figures["day"]["tokens"] == sum(p + c for p, c in usage)
        assert figures["day"]["prompt_tokens"] == sum(p for p, _ in usage)
        assert figures["day"]["completion_tokens"] == sum(c for _, c in usage)
        assert figures["day"]["requests"] == figures["month"]["requests"] == len(admitted)

    run(redis_server, body)


def test_release_is_idempotent_and_so_is_admit(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, max_concurrent=5)
        adm = await quota.admit(key, MODEL, 50, now=T)
        for _ in range(3):
            await quota.release(adm, 10, 20)
        usage = await quota.usage(key.id, now=T)
        assert usage["day"] == {
            "date": "2030-01-15",
            "requests": 1,
            "tokens": 30,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "spend": 0.0,  # no price for this model
        }
        assert usage["minute"] == {"requests": 1, "tokens": 30}

        # a client-side retry of an admission that already ran (same lease) reserves nothing more
        monkeypatch.setattr(gateway.access.quota, "_lease_numbers", itertools.repeat(7))
        await quota.admit(key, MODEL, 50, now=T)
        await quota.admit(key, MODEL, 50, now=T)
        assert (await quota.usage(key.id, now=T))["minute"] == {"requests": 2, "tokens": 80}

    run(redis_server, body)


def test_lease_expiry_frees_the_slot(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, max_concurrent=1)
        crashed = await quota.admit(key, MODEL, 20)
        assert (await refused(quota.admit(key, MODEL, 20))).code == "concurrency_exceeded"
        await asyncio.sleep(0.35)
        second = await quota.admit(key, MODEL, 20)
        await quota.release(crashed, 4, 6)  # a late release of an expired lease still reconciles
        await quota.release(second, 1, 1)
        day = (await quota.usage(key.id))["day"]
        assert (day["prompt_tokens"], day["completion_tokens"], day["tokens"]) == (5, 7, 12)

    run(redis_server, body, lease_ttl=0.3)


def test_refresh_keeps_a_long_lease(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, max_concurrent=1)
        stream = await quota.admit(key, MODEL, 20)
        for _ in range(5):  # 0.5 s in all, past lease_ttl; refreshed every lease_ttl / 3
            await asyncio.sleep(0.1)
            await quota.refresh_leases([stream])
        assert (await refused(quota.admit(key, MODEL, 20))).code == "concurrency_exceeded"
        await quota.release(stream, 1, 1)
        await quota.refresh_leases([stream])  # must not revive a released lease
        assert await client.zcard(f"gw:{{{key.id}}}:leases") == 0
        await quota.admit(key, MODEL, 20)

    run(redis_server, body, lease_ttl=0.3)


def test_admin_changes_apply_to_the_next_admit(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, rpm=1)
        await quota.admit(key, MODEL, 1, now=T)
        assert (await refused(quota.admit(key, MODEL, 1, now=T))).code == "rpm_exceeded"
        await store.update(key.id, validate_key_fields({"rpm": 2}, partial=True))
        adm = await quota.admit(key, MODEL, 1, now=T)  # `key` still says rpm=1: Redis wins
        assert adm.headers["x-ratelimit-limit-requests"] == "2"
        await store.update(key.id, {"rpm": None, "models": ("other",)})
        assert (await refused(quota.admit(key, MODEL, 1, now=T))).code == "model_not_allowed"

    run(redis_server, body)


def test_usage_sums_what_was_released(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store)
        empty = await quota.usage(key.id, now=T)
        assert empty["id"] == key.id and empty["month"] == {
            "month": "2030-01",
            "requests": 0,
            "tokens": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "spend": 0.0,
        }
        spent = [(12, 30), (7, 0), (100, 250)]
        for prompt, completion in spent:
            adm = await quota.admit(key, MODEL, prompt + 300, now=T)
            await quota.release(adm, prompt, completion)
        usage = await quota.usage(key.id, now=T)
        for period in ("day", "month"):
            assert usage[period]["requests"] == 3
            assert usage[period]["prompt_tokens"] == 119 and usage[period]["completion_tokens"] == 280
            assert usage[period]["tokens"] == 399
        assert usage["minute"] == {"requests": 3, "tokens": 399}

    run(redis_server, body)


def test_history_reads_the_day_hashes_oldest_first(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, other = await new_key(store), await new_key(store)
        day = 86400
        # two requests today, one three days ago, one 39 days ago (the oldest a day hash lives)
        for when, prompt, completion in ((T, 3, 4), (T, 5, 6), (T - 3 * day, 10, 20), (T - 39 * day, 1, 1)):
            adm = await quota.admit(key, MODEL, 100, now=when)
            await quota.release(adm, prompt, completion)
        await quota.release(await quota.admit(other, MODEL, 100, now=T), 50, 50)  # another key's day
        week = await quota.history(key.id, 7, now=T)
        assert [d["date"] for d in week] == [f"2030-01-{n:02d}" for n in range(9, 16)]
        zero = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "tokens": 0, "spend": 0.0}
        assert week[-1] == {
            "date": "2030-01-15",
            "requests": 2,
            "prompt_tokens": 8,
            "completion_tokens": 10,
            "tokens": 18,
            "spend": 0.0,
        }
        assert week[3] == {
            "date": "2030-01-12",
            "requests": 1,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "tokens": 30,
            "spend": 0.0,
        }
        assert all(d == {"date": d["date"], **zero} for i, d in enumerate(week) if i not in (3, 6))
        forty = await quota.history(key.id, 40, now=T)
        assert len(forty) == 40 and forty[-1] == week[-1]
        assert forty[0] == {
            "date": "2029-12-07",
            "requests": 1,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "tokens": 2,
            "spend": 0.0,
        }
        assert sum(d["requests"] for d in forty) == 4
        assert await quota.history(key.id, 1, now=T) == [week[-1]]
        assert (await quota.usage(key.id, now=T))["day"]["requests"] == week[-1]["requests"]

    run(redis_server, body)


def test_layout_ttls_and_cluster_slot(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store)
        await quota.admit(key, MODEL, 5)
        names = [n async for n in client.scan_iter(f"gw:{{{key.id}}}:*")]
        assert len(names) == 5 and len({key_slot(n) for n in names}) == 1
        ttls = {n.decode().split(":")[2]: await client.ttl(n) for n in names}
        assert ttls["rec"] == -1 and 0 < ttls["min"] <= 120 and 0 < ttls["leases"] <= 3600 + 300
        assert 39 * 86400 < ttls["day"] <= 40 * 86400 and 399 * 86400 < ttls["month"] <= 400 * 86400

    run(redis_server, body)


def test_string_decoding_client(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, secret = await store.create(validate_key_fields({"name": "t", "rpm": 1}, partial=False))
        assert await store.resolve(secret) == key and await store.list() == [key]
        adm = await quota.admit(key, MODEL, 5)
        assert (await refused(quota.admit(key, MODEL, 5))).code == "rpm_exceeded"
        await quota.release(adm, 1, 2)
        assert (await quota.usage(key.id))["day"]["completion_tokens"] == 2

    run(redis_server, body, decode=True)


def test_fail_closed_and_recovery(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, rpm=100)
        adm = await quota.admit(key, MODEL, 10)
        saved = {f"gw:{{{key.id}}}:rec": await client.hgetall(f"gw:{{{key.id}}}:rec")}
        redis_server.kill()
        started = time.monotonic()
        err = await refused(quota.admit(key, MODEL, 10))
        assert time.monotonic() - started < 1.0
        assert (err.status, err.code, err.headers["retry-after"]) == (503, "quota_unavailable", "1")
        assert quota.redis_errors == 1
        await quota.release(adm, 1, 1)  # never raises: the lease expires by itself
        assert (await refused(quota.usage(key.id))).status == 503
        await restart(redis_server, client, saved)
        deadline = time.monotonic() + 5
        while True:  # recovery needs no new Quota, only the breaker to lapse
            try:
                assert not (await quota.admit(key, MODEL, 10)).local
                break
            except GatewayError as exc:
                assert exc.status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert quota.fail_open_admissions == 0

    run(redis_server, body, timeout=0.25)


def test_fail_open_and_recovery(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, rpm=2, daily_tokens=10**6)
        saved = {f"gw:{{{key.id}}}:rec": await client.hgetall(f"gw:{{{key.id}}}:rec")}
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="gateway.access.quota"):
            first = await quota.admit(key, MODEL, 10, now=T)
            second = await quota.admit(key, MODEL, 10, now=T)
            assert first.local and second.local
            assert second.headers["x-ratelimit-remaining-requests"] == "0"
            err = await refused(quota.admit(key, MODEL, 10, now=T))  # the key's own rpm, held locally
            assert (err.status, err.code) == (429, "rpm_exceeded")
            await quota.release(first, 3, 3)
            await quota.release(first, 3, 3)
        warnings = [r for r in caplog.records if "Redis unreachable: quotas fail-open, per-process limits" in r.message]
        assert len(warnings) == 1  # one line when it goes, however many requests meet it
        assert quota.fail_open_admissions == 2 and quota.redis_errors >= 1
        await restart(redis_server, client, saved)
        await asyncio.sleep(quota.breaker)
        with caplog.at_level(logging.WARNING, logger="gateway.access.quota"):
            back = await quota.admit(key, MODEL, 10)
            await quota.admit(key, MODEL, 10)
        assert not back.local and (await quota.usage(key.id))["day"]["requests"] == 2
        assert len([r for r in caplog.records if "Redis reachable again" in r.message]) == 1  # and one when back

    run(redis_server, body, failure_mode="open")


def test_local_limiter() -> None:
    limiter = LocalLimiter()
    win = window(T)
    key = ApiKey(id="key_0123456789abcdef", name="t", models=(MODEL,), tpm=100, max_concurrent=1)
    assert limiter.admit(key, MODEL, 60, T, win, "l1")["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(GatewayError) as err:
        limiter.admit(key, MODEL, 41, T, win, "l2")
    assert err.value.code == "tpm_exceeded"
    with pytest.raises(GatewayError) as err:
        limiter.admit(key, MODEL, 10, T, win, "l2")
    assert err.value.code == "concurrency_exceeded"
    limiter.release("l1", 10)
    assert limiter.admit(key, MODEL, 80, T, win, "l3")["x-ratelimit-remaining-tokens"] == "10"
    limiter.release("l1", 10)  # a repeat frees neither a slot nor tokens
    with pytest.raises(GatewayError) as err:
        limiter.admit(key, MODEL, 1, T, win, "l4")
    assert err.value.code == "concurrency_exceeded"
    with pytest.raises(GatewayError) as err:
        limiter.admit(key, "other", 1, T, win, "l4")
    assert err.value.status == 403
    revoked = ApiKey(id="key_0123456789abcdef", name="t", revoked_at=T - 1)
    with pytest.raises(GatewayError) as err:
        limiter.admit(revoked, MODEL, 1, T, win, "l5")
    assert err.value.status == 401


def test_admission_is_one_round_trip(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, rpm=1000, tpm=10**6, max_concurrent=100, daily_tokens=10**7)
        await quota.release(await quota.admit(key, MODEL, 5), 1, 1)  # loads both scripts
        sent: list[str] = []
        assert isinstance(quota.redis, RespClient)
        execute, execute_packed, send_script = quota.redis.execute, quota.redis.execute_packed, quota.redis.send_script

        async def counting(*args: Any, **kwargs: Any) -> Any:
            sent.append(str(args[0]))
            return await execute(*args, **kwargs)

        async def counting_packed(command: bytes) -> Any:  # a script call: its keys come packed
            sent.append(command.split(b"\r\n")[2].decode())
            return await execute_packed(command)

        def counting_send(script: Any, keys: Any, args: Any) -> Any:
            sent.append("EVALSHA")  # sent, not waited for (a release)
            return send_script(script, keys, args)

        quota.redis.execute = counting  # type: ignore[method-assign]
        quota.redis.execute_packed = counting_packed  # type: ignore[method-assign]
        quota.redis.send_script = counting_send  # type: ignore[method-assign]
        for _ in range(10):
            await quota.release(await quota.admit(key, MODEL, 5), 1, 1)
        assert sent == ["EVALSHA"] * 20

    run(redis_server, body)


def test_hung_redis_fails_within_the_deadline(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store)
        await quota.admit(key, MODEL, 1)
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # alive but silent, like a black-holed host
        try:
            started = time.monotonic()
            assert (await refused(quota.admit(key, MODEL, 1))).status == 503
            assert time.monotonic() - started < 1.0
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)

    run(redis_server, body, timeout=0.25)


def test_a_reservation_that_can_never_fit_is_a_400() -> None:
    from gateway.access.quota import reservation
    from gateway.core.request import COMPLETIONS, ApiRequest

    key = ApiKey(id="key_0123456789abcdef", name="t", tpm=2000, daily_tokens=5000)
    request = ApiRequest(COMPLETIONS, MODEL, {}, max_tokens=300, n=2, prompts=2)
    assert reservation(key, request, 10) == 10 + 300 * 2 * 2  # retried by a client, it can succeed
    request.max_tokens = 600  # 2410 > 2000
    with pytest.raises(GatewayError) as err:
        reservation(key, request, 10)
    assert (err.value.status, err.value.param) == (400, "max_tokens") and "tpm limit of 2000" in err.value.message
    assert reservation(ApiKey(id="key_0123456789abcdef", name="t"), request, 10) == 2410  # no limit, no cap


def test_admissions_given_up_during_a_stall_never_charge(redis_server: RedisServer) -> None:
    """Redis frozen while admissions time out: when it resumes, the queued commands run, and the
    cancels the quota sent after them undo them (or tombstone them), so nothing is charged."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        budget = await new_key(store, daily_tokens=10_000)
        pair = await new_key(store, max_concurrent=2)
        kept = await quota.admit(budget, MODEL, 100)  # one admitted before the stall, used for real
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            quota.breaker = 0.0  # every admission goes to the frozen Redis, as a burst would
            for key in (budget, pair) * 5:
                assert (await refused(quota.admit(key, MODEL, 60))).code == "quota_unavailable"
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not await quota.flush_pending():
            assert time.monotonic() < deadline, "the cancels never reached Redis"
            await asyncio.sleep(0.1)
        await quota.release(kept, 30, 20)
        usage = await quota.usage(budget.id)
        assert (usage["day"]["requests"], usage["day"]["tokens"]) == (1, 50)  # only the admitted one
        assert (await quota.usage(pair.id))["day"]["requests"] == 0
        assert await client.zcard(f"gw:{{{pair.id}}}:leases") == 0  # no lease outlives its request
        first, second = await quota.admit(pair, MODEL, 1), await quota.admit(pair, MODEL, 1)
        await quota.release(first, 1, 0)
        await quota.release(second, 1, 0)

    run(redis_server, body, timeout=0.1)
