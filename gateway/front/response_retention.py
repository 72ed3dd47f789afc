"""Retention of stored Responses API answers: every replica deletes, hourly, those older than
`store.responses_retention_days` (0 keeps them). A StoreUser: it starts once the store is open."""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.settings.store import StoreSettings
from gateway.store import Store

log = logging.getLogger(__name__)

INTERVAL = 3600.0
DAY = 86400.0


class ResponseRetention:
    def __init__(self, settings: StoreSettings) -> None:
        self._days = settings.responses_retention_days
        self._task: asyncio.Task[None] | None = None

    def start(self, store: Store) -> None:
        if self._days > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop(store), name="responses-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def trim(self, store: Store) -> int:
        return await store.delete_responses_before(time.time() - self._days * DAY)

    async def _loop(self, store: Store) -> None:
        while True:
            try:
                deleted = await self.trim(store)
                if deleted:
                    log.info("stored responses: retention deleted %d", deleted)
            except Exception as exc:
                log.warning("stored responses: retention failed (%s); next try in %.0f s", exc, INTERVAL)
            await asyncio.sleep(INTERVAL)
