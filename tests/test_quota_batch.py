"""Batch lines in the quota script (real Redis): rpm and max_concurrent do not apply to them and
they leave the interactive path's windows alone; tpm and the budgets do apply; reconciling and
refreshing their leases works as for interactive requests. A line that runs again (its replica
died before recording it, or another took it over) is charged once: the later run's charge
replaces the earlier's, whether that was settled, only reserved, or cancelled."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from gateway.access.keys import ApiKey, KeyStore
from gateway.access.quota import TOMBSTONE_TTL, Admission, Quota
from gateway.access.quota_scripts import _CANCEL
from gateway.access.quota_windows import window
from gateway.access.teams import TeamStore
from gateway.core.request import BatchLine
from testkit.redis_cluster import RedisCluster
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


# ---- a batch line is charged once, however often it runs -------------------------------------

COUNTS = ("requests", "tokens", "prompt_tokens", "completion_tokens")


def line(n: int, claim: int, batch_id: str = "batch_q") -> BatchLine:
    return BatchLine(batch_id, n, claim, 900)


async def ran(
    quota: Quota,
    key: ApiKey,
    claim: int,
    used: tuple[int, int] | None,
    *,
    n: int = 1,
    batch_id: str = "batch_q",
    reserve: int = 30,
    money: int = 0,
    spend: int = 0,
    now: float = T,
) -> Admission:
    """A run of line `n` under its `claim`-th claim: admitted, then settled with `used` (prompt,
    completion tokens) and `spend`; None: its replica died before it settled."""
    adm = await quota.admit(key, MODEL, reserve, now=now, batch=True, money=money, line=line(n, claim, batch_id))
    if used is not None:
        await quota.release(adm, *used, spend=spend)
    return adm


async def line_key(store: KeyStore, **limits: Any) -> tuple[ApiKey, str]:
    """A key alone, and the prefix of its counters."""
    key = await new_key(store, **limits)
    return key, f"gw:{{{key.id}}}:"


async def day_of(quota: Quota, base: str, now: float = T, period: str = "day") -> dict[str, int]:
    """A day's (or month's) counters, read on the quota's own connection: after its releases."""
    name = base + (f"day:{window(now).day}" if period == "day" else f"month:{window(now).month}")
    flat = await quota.redis.execute("HGETALL", name)
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


async def figures(quota: Quota, base: str, names: tuple[str, ...] = COUNTS, **where: Any) -> tuple[int, ...]:
    day = await day_of(quota, base, **where)
    return tuple(day.get(name, 0) for name in names)


def test_a_rerun_replaces_the_charge_of_the_run_before(redis_server: RedisServer) -> None:
    """Settled, then run again under a later claim (its replica died before recording it): the key
    is charged the second run's usage and money only, once."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, base = await line_key(store, daily_budget=1.0)
        first = await ran(quota, key, 1, (5, 7), reserve=40, money=4000, spend=1200)
        second = await ran(quota, key, 2, None, reserve=40, money=4000)
        # the second run's reservation is all that is charged
        assert await figures(quota, base, (*COUNTS, "spend")) == (1, 40, 0, 0, 4000)
        await quota.release(second, 6, 8, spend=1400)
        await quota.release(first, 5, 7, spend=1200)  # a repeat of the first changes nothing
        assert await figures(quota, base, (*COUNTS, "spend")) == (1, 14, 6, 8, 1400)
        assert await figures(quota, base, ("requests", "tokens", "spend"), period="month") == (1, 14, 1400)
        assert await quota.redis.execute("ZCARD", base + "bleases") == 0
        # Another line, and the same line of another batch, are charges of their own.
        await ran(quota, key, 1, (1, 1), n=2)
        await ran(quota, key, 1, (1, 1), batch_id="batch_r")
        assert await figures(quota, base, ("tokens",)) == (14 + 2 + 2,)

    run(redis_server, body)


def test_a_run_that_died_admitted_leaves_no_reservation_nor_lease(redis_server: RedisServer) -> None:
    """Admitted, never settled (its replica died mid-request, or stalled and was taken over): the
    rerun undoes the reservation and frees the lease; the old run's late settle changes nothing."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, base = await line_key(store, daily_tokens=1000)
        died = await ran(quota, key, 1, None, reserve=600, money=900)
        # Without the undo, 600 + 600 would be over the daily 1000: the line could never run again.
        rerun = await ran(quota, key, 2, None, reserve=600, money=900)
        assert await client.zrange(base + "bleases", 0, -1) == [rerun.lease_id.encode()]
        await quota.release(rerun, 10, 20, spend=300)
        await quota.release(died, 50, 50, spend=1000)  # the stalled run wakes up: too late
        assert await figures(quota, base, (*COUNTS, "spend")) == (1, 30, 10, 20, 300)
        assert await quota.redis.execute("ZCARD", base + "bleases") == 0

    run(redis_server, body)


