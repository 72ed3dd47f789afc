"""The store in a gateway process's life: opened at start, closed at the end, and what uses it
(the batch runner, the inference log's writer) started once it is open.

The store is never on the interactive request path, so a store that cannot be opened (PostgreSQL
down, an unwritable data directory) does not keep the gateway from serving: it logs why, the
Files and Batches endpoints answer 503 `store_unavailable`, the inference log holds (then drops
and counts) its rows, and it tries again every RETRY_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from gateway.proxy.context import Gateway
from gateway.store import Store, open_store, redact_url

log = logging.getLogger(__name__)

RETRY_SECONDS = 10.0


class StoreUser(Protocol):
    def start(self, store: Store) -> None: ...

    async def stop(self) -> None: ...


class StoreService:
    def __init__(self, gw: Gateway, users: Sequence[StoreUser]) -> None:
        self.gw = gw
        self._users = list(users)
        self._opening: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not await self._open():
            self._opening = asyncio.create_task(self._keep_trying(), name="store-open")

    async def stop(self) -> None:
        """Stops the users (each writes what it holds) before the store closes."""
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        for user in self._users:
            await user.stop()
        if self.gw.store is not None:
            await self.gw.store.close()
            self.gw.store = None

    async def _open(self) -> bool:
        s = self.gw.settings.store
        try:
            store = await open_store(s.url, s.data_dir)
        except Exception as exc:  # any driver's error: the gateway serves on without the store
            log.error(
                "the store %s cannot be opened (retrying every %.0f s): %s", redact_url(s.url), RETRY_SECONDS, exc
            )
            return False
        self.gw.store = store
        for user in self._users:
            user.start(store)
        return True

    async def _keep_trying(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if await self._open():
                log.info("the store %s is open", redact_url(self.gw.settings.store.url))
                return
