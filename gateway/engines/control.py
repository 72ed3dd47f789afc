"""The control channel between the gateway's main process and its worker processes.

The supervisor lives in the main process (gateway/process/main.py) and owns the engine processes; the
requests are served by the worker processes (gateway/process/worker.py), one or many. They talk over a
Unix socket the main process owns, in a private directory, one JSON object per line:

    main -> worker   {"op": "states", "engines": {"cpu-0": "stopped", ...}}   at connect and on change
                     {"op": "woken", "engine": "cpu-0", "started": true}       the answer to a wake
                     {"op": "reload", "id": 7, "text": "...", "version": "..."} serve this configuration
                     {"op": "reload_result", "id": 3, "status": "reloaded", ...} the answer to a reload request
                     {"op": "announce", "version": "..."}                       tell the other replicas
    worker -> main   {"op": "hello", "pid": 1234, "version": "..."}             once serving
                     {"op": "wake", "engine": "cpu-0"}                          a request needs it
                     {"op": "load", "engines": {"cpu-0": [outstanding, picks]}} on change, <= 4/s
                     {"op": "health", "engines": {"cpu-0": true}}               on change
                     {"op": "reload_request", "id": 3, "why": "..."}            reload the file (admin API)
                     {"op": "reloaded", "id": 7, "error": null}                 the answer to a reload

Why a Unix socket: both directions push (a wake reaches the supervisor and the new state reaches
every worker at once, no polling), nothing else on the machine can reach it (a private 0700
directory; no port to collide with a second gateway), and a worker that dies closes its
connection, so its load reports are forgotten at once. It works the same whether the worker is a
child process or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


class EngineState(StrEnum):
    STOPPED = "stopped"  # not running; a request for its model starts it (scale to zero)
    STARTING = "starting"  # its process runs (or is about to be restarted) but has not answered /health yet
    RUNNING = "running"  # answered /health: workers route to it (and health-check it themselves)
    STOPPING = "stopping"  # idle: about to be stopped unless traffic comes back first
    FAILED = "failed"  # cannot be started now: its port is taken, or it crash-loops


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


Handler = Callable[[int, dict[str, Any]], dict[str, Any] | None]


class ControlServer:
    """The main process's end: one connection per worker. `handle(worker, message)` may return
    an answer for that worker; `gone(worker)` is called when its connection ends. (The metrics
    hub, gateway/process/metrics_hub.py, serves its own socket with one of these: `limit` is the
    longest line.)"""

    def __init__(
        self,
        path: str,
        handle: Handler,
        gone: Callable[[int], None],
        greeting: Callable[[], bytes] | None = None,
        limit: int = MAX_LINE,
    ) -> None:
        self.path = path
        self._handle = handle
        self._gone = gone
        self._greeting = greeting
        self._limit = limit
        self._server: asyncio.Server | None = None
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=self._limit)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers.values()):
            writer.close()
        self._writers.clear()

    @property
    def workers(self) -> list[int]:
        """The workers connected now."""
        return list(self._writers)

    def send(self, worker: int, message: dict[str, Any]) -> bool:
        """To one worker; False when it is gone."""
        writer = self._writers.get(worker)
        if writer is None or writer.is_closing():
            return False
        writer.write(encode(message))
        return True

    def broadcast(self, data: bytes) -> None:
        for writer in list(self._writers.values()):
            if not writer.is_closing():
                writer.write(data)

    def send_raw(self, worker: int, data: bytes) -> None:
        """Lines already encoded (one message sent to several workers is encoded once)."""
        writer = self._writers.get(worker)
        if writer is not None and not writer.is_closing():
            writer.write(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = next(self._ids)
        self._writers[worker] = writer
        if self._greeting is not None:
            writer.write(self._greeting())
        try:
            while line := await reader.readline():
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("control channel: ignoring a malformed message from worker %d", worker)
                    continue
                if isinstance(message, dict) and (answer := self._handle(worker, message)) is not None:
                    writer.write(encode(answer))
        except (ConnectionError, ValueError):  # ValueError: a line over MAX_LINE
            pass
        finally:
            self._writers.pop(worker, None)
            self._gone(worker)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
