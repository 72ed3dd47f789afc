"""The scheduler's ordering, in-process: bands, deficit round robin by tokens, weights, and the
slot bookkeeping of gateway/dispatch/scheduler.py and gateway/dispatch/capacity.py (no network)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from gateway.access.base import Principal
from gateway.core.errors import GatewayError
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import CHAT, ApiRequest
from gateway.dispatch.capacity import Capacity
from gateway.dispatch.fair_queue import BANDS, FairQueue, Ticket
from gateway.dispatch.routing import Router
from gateway.dispatch.scheduler import Scheduler, Unscheduled
from gateway.engines.pool import Pool
from gateway.settings import (
    ConfigError,
    EngineSettings,
    SchedulerSettings,
    parse_settings,
)

ANY = lambda model: True  # noqa: E731


def ticket(flow: str, cost: float = 100, band: str = "normal", weight: float = 1.0, model: str = "m") -> Ticket:
    return Ticket(flow, BANDS.index(band), model, cost, weight, model)


def drain(q: FairQueue, eligible: Any = ANY) -> list[str]:
    out = []
    while (t := q.pop(eligible)) is not None:
        out.append(t.flow)
    return out


def test_one_flow_is_first_come_first_served() -> None:
    q = FairQueue()
    tickets = [ticket("a", cost=c) for c in (5, 500, 1, 50)]
    for t in tickets:
        q.push(t)
    assert [q.pop(ANY) for _ in tickets] == tickets and q.pop(ANY) is None and q.size == 0


def test_a_flood_delays_another_key_by_one_dispatch_at_most() -> None:
    q = FairQueue()
    for _ in range(50):
        q.push(ticket("flood"))
    assert q.pop(ANY).flow == "flood"  # type: ignore[union-attr]
    q.push(ticket("polite"))  # arrives while the flood holds the turn
    assert [q.pop(ANY).flow for _ in range(2)].index("polite") <= 1  # type: ignore[union-attr]
    # and every later request of the polite key goes within one dispatch of its arrival
    for _ in range(10):
        q.push(ticket("polite"))
        assert "polite" in [q.pop(ANY).flow for _ in range(2)]  # type: ignore[union-attr]


def test_round_robin_between_equal_keys() -> None:
    q = FairQueue()
    for _ in range(10):
        for flow in ("a", "b", "c"):
            q.push(ticket(flow))
    order = drain(q)
    assert all(set(order[i : i + 3]) == {"a", "b", "c"} for i in range(0, 30, 3))


def test_tokens_not_requests_are_shared() -> None:
    """A key whose requests cost 10x gets a tenth of the requests: the same tokens."""
    q = FairQueue()
    for _ in range(200):
        q.push(ticket("big", cost=1000))
        q.push(ticket("small", cost=100))
    first = drain(q)[:110]
    counts = Counter(first)
    assert counts["small"] == pytest.approx(10 * counts["big"], abs=10)


def test_weights_share_in_proportion() -> None:
    q = FairQueue()
    for _ in range(400):
        q.push(ticket("heavy", weight=3))
        q.push(ticket("light", weight=1))
    counts = Counter(drain(q)[:200])
    assert counts["heavy"] == pytest.approx(150, abs=3) and counts["light"] == pytest.approx(50, abs=3)


def test_fractional_weights_and_odd_costs() -> None:
    q = FairQueue()
    rng = random.Random(7)
    for _ in range(300):
        for flow, weight in (("x", 0.25), ("y", 0.5)):
            cost = rng.uniform(1, 3000)
            q.push(ticket(flow, cost=cost, weight=weight))
    spent: Counter[str] = Counter()
    for _ in range(200):
        t = q.pop(ANY)
        assert t is not None
        spent[t.flow] += t.cost
    assert spent["y"] / spent["x"] == pytest.approx(2.0, rel=0.15)


def test_a_higher_band_always_goes_first() -> None:
    q = FairQueue()
    for i in range(5):
        q.push(ticket(f"n{i}", band="normal"))
        q.push(ticket(f"b{i}", band="batch", cost=1))
        q.push(ticket(f"l{i}", band="low", cost=1))
    q.push(ticket("h", band="high", cost=10_000))
    order = drain(q)
    assert order[0] == "h"
    assert [o[0] for o in order[1:]] == ["n"] * 5 + ["l"] * 5 + ["b"] * 5


def test_a_blocked_band_lets_a_lower_one_use_other_engines() -> None:
    q = FairQueue()
    q.push(ticket("h", band="high", model="full"))
    q.push(ticket("n", band="normal", model="free"))
    assert q.pop(lambda m: m == "free").flow == "n"  # type: ignore[union-attr]
    assert q.pop(lambda m: m == "free") is None and q.size == 1


def test_a_key_is_not_held_back_by_its_own_request_for_a_full_model() -> None:
    q = FairQueue()
    q.push(ticket("k", model="full"))
    q.push(ticket("k", model="free"))
    assert q.pop(lambda m: m == "free").model == "free"  # type: ignore[union-attr]


def test_remove_and_per_key_counts() -> None:
    q = FairQueue()
    a1, a2, b1 = ticket("a"), ticket("a", band="high"), ticket("b")
    for t in (a1, a2, b1):
        q.push(t)
    assert q.queued_by("a") == 2 and q.band_size(BANDS.index("high")) == 1
    assert q.remove(a2) and not q.remove(a2)
    assert q.queued_by("a") == 1 and q.size == 2
    assert drain(q) == ["b", "a"]  # the newest flow goes to the front of the rotation
    assert q.queued_by("a") == 0 and q.size == 0


# ---- the scheduler and capacity, in-process -----------------------------------------------------


def scheduler(**section: Any) -> tuple[Scheduler, Pool]:
    s = parse_settings(
        {
            "engines": [
                {"name": "e1", "kind": "openai", "url": "http://127.0.0.1:1", "max_inflight": 1},
                {"name": "e2", "kind": "openai", "url": "http://127.0.0.1:2", "max_inflight": 1},
                {"name": "big", "kind": "openai", "url": "http://127.0.0.1:3", "max_inflight": 100},
            ],
            "models": [
                {"name": "m", "routes": [{"engines": ["e1", "e2"]}]},
                {"name": "only2", "routes": [{"engine": "e2"}]},
                {"name": "split", "routes": [{"engine": "e1", "weight": 9}, {"engine": "big", "weight": 1}]},
            ],
            "auth": {"enabled": False},
            "scheduler": section,
        },
        env={},
    )
    pool = Pool(s.engines, s.health, GatewayMetrics())
    for e in pool.engines.values():
        e.healthy = True
    return Scheduler(s, Router(pool, s.models, s.routing, random.Random(3)), GatewayMetrics()), pool


def request(model: str = "m", user: str | None = None) -> ApiRequest:
    r = ApiRequest(CHAT, model, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, size=60)
    r.subject = user
    return r


def test_slots_are_taken_at_once_and_respected() -> None:
    async def run() -> None:
        sched, pool = scheduler()
        picks = [await sched.acquire(request(), Principal(), None) for _ in range(2)]
        assert sorted(p.engine.name for p in picks if p) == ["e1", "e2"]
        assert pool.engines["e1"].outstanding == pool.engines["e2"].outstanding == 1
        waiter = asyncio.ensure_future(sched.acquire(request(user="x"), Principal(), None))
        await asyncio.sleep(0.01)
        assert not waiter.done() and sched.view("m")["bands"]["normal"]["queued"] == 1
        sched.release(pool.engines["e2"])
        pick = await asyncio.wait_for(waiter, 10)
        assert pick is not None and pick.engine.name == "e2" and pool.engines["e2"].outstanding == 1

    asyncio.run(run())


def test_a_canary_keeps_its_share_when_the_stable_version_is_full() -> None:
    """The route is assigned by weight first; a full stable route makes its requests wait, it
    does not send them to the canary's spare capacity."""

    async def run() -> None:
        sched, pool = scheduler(max_queue_wait=5)
        pool.engines["e1"].outstanding = 1  # the stable version's engine is full
        tasks = [asyncio.ensure_future(sched.acquire(request("split", f"u{i}"), Principal(), None)) for i in range(60)]
        await asyncio.sleep(0.01)
        to_canary = sum(t.done() for t in tasks)
        assert 0 < to_canary < 20 and pool.engines["big"].outstanding == to_canary  # about 6 of 60
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def test_bands_and_flows_through_the_scheduler() -> None:
    async def run() -> None:
        sched, pool = scheduler()
        e2 = pool.engines["e2"]
        first = await sched.acquire(request("only2"), Principal(), None)
        assert first is not None
        order: list[str] = []

        async def one(name: str, principal: Principal) -> None:
            pick = await sched.acquire(request("only2", user=name[0]), principal, None)
            order.append(name)
            await asyncio.sleep(0)
            assert pick is not None
            sched.release(pick.engine)

        async def batch_line() -> None:  # a batch line of the high key: below low, whatever the key
            line = request("only2")
            line.batch_id = "batch_1"
            pick = await sched.acquire(line, Principal(key_id="key_h", priority="high"), None)
            order.append("batch")
            assert pick is not None
            sched.release(pick.engine)

        waiting = [asyncio.ensure_future(batch_line())]
        waiting += [asyncio.ensure_future(one(f"a{i}", Principal())) for i in range(4)]
        await asyncio.sleep(0.01)
        waiting.append(asyncio.ensure_future(one("b0", Principal())))
        waiting.append(asyncio.ensure_future(one("low", Principal(key_id="key_l", priority="low"))))
        waiting.append(asyncio.ensure_future(one("high", Principal(key_id="key_h", priority="high"))))
        await asyncio.sleep(0.01)
        assert [b["queued"] for b in sched.view("only2")["bands"].values()] == [1, 5, 1, 1]
        sched.release(e2)
        await asyncio.gather(*waiting)
        assert order[0] == "high" and order.index("b0") <= 2 and order[-2:] == ["low", "batch"]
        assert e2.outstanding == 0

    asyncio.run(run())