def test_a_run_of_an_older_claim_is_refused(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, base = await line_key(store)
        await ran(quota, key, 3, (2, 3))
        err = await refused(ran(quota, key, 2, None))
        assert (err.status, err.code) == (409, "batch_line_superseded")
        assert await figures(quota, base) == (1, 5, 2, 3)
        # Attempts within one claim (an engine failure retried) replace each other too.
        await ran(quota, key, 3, (4, 4))
        assert await figures(quota, base) == (1, 8, 4, 4)

    run(redis_server, body)


def test_a_cancelled_admission_is_undone_once(redis_server: RedisServer) -> None:
    """An admission given up on (Redis too slow) is cancelled: the rerun after it must not undo
    that reservation a second time."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, base = await line_key(store)
        await ran(quota, key, 1, (3, 3))
        gone = await ran(quota, key, 2, None)  # replaces the 6
        tombstone = f"{base}gone:{gone.lease_id}"
        cancel_args = [gone.lease_id, 30, TOMBSTONE_TTL, 1, 0]
        assert await quota.redis.run_script(_CANCEL, [*gone.release_keys(), tombstone], cancel_args) == 1
        assert await figures(quota, base, ("tokens",)) == (0,)
        await ran(quota, key, 2, (4, 5))
        assert await figures(quota, base) == (1, 9, 4, 5)

    run(redis_server, body)


def test_a_rerun_on_the_next_day_takes_the_charge_off_the_day_before(redis_server: RedisServer) -> None:
    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, base = await line_key(store)
        await ran(quota, key, 1, (3, 3))
        await ran(quota, key, 2, (4, 5), now=T + 86400)
        assert await figures(quota, base) == (0, 0, 0, 0)
        assert await figures(quota, base, now=T + 86400) == (1, 9, 4, 5)
        assert await figures(quota, base, period="month") == (1, 9, 4, 5)  # both days in one month

    run(redis_server, body)


def test_a_release_retried_after_a_failure_settles_the_line(redis_server: RedisServer) -> None:
    """A release whose call failed (NOSCRIPT after a Redis restart) is retried one by one
    (`_SETTLE`, one release): it settles the line's charge record too, so a rerun after it takes
    the usage off, not more."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key, base = await line_key(store)
        first = await ran(quota, key, 1, None)
        keys = [*first.release_keys(), f"{base}bline:batch_q:1"]
        quota._release_failed((first.lease_id, keys, [first.lease_id, 6 - 30, 2, 4, 0]), None)
        assert await quota.flush_pending()
        assert await figures(quota, base) == (1, 6, 2, 4)
        await ran(quota, key, 2, (1, 2))
        assert await figures(quota, base) == (1, 3, 1, 2)

    run(redis_server, body)


def test_a_rerun_is_charged_once_at_every_level(redis_server: RedisServer) -> None:
    """A key of a team of an organization: the key, the team (whose max_concurrent keeps leases)
    and the organization are each charged the last run's usage and money, and no lease is left."""
    from tests.test_teams_quota import key_of, org, team
    from tests.test_teams_quota import run as run_teams

    async def body(store: KeyStore, teams: TeamStore, quota: Quota, client: aioredis.Redis) -> None:
        o = await org(teams, daily_budget=1.0)
        t = await team(teams, org=o.id, max_concurrent=2, daily_tokens=10_000)
        key = await key_of(store, t)
        await ran(quota, key, 1, (10, 10), reserve=50, money=5000, spend=2000)
        await ran(quota, key, 2, None, reserve=50, money=5000)  # its replica died
        await ran(quota, key, 3, (7, 9), reserve=50, money=5000, spend=1600)
        levels = quota.levels(key)
        for level in levels:
            assert await figures(quota, level.base, ("requests", "tokens", "spend")) == (1, 16, 1600), level
            assert await quota.redis.execute("ZCARD", level.base + "bleases") == 0, level
        assert await figures(quota, levels[0].base, ("prompt_tokens", "completion_tokens")) == (7, 9)

    run_teams(redis_server, body)


def test_a_rerun_on_another_replica_of_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """On a real Redis Cluster, a line run on one replica and again on another, for a key alone and
    for a key of a team of an organization: one slot per script call (the charge record is under
    the key's tag), the usage counted once."""
    from tests.test_cluster_stores import new_key as new_cluster_key
    from tests.test_cluster_stores import run as run_cluster
    from tests.test_teams_quota import key_of, org, team

    async def body(a: Any, b: Any) -> None:
        teams = TeamStore(a.clients.admin)
        o = await org(teams)
        keys = [(await new_cluster_key(a))[0], await key_of(a.keys, await team(teams, org=o.id))]
        for key in keys:
            await ran(a.quota, key, 1, (3, 4), now=time.time())
            await ran(b.quota, key, 2, None, now=time.time())  # b dies holding it
            await ran(a.quota, key, 3, (5, 6), now=time.time())
            for level in a.quota.levels(key):
                usage = await a.quota.usage(level)  # on the connection of the release: after it
                assert (usage["day"]["requests"], usage["day"]["tokens"]) == (1, 11), level
        assert (await a.quota.usage(keys[0].id))["day"]["completion_tokens"] == 6

    run_cluster(redis_cluster, body)


def test_a_line_record_outlives_its_run(redis_server: RedisServer) -> None:
    """The record lives `keep` seconds from its admission, pushed back while its run's lease is
    refreshed (a long run keeps it), and is gone after that: no record outlives its use."""

    async def body(store: KeyStore, quota: Quota, client: aioredis.Redis) -> None:
        key = await new_key(store)
        adm = await ran(quota, key, 1, None, now=time.time())
        record = f"gw:{{{key.id}}}:bline:batch_q:1"
        assert adm.record == record and 890 <= await client.ttl(record) <= 900
        await client.expire(record, 100)  # as if the run had gone on for 800 s
        await quota.refresh_leases([adm])
        assert 890 <= await client.ttl(record) <= 900

    run(redis_server, body)
