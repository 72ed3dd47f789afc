"""A worker's side of configuration reloads: it applies what the main process read, asks the main
process for a reload (`POST /admin/reload`), and tells the other replicas through Redis.

Under `llm-gateway serve` the main process reads and checks the file, starts and stops managed
engines, and has every worker apply the configuration it read (gateway/process/reload.py), in
one `reload` message each; a worker's `request` asks for it over the control channel and gets
the outcome back. Without a main process (the app under another ASGI server, with
LLM_GATEWAY_CONFIG) the process reloads itself, on SIGHUP or the admin API; it has no managed
engines to start.

Replicas: a reload that changed something is announced on `{prefix}:config:reloaded` (JSON
`{"version", "replica"}`). Every worker of every replica follows that channel and, on an
announcement from another replica, asks for a reload of its own replica's file (the main
process runs them one at a time: the first reloads, the others find the file unchanged). Each
replica reads its own `--config` file: keep the files the same (one ConfigMap on Kubernetes). A
reload caused by an announcement is not announced again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.core.errors import Code, GatewayError
from gateway.front.running import ReloadError, Running
from gateway.observe.access_log import reopen_all
from gateway.settings import ConfigError
from gateway.settings.changes import Outcome, examine
from gateway.settings.source import ConfigSource, Loaded

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 900.0  # a reload that starts a vLLM engine waits for it (its startup_timeout)
PUBLISH_TIMEOUT = 2.0
CHANNEL = "config:reloaded"


class Reloads:
    def __init__(self, source: ConfigSource | None, replica: str, main: bool) -> None:
        self.source = source
        self.replica = replica  # names this replica in announcements (all its workers share it)
        self._main = main  # a main process serves reloads over the control channel
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def attach(self, running: Running) -> None:
        """The process's app, once built (its routes hold this)."""
        self.running = running
        control = running.current.gw.control
        control.handlers.update(reload=self._on_reload, reload_result=self._on_result, announce=self._on_announce)
        running.on_start.append(self._start)
        running.on_stop.append(self._stop)

    # -- a reload asked here -------------------------------------------------------------------

    async def request(self, why: str, announce: bool = True) -> Outcome:
        """Reloads this replica's configuration from its file; announced when it changed."""
        if self.source is None:
            raise GatewayError(
                409,
                "This gateway was not started from a configuration file, so there is nothing to reload.",
                code=Code.RELOAD_UNAVAILABLE,
            )
        outcome = await (self._ask_main(why) if self._main else self.reload_here(why))
        if announce and outcome.status == "reloaded":
            await self.announce(outcome.version)
        return outcome

    async def reload_here(self, why: str) -> Outcome:
        """The reload of a process without a main process (nor managed engines)."""
        assert self.source is not None
        current = self.running.current
        examined = examine(self.source, current.version, current.gw.settings)
        outcome = examined.outcome
        if outcome is None:
            assert examined.loaded is not None
            try:
                if await self.running.apply(examined.loaded):
                    outcome = Outcome("reloaded", examined.loaded.version, current.version, examined.changed)
                else:  # a reload at the same time put it in place first
                    outcome = Outcome("unchanged", examined.loaded.version)
            except ReloadError as exc:
                outcome = Outcome("failed", current.version, errors=(str(exc),))
        (log.info if outcome.ok else log.error)("%s: %s", why, outcome.describe())
        return outcome

    async def _ask_main(self, why: str) -> Outcome:
        rid = next(self._ids)
        answer = self._waiting[rid] = asyncio.get_running_loop().create_future()
        try:
            if not self.running.current.gw.control.send({"op": "reload_request", "id": rid, "why": why}):
                raise GatewayError(
                    503, "This worker has lost its main process; retry the reload.", code=Code.RELOAD_FAILED
                )
            async with asyncio.timeout(ANSWER_TIMEOUT):
                return Outcome.of(await answer)
        except TimeoutError:
            raise GatewayError(
                503,
                "The main process did not answer the reload in time; see the gateway's log.",
                code=Code.RELOAD_FAILED,
            ) from None
        finally:
            self._waiting.pop(rid, None)

    def _on_result(self, message: dict[str, Any]) -> None:
        answer = self._waiting.get(int(message.get("id") or 0))
        if answer is not None and not answer.done():
            answer.set_result(message)

    # -- what the main process asks ------------------------------------------------------------

    def _on_reload(self, message: dict[str, Any]) -> None:
        self._background(self._apply(message))

    async def _apply(self, message: dict[str, Any]) -> None:
        """The configuration the main process read: applied here, the answer sent back."""
        error = None
        try:
            assert self.source is not None, "a worker of the main process has its source"
            text, version = str(message["text"]), str(message["version"])
            loaded = self.source.parse(text)
            await self.running.apply(Loaded(loaded.settings, text, version))
        except (ConfigError, ReloadError, AssertionError) as exc:
            error = str(exc)
            log.error("this worker kept its configuration (version %s): %s", self.running.current.version, error)
        reply = {"op": "reloaded", "id": message.get("id"), "version": self.running.current.version, "error": error}
        self.running.current.gw.control.send(reply)

    def _on_announce(self, message: dict[str, Any]) -> None:
        self._background(self.announce(str(message.get("version"))))

    # -- the other replicas --------------------------------------------------------------------

    async def announce(self, version: str) -> None:
        redis = self.running.current.gw.redis
        if redis is None:
            return
        channel = f"{self.running.current.gw.settings.redis.prefix}:{CHANNEL}"
        data = orjson.dumps({"version": version, "replica": self.replica})
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await redis.clients.admin.publish(channel, data)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("the reload to version %s could not be announced to the other replicas: %r", version, exc)

    async def _follow(self) -> None:
        gw = self.running.current.gw
        assert gw.redis is not None
        channel = f"{gw.settings.redis.prefix}:{CHANNEL}"
        async for event in gw.redis.clients.subscriber.subscribe(channel):
            if event.kind != "message" or event.data is None:
                continue
            try:
                said = orjson.loads(event.data)
                version, replica = str(said["version"]), str(said["replica"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if replica == self.replica or version == self.running.current.version:
                continue
            try:
                await self.request(f"replica {replica} reloaded (version {version})", announce=False)
            except GatewayError as exc:
                log.error("the reload announced by replica %s failed here: %s", replica, exc.message)

    # -- life ----------------------------------------------------------------------------------

    def hup(self) -> None:
        """SIGHUP reaches a worker: logrotate moved the access log (the main process reloads the
        file itself); a process without a main process reloads here too."""
        reopen_all()
        if not self._main and self.source is not None:
            self._background(self.request("SIGHUP"))

    async def _start(self) -> None:
        if self.running.current.gw.redis is not None and self.source is not None:
            self._background(self._follow())

    async def _stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