def test_queue_bounds() -> None:
    async def run() -> None:
        sched, pool = scheduler(max_queue_wait=1.0, max_queued_per_key=2)  # long enough for a busy machine
        assert await sched.acquire(request("only2"), Principal(), None) is not None
        waiters = [asyncio.ensure_future(sched.acquire(request("only2", "k"), Principal(), None)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(GatewayError) as full:
            await sched.acquire(request("only2", "k"), Principal(), None)
        assert full.value.status == 429 and full.value.code == "queue_full" and full.value.headers["retry-after"]
        # another user still gets in line
        other = asyncio.ensure_future(sched.acquire(request("only2", "other"), Principal(), None))
        await asyncio.sleep(0.01)
        assert sched.view("only2")["bands"]["normal"]["queued"] == 3
        other.cancel()  # its client left: out of the queue at once
        await asyncio.sleep(0)
        assert sched.view("only2")["bands"]["normal"]["queued"] == 2
        results = await asyncio.gather(*waiters, other, return_exceptions=True)
        codes = [getattr(r, "code", type(r).__name__) for r in results]
        assert codes == ["queue_timeout", "queue_timeout", "CancelledError"]
        assert sched.view("only2")["bands"]["normal"]["queued"] == 0 and pool.engines["e2"].outstanding == 1

    asyncio.run(run())


def test_a_woken_request_that_left_gives_its_slot_on() -> None:
    async def run() -> None:
        sched, pool = scheduler()
        e2 = pool.engines["e2"]
        held = await sched.acquire(request("only2"), Principal(), None)
        left = asyncio.ensure_future(sched.acquire(request("only2", "a"), Principal(), None))
        stays = asyncio.ensure_future(sched.acquire(request("only2", "a"), Principal(), None))
        await asyncio.sleep(0.01)
        assert held is not None
        sched.release(e2)  # hands the slot to `left`...
        left.cancel()  # ...which is cancelled before it runs: the slot goes to `stays`
        pick = await asyncio.wait_for(stays, 10)
        assert pick is not None and e2.outstanding == 1 and left.cancelled()

    asyncio.run(run())


def test_a_request_whose_engines_all_fail_is_answered_at_once() -> None:
    async def run() -> None:
        sched, pool = scheduler()
        e2 = pool.engines["e2"]
        assert await sched.acquire(request("only2"), Principal(), None) is not None
        waiter = asyncio.ensure_future(sched.acquire(request("only2", "a"), Principal(), None))
        await asyncio.sleep(0.01)
        e2.healthy = False
        for listener in pool.on_checked:  # the health check that took it out
            listener(e2)
        with pytest.raises(GatewayError) as err:
            await asyncio.wait_for(waiter, 10)
        assert err.value.status == 503 and sched.view("only2")["bands"]["normal"]["queued"] == 0

    asyncio.run(run())


def engine_settings(**kw: Any) -> EngineSettings:
    return EngineSettings(name="e", kind="openai", url="http://x", **kw)


def test_capacity_configured_is_split_between_workers() -> None:
    assert Capacity(engine_settings(max_inflight=10), workers=4).limit == 2
    assert Capacity(engine_settings(max_inflight=2), workers=4).limit == 1
    assert Capacity(engine_settings()).limit is None


def test_capacity_learned_from_the_engine() -> None:
    _, pool = scheduler()
    e = pool.engines["e1"]
    cap = Capacity(engine_settings(), learn=True)
    e.outstanding, e.running, e.waiting = 20, 8, 1  # a request between two steps: nothing learned
    assert not cap.observe(e) and not cap.observe(e) and cap.limit is None
    e.waiting = 12  # a real queue, once: not yet
    cap.observe(e)
    assert cap.limit is None
    cap.observe(e)  # twice in a row: saturated, capacity = what it runs
    assert cap.limit == 8 and cap.source == "learned"
    e.outstanding, e.waiting = 8, 0  # full use, no queue: probe upward after three checks
    assert [cap.observe(e) for _ in range(3)] == [False, False, True] and cap.limit == 9
    e.outstanding, e.running, e.waiting = 5, 10, 10  # another replica holds half: our share
    cap.observe(e)
    cap.observe(e)
    assert cap.limit == 2
    assert not Capacity(engine_settings(max_inflight=4)).observe(e)  # configured: never learned


def test_scheduler_off_sends_everything_at_once() -> None:
    async def run() -> None:
        s = parse_settings(
            {
                "engines": [{"name": "e", "kind": "openai", "url": "http://127.0.0.1:1", "max_inflight": 1}],
                "models": [{"name": "m", "routes": [{"engine": "e"}]}],
                "auth": {"enabled": False},
                "scheduler": {"enabled": False},
            },
            env={},
        )
        pool = Pool(s.engines, s.health, GatewayMetrics())
        pool.engines["e"].healthy = True
        off = Unscheduled(Router(pool, s.models, s.routing, random.Random(3)))
        picks = [await off.acquire(request(), Principal(), None) for _ in range(3)]
        assert all(picks) and pool.engines["e"].outstanding == 3  # the engine queues, not us
        off.release(pool.engines["e"])
        assert pool.engines["e"].outstanding == 2 and off.view("m")["enabled"] is False

    asyncio.run(run())


def test_scheduler_settings() -> None:
    base: dict[str, Any] = {
        "engines": [{"name": "e", "kind": "openai", "url": "http://x", "max_inflight": 8}],
        "models": [{"name": "m", "routes": [{"engine": "e"}]}],
        "auth": {"enabled": False},
    }
    s = parse_settings(base, env={})
    assert s.scheduler == SchedulerSettings() and s.scheduler.enabled and s.engines[0].max_inflight == 8
    s = parse_settings({**base, "scheduler": {"max_queue_wait": 2.5, "max_queued_per_key": 7}}, env={})
    assert (s.scheduler.max_queue_wait, s.scheduler.max_queued_per_key) == (2.5, 7)
    for section, problem in [
        ({"max_queue_wait": 0}, "scheduler.max_queue_wait"),
        ({"max_queued_per_key": 0}, "scheduler.max_queued_per_key"),
        ({"max_queue_wait": "long"}, "scheduler.max_queue_wait"),
        ({"quantum": 5}, "scheduler.quantum"),
    ]:
        with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
            parse_settings({**base, "scheduler": section}, env={})
    bad = {**base, "engines": [{"name": "e", "kind": "openai", "url": "http://x", "max_inflight": 0}]}
    with pytest.raises(ConfigError, match=r"engines\[0\]\.max_inflight"):
        parse_settings(bad, env={})
