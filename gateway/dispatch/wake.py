"""A worker process's side of the control channel (gateway/engines/control.py): engine states in, wakes and load out.

The supervisor in the main process says which managed engines run; this applies it to the pool
(a stopped engine is not probed and gets no traffic). A request for a model whose engines are all
stopped (scale to zero) wakes them and waits, at most the engine's `cold_start_timeout`, then
503 with `retry-after`; requests arriving meanwhile wait for the same start. Traffic for a model
with a healthy engine and a stopped one wakes the stopped one in the background, while the healthy
one serves.

Engines found by DNS (`discover: dns`) scale to zero outside the gateway (KEDA on Kubernetes,
deploy/k8s/): a model whose discovered entries have no address, or only pods that have not passed
a health check yet, is cold, not down. Its requests wait the same way, at most the entry's
`cold_start_timeout`, counted in `gateway_cold_waiting_requests{model}` (the autoscaler's signal
to start the first pod), while the name is resolved every second; they are served as soon as a
pod answers /health. Four times a second the worker reports each engine's outstanding requests and how many
it was sent, which the supervisor's idle timer reads.

Without a channel (an app built on its own) every engine counts as running, as before.

The channel outlives a configuration: a reload hands this the new configuration's router
(`follow`) and its new managed engines (`adopt`), and the channel also carries the reload's own
messages (gateway/front/reloads.py registers for them in `handlers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from gateway.core.errors import Code, GatewayError
from gateway.core.metrics import GatewayMetrics
from gateway.dispatch.routing import Router
from gateway.engines.control import MAX_LINE, EngineState, encode
from gateway.engines.pool import Engine, Pool
from gateway.settings import EngineSettings

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.25
WAKE_RESEND = 2.0  # a wake not followed by a start is sent again after this long
_WAKEABLE = (EngineState.STOPPED, EngineState.STOPPING, EngineState.STARTING)


class EngineControl:
    def __init__(self, pool: Pool, router: Router, metrics: GatewayMetrics, path: str | None) -> None:
        self._pool = pool
        self._router = router
        self._metrics = metrics
        self._path = path
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._woken: dict[str, float] = {}  # engine -> loop time its wake was sent
        self.stopped_models: frozenset[str] = frozenset()
        self._sent: dict[str, Any] = {}
        self._states: dict[str, str] = {}  # the supervisor's last word on each managed engine
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}  # other ops from the main process
        self.adopt(pool.engines.values())

    def adopt(self, engines: Iterable[Engine]) -> None:
        """Managed engines (of this configuration, or of a new one before it serves) take the
        state the supervisor gave them; nothing is ours until it says so."""
        if not self._path:
            return
        for engine in engines:
            if engine.settings.managed:
                state = self._states.get(engine.name)
                self._pool.set_state(engine, EngineState(state) if state else EngineState.STARTING)

    def follow(self, router: Router) -> None:
        """A new configuration serves: its routes say which models a wake is for."""
        self._router = router
        self._stopped_models()

    async def start(self, greeting: dict[str, Any] | None = None) -> None:
        if not self._path:
            return
        reader, self._writer = await asyncio.open_unix_connection(self._path, limit=MAX_LINE)
        self.send({"op": "hello", "pid": os.getpid(), **(greeting or {})})
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(reader)), loop.create_task(self._report())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    def wake_model(self, model: str) -> None:
        """Traffic for `model`, one of `stopped_models`: its stopped engines start."""
        if model in self.stopped_models:
            for engine in self._wakeable(model):
                self._wake(engine)

    async def wait_for(self, model: str) -> bool:
        """No engine of `model` is healthy: if some can be woken, wake them, and if it is cold
        (scaled to zero), wait until one is healthy (True). False when none can be woken (or none
        can any more: its port is taken) and none is coming; GatewayError 503 when the start takes
        longer than the engines' cold_start_timeout."""
        engines = self._wakeable(model)
        entries = self._cold(model)
        if not engines and not entries:
            return False
        for engine in engines:
            self._wake(engine)
        timeout = max(s.wake_timeout for s in [*(e.settings for e in engines), *entries])
        pool = self._pool
        loop = asyncio.get_running_loop()
        began = loop.time()
        waiting = self._metrics.cold_waiting.labels(model)
        waiting.inc()
        try:
            with pool.hurry(e.name for e in entries):
                async with asyncio.timeout(timeout):
                    while not self._healthy(model) and (self._wakeable(model) or self._cold(model)):
                        await pool.changed()
        except TimeoutError:
            why = "its engine was stopped when idle" if engines else "its engines were scaled to zero"
            raise GatewayError(
                503,
                f"The model '{model}' is starting ({why}) and was not ready within {timeout:g}s; retry shortly.",
                code=Code.ENGINE_STARTING,
                headers={"retry-after": str(max(1, math.ceil(timeout / 4)))},
            ) from None
        finally:
            waiting.dec()
            self._metrics.cold_start_wait.labels(model).observe(loop.time() - began)
        return self._healthy(model)

    def wakeable(self, model: str) -> bool:
        """Whether a stopped engine could serve `model`, or its engines are scaled to zero (so
        /ready counts it ready: cold, not down)."""
        return bool(self._wakeable(model)) or self.cold(model)

    def cold(self, model: str) -> bool:
        """No engine of `model` is healthy and one is stopped or scaled to zero: the next request
        waits for it rather than failing."""
        return not self._healthy(model) and bool(self._wakeable(model) or self._cold(model))

    # -- internals -----------------------------------------------------------------------------

    def _healthy(self, model: str) -> bool:
        members = self._router.members
        return any(
            e.healthy for route in self._router.routes.get(model, ()) if route.weight > 0 for e in members(route)
        )

    def _cold(self, model: str) -> list[EngineSettings]:
        """The model's `discover: dns` entries that are scaled to zero (gateway/engines/pool.py)."""
        return self._pool.cold_entries(self._engines_of(model))

    def _engines_of(self, model: str) -> set[str]:
        return {name for route in self._router.routes.get(model, ()) if route.weight > 0 for name in route.engines}

    def _wakeable(self, model: str) -> list[Engine]:
        if not self._path:
            return []
        engines = self._pool.engines
        return [
            e
            for name in self._engines_of(model)
            if (e := engines.get(name)) is not None and e.settings.idle_stop and e.state in _WAKEABLE
        ]

    def _wake(self, engine: Engine) -> None:
        if engine.state == EngineState.STARTING:
            return  # the same start serves every waiting request
        now = asyncio.get_running_loop().time()
        if now - self._woken.get(engine.name, -math.inf) < WAKE_RESEND:
            return
        self._woken[engine.name] = now
        self.send({"op": "wake", "engine": engine.name})

    def send(self, message: dict[str, Any]) -> bool:
        """To the main process; False without a channel (or once it closed)."""
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(encode(message))
        return True

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._apply(orjson.loads(line))
        except (ConnectionError, ValueError) as exc:
            log.error("control channel to the main process failed (%s); engine states are frozen", exc)
            return
        log.warning("the main process closed the control channel; engine states are frozen")

    def _apply(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "states":
            engines = self._pool.engines
            self._states = {str(k): str(v) for k, v in message.get("engines", {}).items()}
            for name, state in self._states.items():
                if (engine := engines.get(name)) is not None:
                    self._pool.set_state(engine, EngineState(state))
                    if engine.state != EngineState.STOPPED:
                        self._woken.pop(name, None)
            self._stopped_models()
        elif op == "woken" and message.get("started"):
            self._metrics.cold_starts.labels(str(message.get("engine"))).inc()
        elif isinstance(op, str) and (handler := self.handlers.get(op)) is not None:
            handler(message)

    def _stopped_models(self) -> None:
        self.stopped_models = frozenset(
            model
            for model in self._router.routes
            if any(e.state in (EngineState.STOPPED, EngineState.STOPPING) for e in self._wakeable(model))
        )

    async def _report(self) -> None:
        engines = self._pool.engines.values()
        while True:
            load = {e.name: [e.outstanding, e.picks] for e in engines if e.settings.managed}
            health = {e.name: e.healthy for e in engines}
            for op, value in (("load", load), ("health", health)):
                if self._sent.get(op) != value:
                    self._sent[op] = value
                    self.send({"op": op, "engines": value})
            await asyncio.sleep(REPORT_INTERVAL)
