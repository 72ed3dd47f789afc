"""The store in a gateway process's life: opened at start, closed at the end, and what uses it
(the batch runner, the inference log's writer) started once it is open.

The store is never on the interactive request path, so a store that cannot be opened (PostgreSQL
down, an unwritable data directory) does not keep the gateway from serving: it logs why, the
Files and Batches endpoints answer 503 `store_unavailable` (`require`), the inference log holds
(then drops and counts) its rows, and it tries again every RETRY_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from gateway.core.errors import Code, GatewayError
from gateway.settings.store import StoreSettings
from gateway.store import Store, open_store, redact_url

log = logging.getLogger(__name__)

RETRY_SECONDS = 10.0


class StoreUser(Protocol):
    def start(self, store: Store) -> None: ...

    async def stop(self) -> None: ...


class StoreService:
    """The one store of a process: `current` is None until it is open (and after it closed)."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.current: Store | None = None
        self._users: list[StoreUser] = []
        self._opening: asyncio.Task[None] | None = None

    def require(self) -> Store:
        if self.current is None:
            raise GatewayError(
                503,
                "Files, batches and the inference log are unavailable: the store is not open (see the gateway's log).",
                code=Code.STORE_UNAVAILABLE,
            )
        return self.current

    async def start(self, users: Sequence[StoreUser]) -> None:
        self._users = list(users)
        if not await self._open():
            self._opening = asyncio.create_task(self._keep_trying(), name="store-open")

    def add(self, user: StoreUser) -> None:
        """A user that comes later (a reload's new inference log): started now if the store is open."""
        self._users.append(user)
        if self.current is not None:
            user.start(self.current)

    async def remove(self, user: StoreUser) -> None:
        """A user that goes before the store closes: stopped (it writes what it holds)."""
        if user in self._users:
            self._users.remove(user)
            if self.current is not None:
                await user.stop()

    async def stop(self) -> None:
        """Stops the users (each writes what it holds) before the store closes."""
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        for user in self._users:
            await user.stop()
        store, self.current = self.current, None
        if store is not None:
            await store.close()

    async def _open(self) -> bool:
        s = self.settings
        try:
            store = await open_store(s.url, s.data_dir)
        except Exception as exc:  # any driver's error: the gateway serves on without the store
            log.error(
                "the store %s cannot be opened (retrying every %.0f s): %s", redact_url(s.url), RETRY_SECONDS, exc
            )
            return False
        self.current = store
        for user in self._users:
            user.start(store)
        return True

    async def _keep_trying(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if await self._open():
                log.info("the store %s is open", redact_url(self.settings.url))
                return
