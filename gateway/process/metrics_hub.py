"""The main process's end of the workers' metrics (gateway/core/metrics_link.py has the protocol).

With `--workers N` (N > 1) each worker keeps its metrics in memory; this hub, on a Unix socket in
the main process's private directory, sums them for a scrape. A worker scraped sends its own
snapshot; the hub asks every other worker for theirs (`collect`), waits for the answers (at most
`COLLECT_WAIT`: a worker too busy to answer counts with its last snapshot), and answers with the
sum. Scrapes that arrive while a collection runs share it.

A worker that ends (its connection closes) leaves its last snapshot's counters and histograms
here, added to every later sum; its gauges go (they say what is live: requests in flight, engine
health). So a total never goes back: every sum a scrape showed was made of snapshots the hub
kept. What a worker killed outright counted after its last snapshot (pushed every second, and
with every scrape) is lost; a worker that stops normally pushes its last one after its drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from gateway.core.metrics_link import MAX_LINE, encode
from gateway.core.metrics_sum import Families, counted, merge
from gateway.engines.control import ControlServer

COLLECT_WAIT = 2.0  # seconds a scrape waits for the other workers' snapshots


class MetricsHub:
    def __init__(self, path: str) -> None:
        self.path = path
        self._channel = ControlServer(path, self._handle, self._gone, limit=MAX_LINE)
        self._latest: dict[int, Families] = {}  # each connected worker's last snapshot
        self._retired: Families = {}  # the counts of workers that ended
        self._answers: set[asyncio.Task[None]] = set()
        self._rounds = itertools.count(1)
        self._round: asyncio.Task[None] | None = None
        self._round_id = 0
        self._pending: set[int] = set()  # workers the running collection waits for
        self._answered = asyncio.Event()

    async def start(self) -> None:
        await self._channel.start()

    async def close(self) -> None:
        await self._channel.close()

    def total(self) -> Families:
        return merge([self._retired, *self._latest.values()])

    def _handle(self, worker: int, message: dict[str, Any]) -> None:
        op, families = message.get("op"), message.get("families")
        if isinstance(families, dict):
            self._latest[worker] = families
        if op == "snapshot" and message.get("id") == self._round_id:
            self._done(worker)
        elif op == "scrape":
            task = asyncio.get_running_loop().create_task(self._answer(worker, message.get("id")))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)

    def _gone(self, worker: int) -> None:
        last = self._latest.pop(worker, None)
        if last is not None:
            self._retired = merge([self._retired, counted(last)])
        self._done(worker)

    def _done(self, worker: int) -> None:
        self._pending.discard(worker)
        if not self._pending:
            self._answered.set()

    async def _answer(self, worker: int, ask: Any) -> None:
        if self._round is None or self._round.done():
            self._round = asyncio.get_running_loop().create_task(self._collect(worker))
        await asyncio.shield(self._round)
        self._channel.send_raw(worker, encode({"op": "sum", "id": ask, "families": self.total()}))

    async def _collect(self, scraped: int) -> None:
        """Every other worker's snapshot, or its last one for those that do not answer in time."""
        self._round_id = next(self._rounds)
        self._pending = set(self._channel.workers) - {scraped}
        self._answered.clear()
        ask = encode({"op": "collect", "id": self._round_id})
        for worker in self._pending:
            self._channel.send_raw(worker, ask)
        if self._pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COLLECT_WAIT):
                    await self._answered.wait()
        self._pending = set()
