"""The batch lines one gateway process may have in flight (`batch.concurrency`), shared by the
batches it runs. Unlike a semaphore, a wait can be called off: a batch that is halted (cancelled,
expired, its lease lost) stops waiting at once instead of taking one more slot."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def take(self, halted: asyncio.Event) -> bool:
        """Waits for a free slot and takes it; False (and no slot) once `halted` is set."""
        while not halted.is_set():
            if self.free > 0:
                self.free -= 1
                return True
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self.free > 0:
            self._wake_one()  # a wake-up that came for this waiter goes to the next one
        return False

    def give(self) -> None:
        self.free += 1
        self._wake_one()

    def wake_all(self) -> None:
        """Wakes every waiter to look at its halt event again (the others wait on)."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wake_one(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return
