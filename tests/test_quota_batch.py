"""Batch lines in the quota script (real Redis): rpm and max_concurrent do not apply to them and
they leave the interactive path's windows alone; tpm and the budgets do apply; reconciling and
refreshing their leases works as for interactive requests."""

from __future__ import annotations

import redis.asyncio as aioredis

from gateway.access.keys import KeyStore
from gateway.access.quota import Quota
from gateway.access.quota_windows import window
from testkit.redis_server import RedisServer
from tests.test_quota import MODEL, T, new_key, refused, run


def test_batch_lines_skip_rpm_and_concurrency(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, rpm=2, max_concurrent=1, tpm=10_000)
        lines = [await quota.admit(key, MODEL, 10, now=T, batch=True) for _ in range(5)]
        assert all(adm.batch for adm in lines)
        # The interactive path still has its whole rpm and its one concurrent slot.
        first = await quota.admit(key, MODEL, 10, now=T)
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await refused(quota.admit(key, MODEL, 10, now=T))).code == "concurrency_exceeded"
        await quota.release(first, 3, 4)
        await quota.admit(key, MODEL, 10, now=T)
        assert (await refused(quota.admit(key, MODEL, 10, now=T))).code == "rpm_exceeded"
        # ... while batch lines go on, and count toward tpm like any request.
        await quota.admit(key, MODEL, 10, now=T, batch=True)
        win = window(T)
        minute = await client.hgetall(f"gw:{{{key.id}}}:min:{win.minute}")
        assert minute[b"requests"] == b"2" and minute[b"tokens"] == str(6 * 10 + 7 + 10).encode()
        day = await client.hgetall(f"gw:{{{key.id}}}:day:{win.day}")
        assert day[b"requests"] == b"8"  # every request counts in the day's usage
        assert await client.zcard(f"gw:{{{key.id}}}:bleases") == 6
        assert await client.zcard(f"gw:{{{key.id}}}:leases") == 1

    run(redis_server, body)


def test_batch_lines_meet_tpm_and_budgets(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store, tpm=100)
        await quota.admit(key, MODEL, 60, now=T, batch=True)
        err = await refused(quota.admit(key, MODEL, 60, now=T, batch=True))
        assert err.code == "tpm_exceeded" and int(err.headers["retry-after"]) >= 1
        assert (await quota.admit(key, MODEL, 60, now=T + 60, batch=True)).reserved == 60  # the next window
        budget = await new_key(store, daily_tokens=50)
        adm = await quota.admit(budget, MODEL, 40, now=T, batch=True)
        err = await refused(quota.admit(budget, MODEL, 40, now=T, batch=True))
        assert err.code == "daily_tokens_exceeded" and err.type == "insufficient_quota"
        # Reconciled like any request: the day's tokens become what was used; twice changes nothing.
        await quota.release(adm, 5, 7)
        await quota.release(adm, 5, 7)
        day = await client.hgetall(f"gw:{{{budget.id}}}:day:{window(T).day}")
        assert day[b"tokens"] == b"12" and day[b"prompt_tokens"] == b"5" and day[b"completion_tokens"] == b"7"
        assert await client.zcard(f"gw:{{{budget.id}}}:bleases") == 0

    run(redis_server, body)


def test_batch_lease_refresh_and_no_fail_open(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store)
        adm = await quota.admit(key, MODEL, 1, batch=True)
        leases = f"gw:{{{key.id}}}:bleases"
        before = await client.zscore(leases, adm.lease_id)
        await quota.refresh_leases([adm])
        assert (await client.zscore(leases, adm.lease_id) or 0) >= (before or 0)
        redis_server.kill()
        # fail-open serves interactive requests from a per-process limiter, but a batch line waits
        assert (await refused(quota.admit(key, MODEL, 1, batch=True))).code == "quota_unavailable"
        assert (await quota.admit(key, MODEL, 1)).local

    run(redis_server, body, failure_mode="open", timeout=0.3)
