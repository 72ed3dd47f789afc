"""The store and the batch runner in a gateway process's life: opened at start, closed at the end.

The store is never on the interactive request path, so a store that cannot be opened (PostgreSQL
down, an unwritable data directory) does not keep the gateway from serving: it logs why, the
Files and Batches endpoints answer 503 `store_unavailable`, and it tries again every
RETRY_SECONDS; the batch runner starts once the store is open.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.batch.runner import BatchRunner
from gateway.context import Gateway
from gateway.store import open_store, redact_url

log = logging.getLogger(__name__)

RETRY_SECONDS = 10.0


class BatchService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.runner = BatchRunner(gw)
        self._opening: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not await self._open():
            self._opening = asyncio.create_task(self._keep_trying(), name="store-open")

    async def stop(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        await self.runner.stop()
        if self.gw.store is not None:
            await self.gw.store.close()
            self.gw.store = None

    async def _open(self) -> bool:
        s = self.gw.settings.store
        try:
            store = await open_store(s.url, s.data_dir)
        except Exception as exc:  # any driver's error: the gateway serves on without batches
            log.error(
                "the store %s cannot be opened (retrying every %.0f s): %s", redact_url(s.url), RETRY_SECONDS, exc
            )
            return False
        self.gw.store = store
        self.runner.start(store)
        return True

    async def _keep_trying(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if await self._open():
                log.info("the store %s is open", redact_url(self.gw.settings.store.url))
                return
