"""The audit log's writer: every admin change, who made it (role, how signed in, from where), what
it changed, before and after, when. Written to the store at once (an admin change is not on the
request path); an entry the store refuses is kept and retried, so a change is never unrecorded
because PostgreSQL blinked. Secrets never reach it: `redact` drops them from before/after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from gateway.access.roles import Actor
from gateway.store import AuditEntry, Store

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0
MAX_HELD = 10_000
SECRET_FIELDS = frozenset({"key", "secret", "hash", "client_secret", "token", "access_token", "id_token"})


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("[redacted]" if k in SECRET_FIELDS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(redact(value)).decode()


class AuditLog:
    def __init__(self) -> None:
        self._store: Store | None = None
        self._held: list[AuditEntry] = []
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    @property
    def store(self) -> Store | None:
        return self._store

    def start(self, store: Store) -> None:
        self._store = store
        self._task = asyncio.create_task(self._run(), name="audit-retry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._flush()

    async def record(
        self, actor: Actor, action: str, target: str, *, team: str | None = None, before: Any = None, after: Any = None
    ) -> None:
        entry = AuditEntry(
            time.time(),
            actor.subject,
            actor.role,
            actor.via,
            actor.address,
            action,
            target,
            team,
            _json(before),
            _json(after),
        )
        self._held.append(entry)
        if len(self._held) > MAX_HELD:
            lost = self._held.pop(0)
            log.error(
                "audit log: the store is unreachable; entry dropped: %s %s by %s", lost.action, lost.target, lost.actor
            )
        await self._flush()

    async def _flush(self) -> None:
        async with self._flushing:  # one writer: two changes audited at once must not write one entry twice
            while self._held and self._store is not None:
                try:
                    await self._store.append_audit(self._held[0])
                except Exception as exc:  # any driver's error: retried by _run
                    log.warning("audit log: the store refused an entry (kept, retrying): %s", exc)
                    return
                self._held.pop(0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            await self._flush()
