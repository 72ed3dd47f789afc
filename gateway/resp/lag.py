"""The event loop's own lag, so a busy gateway is not mistaken for a silent Redis.

A timer that bounds a Redis call counts wall time, and wall time includes every moment the loop
spent on other work or the process waited for a core. On a starved machine (both cores busy with
other processes, big bodies parsed on the loop) that alone passed a 0.5 s bound: a reply already
in the socket was never read in time, the call failed, and the quota's breaker answered every
request 503 `quota_unavailable` for a second (45 of 300 requests in tests/test_redis_stalls.py).

`LagMeter` ticks every `TICK` seconds and adds up how late its ticks run: the time the loop could
not have read a reply. `within(seconds)` bounds a block by Redis's time, that is wall time less the
loop's lag, and by `MAX_STRETCH` times `seconds` of wall time whatever the lag.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

TICK = 0.05
SLACK = 0.005  # lateness a timer always has; not lag
MAX_STRETCH = 4.0

_meters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LagMeter] = weakref.WeakKeyDictionary()


class LagMeter:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lag = 0.0  # seconds of lag seen since the meter started
        self._loop = loop
        self._due = loop.time() + TICK
        self._handle = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late > SLACK:
            self.lag += late
        self._due = now + TICK
        self._handle = self._loop.call_at(self._due, self._tick)

    def close(self) -> None:
        self._handle.cancel()


def lag_meter() -> LagMeter:
    """The running loop's meter, started on first use."""
    loop = asyncio.get_running_loop()
    meter = _meters.get(loop)
    if meter is None:
        meter = _meters[loop] = LagMeter(loop)
    return meter


@asynccontextmanager
async def within(seconds: float | None) -> AsyncIterator[None]:
    """Like `asyncio.timeout(seconds)`, but the loop's own lag does not count (up to MAX_STRETCH
    times `seconds` of wall time). Raises TimeoutError when the bound is passed; None: no bound."""
    if seconds is None:
        yield
        return
    loop = asyncio.get_running_loop()
    meter = lag_meter()
    start, lag0 = loop.time(), meter.lag
    cap = start + MAX_STRETCH * seconds
    async with asyncio.timeout(None) as timeout:
        handle: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal handle
            now = loop.time()
            spent = now - start - (meter.lag - lag0)
            if spent < seconds and now < cap:
                handle = loop.call_at(min(cap, now + seconds - spent), check)
            else:
                timeout.reschedule(now)

        handle = loop.call_at(start + seconds, check)
        try:
            yield
        finally:
            if handle is not None:
                handle.cancel()
