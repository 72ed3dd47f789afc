"""A worker's end of the metrics hub (gateway/process/metrics_hub.py), with `--workers N` (N > 1).

A worker keeps its metrics in its own memory; a scrape of `/metrics` on any worker sends this
worker's snapshot to the hub, which asks every other worker for theirs and answers with the sum
(gateway/core/metrics_sum.py). One JSON object per line over a Unix socket in the main process's
private directory:

    worker -> hub   {"op": "scrape", "id": 1, "families": {...}}    a scrape: this worker's values
                    {"op": "snapshot", "id": 7, "families": {...}}  the answer to a collect
                    {"op": "snapshot", "id": null, "families": ...} pushed: every second, and the last at exit
    hub -> worker   {"op": "collect", "id": 7}                       another worker is scraped
                    {"op": "sum", "id": 1, "families": {...}}        the answer to a scrape

The pushes bound what a worker killed outright (SIGKILL, a crash) takes with it: the hub keeps
every worker's last snapshot, and a worker's counts outlive it from there. A push costs a
snapshot (about a millisecond with a few hundred series); with many series (thousands of API
keys) pushes space out so that they never take more than 1% of a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.core.metrics_sum import Families

log = logging.getLogger(__name__)

MAX_LINE = 1 << 28  # a snapshot with many API keys' series is megabytes, on one line
ASK_TIMEOUT = 10.0  # a scrape's wait for the sum (Prometheus' default scrape timeout; the hub waits 2 s at most)
PUSH_EVERY = 1.0  # seconds between pushes at least
PUSH_SHARE = 0.01  # of a core, at most


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


class MetricsLink:
    """This worker's connection to the hub; `snapshot` gives this worker's values (GatewayMetrics)."""

    def __init__(self, path: str, snapshot: Callable[[], Families]) -> None:
        self._path = path
        self._snapshot = snapshot
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._asked: dict[int, asyncio.Future[Families]] = {}
        self._ids = itertools.count(1)

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(self._path, limit=MAX_LINE)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(reader)), loop.create_task(self._push())]

    async def stop(self) -> None:
        """The last push (after the drain: every request counted), then the connection closes."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._send("snapshot", None)
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def sum(self) -> Families:
        """Every worker's metrics summed. ConnectionError or TimeoutError when the hub cannot say."""
        ask = next(self._ids)
        if not self._send("scrape", ask):
            raise ConnectionError("no connection to the metrics hub")
        answer = self._asked[ask] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return await answer
        finally:
            self._asked.pop(ask, None)

    def _send(self, op: str, ask: int | None) -> bool:
        """This worker's snapshot to the hub: a scrape, or a snapshot (asked for, or pushed)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(encode({"op": op, "id": ask, "families": self._snapshot()}))
        return True

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = orjson.loads(line)
                op = message.get("op")
                if op == "collect":
                    self._send("snapshot", message.get("id"))
                elif op == "sum":
                    answer = self._asked.get(message.get("id"))
                    if answer is not None and not answer.done():
                        answer.set_result(message.get("families") or {})
        except (ConnectionError, ValueError) as exc:
            log.error("the metrics hub's connection failed (%s): /metrics answers 503", exc)
        finally:
            if self._writer is not None:
                self._writer.close()  # from now on a scrape fails at once
            for answer in self._asked.values():
                if not answer.done():
                    answer.set_exception(ConnectionError("the metrics hub closed the connection"))

    async def _push(self) -> None:
        wait = PUSH_EVERY
        while True:
            await asyncio.sleep(wait)
            began = time.perf_counter()
            self._send("snapshot", None)
            wait = max(PUSH_EVERY, (time.perf_counter() - began) / PUSH_SHARE)
