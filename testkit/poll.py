"""Wait for a condition instead of sleeping a fixed time: a test that polls is as fast as the
machine allows and still passes on a loaded one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    until: Callable[[T], object] = bool,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Call `probe` every `interval` seconds until `until(value)` holds, and return that value.

    Fails after `timeout` seconds with the last value (or the last exception the probe raised),
    so a failure says what was seen, not just that time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
            if until(value):
                return value
            last: object = value
        except Exception as exc:  # a probe may fail while the thing it watches is still starting
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{what or getattr(probe, '__name__', 'condition')} did not hold within {timeout}s; last: {last!r}"
            )
        time.sleep(interval)


async def eventually_async(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], object] = bool,
    *,
    timeout: float = 30.0,  # noqa: ASYNC109 (a polling deadline, not a cancellation)
    interval: float = 0.05,
    what: str = "",
) -> T:
    """`eventually` for a coroutine probe, sleeping with asyncio so the loop keeps running."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await probe()
            if until(value):
                return value
            last: object = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{what or getattr(probe, '__name__', 'condition')} did not hold within {timeout}s; last: {last!r}"
            )
        await asyncio.sleep(interval)
