"""Spend rollups: every settled request of a key is added to its hour's row in memory (per key,
team, organization, model, route) and the rows are added to the store every FLUSH_SECONDS, off
the request path. Each replica adds its own figures (the store sums), so the history is the sum
of what every replica charged, and survives Redis.

A store that is down keeps the rows here (merged, so memory grows with distinct rows, not
requests) up to MAX_ROWS; past that the oldest hours are dropped and logged.

A batch line's row is not added here: made by `line_spend` (gateway/batch/dispatch.py), it is
written with the line's result, in the same transaction (gateway/store/lines.py), so a line that
ran twice (its replica died before recording it) counts once, as its charge in Redis does: the
run whose result is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gateway.access.base import Grant, Usage
from gateway.monitor.alerts import BudgetAlerts
from gateway.store import SpendRow, Store

log = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0
MAX_ROWS = 100_000
_Key = tuple[int, str, str, str, str, str]


class SpendLog:
    def __init__(
        self, flush_seconds: float = FLUSH_SECONDS, clock: Any = time.time, alerts: BudgetAlerts | None = None
    ) -> None:
        self.flush_seconds = flush_seconds
        self._alerts = alerts  # told of every charge, to look at the budgets (off the request path)
        self._clock = clock
        self._rows: dict[_Key, list[int]] = {}
        self._store: Store | None = None
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # a reader's flush waits for one in flight (its rows are in it)
        self.dropped = 0

    def add(self, grant: Grant, usage: Usage, cost: int) -> None:
        """The spend sink of gateway/access/auth.py: O(1), no I/O."""
        if self._alerts is not None and cost and grant.admission is not None:
            self._alerts.note(grant.admission.levels)
        if grant.request is not None and grant.request.batch_line is not None:
            return  # written with the line's result
        row = _row(grant, self._clock())
        if row is None:
            return
        sums = self._rows.get(row)
        if sums is None:
            if len(self._rows) >= MAX_ROWS:
                self._drop_oldest()
            sums = self._rows[row] = [0, 0, 0, 0, 0]
        sums[0] += 1
        sums[1] += usage.prompt_tokens
        sums[2] += usage.completion_tokens
        sums[3] += usage.cached_tokens
        sums[4] += cost

    def _drop_oldest(self) -> None:
        oldest = min(self._rows)
        self._rows.pop(oldest)
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("spend rollups: the store has been unreachable too long; %d rows dropped", self.dropped)

    def start(self, store: Store) -> None:
        self._store = store
        self._task = asyncio.create_task(self._run(), name="spend-rollups")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def flush(self) -> bool:
        """Adds what is held to the store; True when nothing is left held."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        if self._store is None or not self._rows:
            return not self._rows
        taken, self._rows = self._rows, {}
        rows = [SpendRow(*k, *v) for k, v in taken.items()]
        try:
            await self._store.add_spend(rows)
        except Exception as exc:  # any driver's error: keep the rows for the next try
            log.warning("spend rollups: the store refused %d rows, keeping them: %s", len(rows), exc)
            for k, v in taken.items():
                held = self._rows.setdefault(k, [0, 0, 0, 0, 0])
                for i, n in enumerate(v):
                    held[i] += n
            return False
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()


def line_spend(grant: Grant | None, now: float) -> SpendRow | None:
    """What a batch line's run was charged, as the spend row its result is recorded with; None when
    it was charged nothing (refused at admission, or no key)."""
    if grant is None or grant.usage is None:
        return None
    row = _row(grant, now)
    if row is None:
        return None
    usage = grant.usage
    return SpendRow(*row, 1, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, grant.cost)


def _row(grant: Grant, now: float) -> _Key | None:
    key = grant.principal.key
    if key is None or grant.request is None:
        return None
    return (int(now // 3600 * 3600), key.id, key.team or "", key.org or "", grant.request.model, grant.route or "")
