"""The engines as this gateway process sees them: health, its own outstanding count, reported load.

A managed engine is probed only while the supervisor says it is running (`state`, pushed over the
control channel by gateway/dispatch/wake.py): a stopped engine is not an unhealthy one, and a
port answered by some other process is never mistaken for our engine.

`healthy`, the one flag the router reads per candidate, is the health check's verdict and the
engine's circuit breaker's (gateway/engines/breaker.py) together: an engine whose requests keep
failing is out while its /health still passes. When the pool takes an engine out (its health
check fails, its breaker opens, a request could not reach it), the requests in flight there are
told at once (`Inflight.engine_out`): a stream that can go on elsewhere moves now, rather than
when its socket finally breaks (a hung engine keeps the socket open).

A `discover: dns` entry whose name has no address, or only engines that have never passed a
health check (pods still loading their model), is *cold*: scaled to zero, not failed; requests
for it wait (gateway/dispatch/wake.py) and its name is resolved every second meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import aiohttp
import dns.asyncresolver

from gateway.core.metrics import GatewayMetrics
from gateway.engines.breaker import BREAKER_STATES, Breaker, BreakerState
from gateway.engines.control import EngineState
from gateway.engines.discovery import DnsWatcher
from gateway.engines.pool_changes import PoolChanges
from gateway.engines.tls import engine_ssl
from gateway.settings import EngineSettings, HealthSettings

log = logging.getLogger(__name__)

ENGINE_STATES = ("stopped", "starting", "healthy", "unhealthy")
COLD_PROBE_INTERVAL = 0.25  # seconds between health checks while requests wait for a first engine

# Gauges an engine reports on /metrics that say how loaded it is: ours and vLLM's names.
_WAITING = (b"engine_num_requests_waiting", b"vllm:num_requests_waiting")
_RUNNING = (b"engine_num_requests_running", b"vllm:num_requests_running")
_KV = (b"engine_kv_cache_usage_perc", b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc")


class Inflight(Protocol):
    """A request on an engine (the proxy's exchange), told when the pool takes its engine out."""

    def engine_out(self, engine: Engine, why: str) -> None: ...


@dataclass
class Engine:
    settings: EngineSettings
    healthy: bool = False  # usable: the health check passes and the breaker lets traffic in
    outstanding: int = 0  # requests this process has in flight there
    waiting: float = 0.0  # the engine's own queue, from its last /metrics scrape
    running: float = 0.0
    kv_usage: float = 0.0  # fraction of the KV cache in use
    failures: int = 0  # consecutive failed probes
    state: EngineState = EngineState.RUNNING  # managed engines: as the supervisor says
    picks: int = 0  # requests sent to it by this process, ever (the supervisor's idle timer reads it)
    ever_healthy: bool = False  # a discovered engine that never was is starting, not failed
    checked: bool = False  # the health check's own verdict (healthy also needs the breaker)
    breaker: Breaker = field(default_factory=lambda: Breaker(0))
    inflight: set[Inflight] = field(default_factory=set)  # this process's requests there now
    adapters: set[str] = field(default_factory=set)  # LoRA adapters it holds, as gateway/adapters/ last saw

    name: str = field(init=False)  # the settings' name, read on every pick: a plain attribute

    def __post_init__(self) -> None:
        self.name = self.settings.name

    @property
    def public_state(self) -> str:
        """stopped, starting, healthy or unhealthy: what the metrics and /ready show."""
        if self.state in (EngineState.STOPPED, EngineState.STARTING):
            return str(self.state)
        return "healthy" if self.checked else "unhealthy"

    def load(self) -> float:
        """Lower is better: what we have sent it plus what it says is queued."""
        return self.outstanding + self.waiting


def parse_load(text: bytes) -> tuple[float, float, float]:
    waiting = running = kv = 0.0
    for line in text.splitlines():
        if not line or line[0] == 35:  # '#'
            continue
        name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i > 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name in _WAITING or name in _RUNNING or name in _KV:
            try:
                value = float(line.rsplit(b" ", 1)[1])
            except ValueError:
                continue
            # vLLM labels its gauges per model (and engine index): sum them.
            if name in _WAITING:
                waiting += value
            elif name in _RUNNING:
                running += value
            else:
                kv = max(kv, value)
    return waiting, running, kv


class Pool(PoolChanges):
    """Every engine this process may send to, by name. A config entry is a group of engines: one
    for a plain entry, one per address for a `discover: dns` entry (its members come and go as the
    name's answer changes), and routes name groups (`members`)."""

    def __init__(
        self,
        engines: tuple[EngineSettings, ...],
        health: HealthSettings,
        metrics: GatewayMetrics,
        resolver: dns.asyncresolver.Resolver | None = None,  # DNS discovery's; default: the system's
        trial_timeout: float = 30.0,  # a half-open breaker's trial that has not answered by then is void
    ) -> None:
        self._resolver = resolver
        self._trial_timeout = trial_timeout
        self._health = health
        self.engines = {e.name: self._engine(e) for e in engines if e.discovery is None}
        self.groups: dict[str, list[str]] = {e.name: [e.name] for e in engines if e.discovery is None}
        self._entries = {e.name: e for e in engines if e.discovery is not None}  # the discovered groups
        self._watchers = {e.name: self._watcher(e) for e in self._entries.values()}
        self._entry_of: dict[str, str] = {}  # discovered engine -> its entry
        self._hurried = 0  # requests waiting for a cold entry (see hurry)
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        # called after each engine's health check (the scheduler learns capacity from them)
        self.on_checked: list[Callable[[Engine], None]] = []
        self._changed_event = asyncio.Event()  # set and replaced on every change: wakes waiters
        for engine in self.engines.values():
            self._publish(engine)

    def members(self, name: str) -> list[str]:
        """The engines a route's entry name stands for now."""
        return self.groups.get(name, [])

    def members_of(self, entries: Iterable[str]) -> list[Engine]:
        """The engines that a route's entries stand for now."""
        engines = self.engines
        return [e for entry in entries for name in self.groups.get(entry, ()) if (e := engines.get(name))]

    def cold_entries(self, entries: Iterable[str]) -> list[EngineSettings]:
        """The `discover: dns` entries among `entries` that are cold: no address, or none of their
        engines ever healthy (a pod found while it still loads its model)."""
        engines = self.engines
        return [
            entry
            for name in entries
            if (entry := self._entries.get(name)) is not None
            and not any((e := engines.get(m)) is not None and e.ever_healthy for m in self.groups[name])
        ]

    @contextlib.contextmanager
    def hurry(self, entries: Iterable[str]) -> Iterator[None]:
        """While in it (requests wait for these discovered entries' first engine): resolve them
        every second, and probe the engines every COLD_PROBE_INTERVAL, so a pod is used within
        a moment of answering rather than a whole health interval later."""
        watchers = [w for name in entries if (w := self._watchers.get(name)) is not None]
        if not watchers:
            yield
            return
        with contextlib.ExitStack() as stack:
            for watcher in watchers:
                stack.enter_context(watcher.hurry())
            self._hurried += 1
            if self._hurried == 1:
                self._changed.set()
            try:
                yield
            finally:
                self._hurried -= 1

    def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._health.timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._run(), name="health-checks")
        for watcher in self._watchers.values():
            watcher.start()

    async def stop(self) -> None:
        for watcher in self._watchers.values():
            await watcher.stop()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session:
            await self._session.close()

    def _watcher(self, entry: EngineSettings) -> DnsWatcher:
        discovery = entry.discovery
        assert discovery is not None
        self.groups[discovery.name] = []

        def on_change(added: set[str], removed: set[str]) -> None:
            for address in removed:
                name = discovery.engine_name(address)
                gone = self.engines.pop(name, None)  # requests in flight keep their Engine object
                if gone is not None:
                    self._forget(gone)
                self._entry_of.pop(name, None)
                log.info("engine %s left %s", name, discovery.host)
            for address in added:
                name = discovery.engine_name(address)
                settings = replace(entry, name=name, url=discovery.url(address), discovery=None)
                self.engines[name] = engine = self._engine(settings)
                self._entry_of[name] = discovery.name
                self._publish(engine)
                log.info("engine %s found under %s", name, discovery.host)
            self.groups[discovery.name] = sorted(discovery.engine_name(a) for a in watcher.addresses)
            self._changed.set()  # health-check the newcomers now: they get no traffic until then
            self._notify()

        def urgent() -> bool:  # engines found, none healthy: loading, or scaled away
            members = [e for name in self.groups[discovery.name] if (e := self.engines.get(name))]
            return bool(members) and not any(e.healthy for e in members)

        watcher = DnsWatcher(discovery, on_change, self._resolver, urgent)
        return watcher

    def _engine(self, settings: EngineSettings) -> Engine:
        return Engine(settings, breaker=Breaker(self._health.breaker_failures))

    def mark_failed(self, engine: Engine, why: str) -> None:
        """Passive health: a refused connection takes the engine out until a check says otherwise."""
        if engine.checked:
            log.warning("engine %s taken out of rotation: %s", engine.name, why)
        self._set_health(engine, False, why)
        self._changed.set()  # check it again soon rather than at the next interval

    # ---- the circuit breaker (gateway/engines/breaker.py) -------------------------------------

    def request_failed(self, engine: Engine, why: str) -> None:
        """A request failed on the engine: refused, no first byte in time, a 5xx, a broken stream."""
        breaker = engine.breaker
        if not breaker.failed(why):
            return
        cooldown = self._health.breaker_cooldown
        breaker.opened_at = time.time()
        log.warning(
            "engine %s: circuit breaker open after %d consecutive failed requests (last: %s): no traffic for %gs",
            engine.name,
            breaker.errors,
            why,
            cooldown,
        )
        self._metrics.breaker_opens_by[engine.name].inc()
        asyncio.get_running_loop().call_later(cooldown, self._cooled, engine, breaker.opens)
        self._set_health(engine, engine.checked, f"its circuit breaker opened ({why})")

    def request_answered(self, engine: Engine) -> None:
        """A request got its answer's head from the engine (any status below 500)."""
        breaker = engine.breaker
        if (breaker.errors or breaker.state is not BreakerState.CLOSED) and breaker.succeeded():
            log.info("engine %s: circuit breaker closed (a trial request was answered)", engine.name)
            self._set_health(engine, engine.checked)

    def take_trial(self, engine: Engine) -> None:
        """The router picked a half-open engine: this request is its one trial; no other traffic
        until it ends (or `trial_timeout` passes without a word on it)."""
        breaker = engine.breaker
        if breaker.state is not BreakerState.HALF_OPEN or breaker.trial:
            return
        breaker.trial = True
        asyncio.get_running_loop().call_later(self._trial_timeout, self._trial_lapsed, engine, breaker.opens)
        self._set_health(engine, engine.checked)

    def _cooled(self, engine: Engine, opens: int) -> None:
        breaker = engine.breaker
        if breaker.opens != opens or breaker.state is not BreakerState.OPEN:
            return  # opened again since: that opening has its own timer
        breaker.cooled()
        log.info("engine %s: circuit breaker half-open: the next request is a trial", engine.name)
        self._set_health(engine, engine.checked)

    def _trial_lapsed(self, engine: Engine, opens: int) -> None:
        breaker = engine.breaker
        if breaker.opens == opens and breaker.state is BreakerState.HALF_OPEN and breaker.trial:
            breaker.trial = False  # its client left, or it never ended: another request tries
            self._set_health(engine, engine.checked)

    def set_state(self, engine: Engine, state: EngineState) -> None:
        """The supervisor's word on a managed engine. Running means it has just answered /health."""
        if engine.state == state:
            return
        engine.state = state
        engine.failures = 0
        self._set_health(engine, state == EngineState.RUNNING, f"it is {state}")
        self._publish(engine)
        self._notify()

    def any_healthy(self, names: Collection[str]) -> bool:
        return any(e.healthy for n in names if (e := self.engines.get(n)))

    async def changed(self) -> None:
        """Until an engine's health or state changes."""
        await self._changed_event.wait()

    def _notify(self) -> None:
        self._changed_event.set()
        self._changed_event = asyncio.Event()

    def _set_health(self, engine: Engine, checked: bool, why: str = "") -> None:
        """The health verdict `checked`, combined with the breaker into `healthy`. Taking an engine
        out (for its health or its breaker, not for a trial in flight) tells its requests."""
        was_checked, was_open = engine.checked, engine.breaker.state is BreakerState.OPEN
        engine.checked = checked
        if checked:
            engine.ever_healthy = True
        healthy = checked and engine.breaker.admits
        changed = engine.healthy != healthy
        if changed:
            engine.healthy = healthy
            if healthy:
                log.info("engine %s is healthy", engine.name)
        if was_checked and not checked and (entry := self._entry_of.get(engine.name)) is not None:
            # A discovered engine that stops answering was often scaled away: ask DNS now rather
            # than at the next interval, so its model turns cold (not down) at once. (Its health
            # check, not its breaker: an engine its breaker took out first is asked about too.)
            self._watchers[entry].kick()
        if (was_checked and not checked) or (engine.breaker.state is BreakerState.OPEN and not was_open):
            for request in list(engine.inflight):
                request.engine_out(engine, why or "it was taken out")
        if changed or was_checked != checked:
            self._notify()
        self._publish(engine)

    def _forget(self, engine: Engine) -> None:
        """A discovered engine left: its gauges read 0 (a labelled series, once set, stays in the
        scrape, and a stale waiting count would hold the autoscaler up)."""
        m = self._metrics
        m.engine_healthy.labels(engine.name).set(0)
        m.engine_waiting.labels(engine.name).set(0)
        m.engine_outstanding.labels(engine.name).set(0)
        for state in ENGINE_STATES:
            m.engine_state.labels(engine.name, state).set(0)
        for state in BREAKER_STATES:
            m.engine_breaker.labels(engine.name, state).set(0)

    def _publish(self, engine: Engine) -> None:
        m = self._metrics
        m.engine_healthy.labels(engine.name).set(1 if engine.healthy else 0)
        current = engine.public_state
        for state in ENGINE_STATES:
            m.engine_state.labels(engine.name, state).set(1 if state == current else 0)
        breaker = engine.breaker.state
        for state in BREAKER_STATES:
            m.engine_breaker.labels(engine.name, state).set(1 if state == breaker else 0)

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._check(e) for e in list(self.engines.values())))
            self._changed.clear()
            interval = self._health.interval
            if self._hurried:
                interval = min(interval, COLD_PROBE_INTERVAL)
            try:
                await asyncio.wait_for(self._changed.wait(), interval)
                await asyncio.sleep(0.1)  # a burst of failures yields one re-check, not many
            except TimeoutError:
                pass

    async def _check(self, engine: Engine) -> None:
        assert self._session is not None
        s = engine.settings
        if engine.state != EngineState.RUNNING:
            return  # stopped, starting or not ours: the supervisor says when it runs
        headers = {"authorization": f"Bearer {s.api_key}"} if s.api_key else None
        ssl = engine_ssl(s)
        try:
            async with self._session.get(s.url + s.health_path, headers=headers, ssl=ssl) as r:
                ok, why = r.status == 200, f"status {r.status}"
            if ok and s.metrics_path:
                async with self._session.get(s.url + s.metrics_path, headers=headers, ssl=ssl) as r:
                    if r.status == 200:
                        engine.waiting, engine.running, engine.kv_usage = parse_load(await r.read())
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if engine.state != EngineState.RUNNING:
            return  # the supervisor stopped it while we probed
        engine.failures = 0 if ok else engine.failures + 1
        if ok:
            self._set_health(engine, True)
        elif engine.failures >= self._health.failures_to_eject:
            if engine.checked or engine.failures == self._health.failures_to_eject:
                # One line when it goes (or never came), one when it is back ("is healthy").
                log.warning("engine %s failed its health check (%s): no traffic until it passes", engine.name, why)
            self._set_health(engine, False, f"it failed its health check ({why})")
        m = self._metrics
        m.engine_waiting.labels(engine.name).set(engine.waiting)
        m.engine_outstanding.labels(engine.name).set(engine.outstanding)
        for listener in self.on_checked:
            listener(engine)
