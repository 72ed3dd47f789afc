"""A configuration reload, as the main process runs it (SIGHUP, or a worker's `POST /admin/reload`).

One at a time:
1. the file is read and checked whole, as at start (gateway/settings/changes.py `examine`): a bad
   file, an unchanged one, or one that changes what only a restart can, ends here;
2. managed engines the new configuration adds are started, and waited for until they answer
   /health (a failure stops them again: nothing else has changed);
3. every worker is sent the text read in 1 and applies it (gateway/front/running.py) and answers;
   if one cannot, those that did are sent the running configuration back, and the engines of 2
   are stopped: the gateway is left as it was, and the outcome says why;
4. the main process takes the new configuration (what it spawns from now on, its drain
   settings), the supervisor the new engine settings, and engines no longer configured are
   stopped once no worker has a request there.
A worker that connects with another version than the running one (spawned during a reload) is
sent the running one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from gateway.engines.control import ControlServer
from gateway.engines.supervisor import Supervisor, port_conflict, port_taken
from gateway.settings.changes import Outcome, engine_changes, examine
from gateway.settings.source import ConfigSource, Loaded

log = logging.getLogger("gateway")

WORKER_WAIT = 120.0  # a worker's swap: a health check of new engines, a read of Redis


class MainReloads:
    def __init__(
        self,
        source: ConfigSource,
        loaded: Loaded,
        supervisor: Supervisor,
        control: ControlServer,
        on_commit: Callable[[Loaded], None],
    ) -> None:
        self.source = source
        self.loaded = loaded  # the running configuration
        self._supervisor = supervisor
        self._control = control
        self._on_commit = on_commit
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._answers: dict[int, dict[int, asyncio.Future[str | None]]] = {}  # reload id -> worker -> error
        self._versions: dict[int, str] = {}  # worker -> the version it said it serves

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def run(self, why: str) -> Outcome:
        async with self._lock:
            outcome = await self._reload()
            self._catch_up()
        (log.info if outcome.ok else log.error)("%s: %s", why, outcome.describe())
        return outcome

    def _catch_up(self) -> None:
        """Workers that serve another version than the running one (one started while a reload
        ran, one that could not follow a rollback) are sent it; they answer when they have it."""
        running = self.loaded
        for worker, version in list(self._versions.items()):
            if version != running.version:
                self._control.send(worker, {"op": "reload", "id": 0, "text": running.text, "version": running.version})

    async def _reload(self) -> Outcome:
        running = self.loaded
        examined = examine(self.source, running.version, running.settings)
        if examined.outcome is not None:
            return examined.outcome
        new = examined.loaded
        assert new is not None
        added, removed = engine_changes(running.settings, new.settings)
        engines = {e.name: e for e in new.settings.engines}
        stopping = [
            f"engine {n}: the engine of that name an earlier reload dropped is still stopping; reload again in a moment"
            for n in added
            if self._supervisor.stopping(engines[n])
        ]
        fresh = [n for n in added if n not in self._supervisor.engines]
        taken = [port_conflict(engines[n]) for n in fresh if port_taken(engines[n].port or 0)]
        if stopping or taken:
            return Outcome("failed", running.version, errors=(*stopping, *taken))
        for name in added:
            self._supervisor.add(engines[name])
        problems = await self._supervisor.started(added)
        if not problems:
            problems = await self._swap_workers(new)
            if problems:
                await self._swap_workers(running)  # those that took it go back
        if problems:
            for name in added:
                if name in fresh:
                    await self._supervisor.remove(name, "the reload that started it failed")
                else:
                    self._supervisor.retire(name)  # dropped still: kept by this reload only
            return Outcome("failed", running.version, errors=tuple(problems))
        for engine in new.settings.engines:
            if engine.managed and engine.name not in added:
                self._supervisor.update(engine)
        for name in removed:
            self._supervisor.retire(name)
        self._supervisor.tracing = new.settings.tracing
        self.loaded = new
        self._on_commit(new)
        return Outcome("reloaded", new.version, running.version, examined.changed)

    async def _swap_workers(self, loaded: Loaded) -> list[str]:
        """Every connected worker applies `loaded`; what went wrong, per worker."""
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        waiting = self._answers[rid] = {}
        message = {"op": "reload", "id": rid, "text": loaded.text, "version": loaded.version}
        for worker in self._control.workers:
            if self._control.send(worker, message):
                waiting[worker] = loop.create_future()
        try:
            done, late = await asyncio.wait(waiting.values(), timeout=WORKER_WAIT) if waiting else (set(), set())
        finally:
            self._answers.pop(rid, None)
        problems = [f"worker {w}: {f.result()}" for w, f in waiting.items() if f in done and f.result()]
        if late:
            problems.append(f"{len(late)} worker(s) did not answer within {WORKER_WAIT:.0f}s")
        return problems

    def answered(self, worker: int, message: dict[str, Any]) -> None:
        """A worker's `reloaded`: its error, or None."""
        rid = message.get("id")
        if isinstance(message.get("version"), str):
            self._versions[worker] = message["version"]
        future = self._answers.get(rid, {}).get(worker) if isinstance(rid, int) else None
        if future is not None and not future.done():
            error = message.get("error")
            future.set_result(str(error) if error else None)

    def gone(self, worker: int) -> None:
        """A worker's connection ended: it will not answer (its successor starts with the settings
        of the reload's outcome, or is sent them when it says hello)."""
        self._versions.pop(worker, None)
        for waiting in self._answers.values():
            future = waiting.get(worker)
            if future is not None and not future.done():
                future.set_result(None)

    def hello(self, worker: int, version: Any) -> None:
        """A worker that started with another configuration than the running one is sent it."""
        self._versions[worker] = str(version)
        if not self.busy:  # else at the reload's end
            self._catch_up()
