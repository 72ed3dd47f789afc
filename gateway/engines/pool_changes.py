"""How the engine pool takes a new configuration (a reload: gateway/front/running.py), in three
steps so that nothing serving changes before the new configuration does: `stage` says what
changes, `probe` health-checks the engines that are new (or at a new address) while they are
still unlisted, `commit` lists them and applies the new settings at the swap; `retire` takes out,
later, the engines no configuration names any more (their requests in flight keep their Engine
objects meanwhile). A mixin of the Pool (gateway/engines/pool.py), whose state it changes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gateway.engines.discovery import DnsWatcher
from gateway.settings import EngineSettings, HealthSettings

if TYPE_CHECKING:
    from gateway.engines.pool import Engine


@dataclass
class PoolChange:
    """What a new configuration changes in the pool, staged while the old one serves: engines
    that are new (or answer at a new address) wait here, unlisted, until `Pool.commit`, after a
    first health check (`Pool.probe`), so that they take traffic from the first request."""

    health: HealthSettings
    trial_timeout: float
    added: dict[str, Engine] = field(default_factory=dict)  # new engines, or new addresses
    updated: list[EngineSettings] = field(default_factory=list)  # the same engine, other settings
    gone: list[str] = field(default_factory=list)  # no longer configured: Pool.retire, once unused

    @property
    def changed(self) -> list[str]:
        """Engines whose settings differ (their learnt capacity starts over)."""
        return [*self.added, *(e.name for e in self.updated), *self.gone]


class PoolChanges:
    # the Pool's state and helpers, which these methods change and use
    engines: dict[str, Engine]
    groups: dict[str, list[str]]
    _entries: dict[str, EngineSettings]
    _watchers: dict[str, DnsWatcher]
    _entry_of: dict[str, str]
    _health: HealthSettings
    _trial_timeout: float
    _task: asyncio.Task[None] | None
    _changed: asyncio.Event

    _engine: Callable[[EngineSettings], Engine]
    _watcher: Callable[[EngineSettings], DnsWatcher]
    _publish: Callable[[Engine], None]
    _forget: Callable[[Engine], None]
    _notify: Callable[[], None]
    _check: Callable[[Engine], Awaitable[None]]

    def stage(self, engines: tuple[EngineSettings, ...], health: HealthSettings, trial_timeout: float) -> PoolChange:
        """What `engines` change; nothing changes here until `commit`."""
        change = PoolChange(health, trial_timeout)
        configured = {e.name: e for e in engines}
        for name, settings in configured.items():
            before = self._entries.get(name)
            if before is None and (engine := self.engines.get(name)) is not None:
                before = engine.settings
            if before == settings:
                continue
            if before is not None and before.url == settings.url and before.discovery == settings.discovery:
                change.updated.append(settings)
            elif settings.discovery is None:
                change.added[name] = engine = self._engine(settings)
                engine.breaker.threshold = health.breaker_failures
            else:
                change.updated.append(settings)  # a discovered entry's new target: a new watcher
        current = set(self._entries) | {n for n in self.engines if n not in self._entry_of}
        change.gone = sorted(current - set(configured))
        return change

    async def probe(self, engines: Iterable[Engine]) -> None:
        """One health check of each now (the staged ones: they are healthy when they go live)."""
        await asyncio.gather(*(self._check(e) for e in engines))

    def commit(self, change: PoolChange) -> list[DnsWatcher]:
        """The staged engines go live (in-flight requests keep the Engine objects they hold);
        answers the DNS watchers it replaced, for the caller to stop."""
        self._health, self._trial_timeout = change.health, change.trial_timeout
        replaced = []
        for engine in self.engines.values():
            engine.breaker.threshold = change.health.breaker_failures
        for name, engine in change.added.items():
            if name in self._entries:
                replaced += self._drop_entry(name)
            self.engines[name] = engine
            self.groups[name] = [name]
            self._publish(engine)
        for settings in change.updated:
            if settings.discovery is None:
                self.engines[settings.name].settings = settings
            elif (before := self._entries.get(settings.name)) is not None and before.discovery == settings.discovery:
                self._entries[settings.name] = settings
                for member in self.groups[settings.name]:
                    if (e := self.engines.get(member)) is not None:
                        e.settings = replace(settings, name=member, url=e.settings.url, discovery=None)
            else:
                replaced += self._drop_entry(settings.name)
                self.engines.pop(settings.name, None)
                self._entries[settings.name] = settings
                watcher = self._watchers[settings.name] = self._watcher(settings)
                if self._task is not None:
                    watcher.start()
        self._changed.set()
        self._notify()
        return replaced

    async def retire(self, names: Iterable[str]) -> None:
        """Engines (and discovered entries) no longer configured, once no request uses them."""
        for name in names:
            for watcher in self._drop_entry(name):
                await watcher.stop()
            gone = self.engines.pop(name, None)
            self.groups.pop(name, None)
            if gone is not None:
                self._forget(gone)
        self._notify()

    def _drop_entry(self, name: str) -> list[DnsWatcher]:
        """A discovered entry's watcher and engines out of the pool; its watcher, to be stopped."""
        if self._entries.pop(name, None) is None:
            return []
        for member in self.groups.pop(name, []):
            self._entry_of.pop(member, None)
            if (gone := self.engines.pop(member, None)) is not None:
                self._forget(gone)
        watcher = self._watchers.pop(name, None)
        return [watcher] if watcher is not None else []
