"""Quota operations waiting for Redis: cancels of admissions given up on, and releases that could
not be sent. Each is idempotent, so they are run again, all together, every RETRY_EVERY seconds
until Redis has run them (gateway/access/quota.py says why each is needed).
"""

from __future__ import annotations

import asyncio
import logging

from gateway.access.keys import REDIS_DOWN
from gateway.resp.client import LeanClient, Script, ScriptKeys

log = logging.getLogger(__name__)

RETRY_EVERY = 0.5
MAX_PENDING = 100_000

Op = tuple[Script, ScriptKeys, list[str | int]]


class PendingOps:
    def __init__(self, redis: LeanClient, deadline: float) -> None:
        self._redis = redis
        self._deadline = deadline  # for one try of all of them
        self._ops: dict[str, Op] = {}  # lease id -> the operation on it
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._ops)

    def add(self, lease_id: str, script: Script, keys: ScriptKeys, args: list[str | int]) -> None:
        if len(self._ops) >= MAX_PENDING:
            self._ops.pop(next(iter(self._ops)))
            log.error("more than %d quota operations wait for Redis; dropped the oldest", MAX_PENDING)
        self._ops[lease_id] = (script, keys, args)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._retry(), name="quota-retry")

    async def _retry(self) -> None:
        while self._ops:
            await asyncio.sleep(RETRY_EVERY)
            await self.flush()

    async def flush(self) -> bool:
        """Runs every waiting operation now; True when none is left."""
        batch = list(self._ops.items())
        if not batch:
            return True
        try:
            async with asyncio.timeout(self._deadline):
                replies = await asyncio.gather(
                    *(self._redis.run_script(script, keys, args) for _, (script, keys, args) in batch),
                    return_exceptions=True,
                )
        except (*REDIS_DOWN, TimeoutError):
            return False
        for reply in replies:
            if isinstance(reply, REDIS_DOWN):
                return False  # all of them again: each is idempotent
            if isinstance(reply, BaseException):
                log.error("a quota operation failed in Redis and is dropped: %r", reply)
        for lease_id, op in batch:
            if self._ops.get(lease_id) is op:
                del self._ops[lease_id]
        return not self._ops

    async def close(self) -> None:
        """Stops the retries after one last try."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._ops:
            await self.flush()
