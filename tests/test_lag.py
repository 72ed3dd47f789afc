"""gateway/resp/lag.py on a real event loop: a bound on Redis's time that the loop's own lag (a
callback that holds the loop) does not use up, and that still ends a real wait on time."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.resp.lag import MAX_STRETCH, lag_meter, within


async def _reply_after(delay: float, hold: float) -> float:
    """A reply that comes `delay` seconds in, while a callback holds the loop for `hold` seconds."""
    loop = asyncio.get_running_loop()
    lag_meter()
    await asyncio.sleep(0.1)  # the meter has ticked
    reply: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, time.sleep, hold)  # the loop's own work, e.g. a big body parsed on it
    loop.call_later(delay, reply.set_result, "ok")
    start = time.monotonic()
    async with within(0.2):
        assert await reply == "ok"
    return time.monotonic() - start


def test_the_loops_own_lag_does_not_use_up_the_bound() -> None:
    # With asyncio.timeout(0.2) this raises: the reply was read at 0.31 s, after the bound's timer
    took = asyncio.run(_reply_after(0.15, 0.3))
    assert 0.3 <= took < 1.0


def test_plain_timeout_is_fooled_by_the_same_lag() -> None:
    async def plain() -> None:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.01, time.sleep, 0.3)
        loop.call_later(0.15, reply.set_result, "ok")
        async with asyncio.timeout(0.2):
            await reply

    with pytest.raises(TimeoutError):
        asyncio.run(plain())


def test_a_real_silence_ends_on_time() -> None:
    async def silent() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with within(0.2):
                await asyncio.get_running_loop().create_future()
        return time.monotonic() - start

    assert 0.2 <= asyncio.run(silent()) < MAX_STRETCH * 0.2 + 0.25  # generous: a loaded machine


def test_lag_stretches_the_bound_at_most_max_stretch_times() -> None:
    async def held() -> float:
        loop = asyncio.get_running_loop()
        lag_meter()
        start = time.monotonic()
        for i in range(12):  # the loop held 0.1 s of every 0.11 s, for 1.3 s
            loop.call_later(0.01 + 0.11 * i, time.sleep, 0.1)
        with pytest.raises(TimeoutError):
            async with within(0.2):
                await loop.create_future()
        return time.monotonic() - start

    assert asyncio.run(held()) < MAX_STRETCH * 0.2 + 0.25
