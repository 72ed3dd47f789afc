"""What a reload changes, and what it cannot change while the gateway runs.

Everything changes live but what is listed here: the listening sockets (addresses, ports, plain
or TLS), the number of worker processes, the Redis the replicas share (keys, quotas and the
reload announcements live there), the store (batches and files in flight live there), and the
launch settings of a managed engine that runs (a new engine under a new name and port replaces
it without a restart: it starts, and the old one stops once its requests are done).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.settings import SECTIONS, ConfigError, EngineSettings, Settings
from gateway.settings.source import ConfigSource, Loaded

# server.<field>: the sockets the main process bound and the worker processes it started
RESTART_SERVER = ("host", "port", "admin_host", "admin_port", "workers")
RESTART_REDIS = ("url", "cluster", "prefix", "timeout")
# A managed engine's process is started from these: changing them means another process.
LAUNCH_FIELDS = ("kind", "url", "model", "served_model_name", "port", "args", "env", "python", "max_loras", "vllm")


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """One line per change that a reload cannot make; empty when the reload may go ahead."""
    problems = [
        f"server.{name}: {_shown(getattr(old.server, name))} -> {_shown(getattr(new.server, name))}"
        for name in RESTART_SERVER
        if getattr(old.server, name) != getattr(new.server, name)
    ]
    if (old.server.tls is None) != (new.server.tls is None):
        problems.append(f"server.tls: HTTPS turned {'on' if new.server.tls else 'off'} (the listeners' protocol)")
    problems += [
        f"redis.{name}: changed (keys, quotas and reload announcements live there)"
        for name in RESTART_REDIS
        if getattr(old.redis, name) != getattr(new.redis, name)
    ]
    if old.store != new.store:
        problems.append("store: changed (batches and files in flight live there)")
    running = {e.name: e for e in old.engines if e.managed}
    for engine in new.engines:
        before = running.get(engine.name)
        if before is not None and (changed := launch_changes(before, engine)):
            problems.append(
                f"engines {engine.name}: a managed engine's launch settings changed ({', '.join(changed)}); "
                "to replace it without a restart, give the new one another name and port"
            )
    return problems


def launch_changes(old: EngineSettings, new: EngineSettings) -> list[str]:
    return [name for name in LAUNCH_FIELDS if getattr(old, name) != getattr(new, name)]


def changed_sections(old: Settings, new: Settings) -> list[str]:
    """The top-level sections that differ, in the file's order."""
    return [name for name in SECTIONS if getattr(old, name) != getattr(new, name)]


def engine_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """Managed engines to start (new names) and to stop (names no longer configured)."""
    before = {e.name for e in old.engines if e.managed}
    after = {e.name for e in new.engines if e.managed}
    return sorted(after - before), sorted(before - after)


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


@dataclass(frozen=True)
class Outcome:
    """What a reload did, as the admin API answers it and the log says it.

    status: `reloaded`; `unchanged` (the file reads as the running version); `invalid` (the file
    is refused, as it would be at start); `restart_required` (it changes what only a restart can);
    `failed` (it could not be put in place: a managed engine did not start, a worker failed).
    In every case but `reloaded`, the running configuration is the one it was.
    """

    status: str
    version: str  # the running configuration's, after the reload
    previous: str | None = None
    changed: tuple[str, ...] = ()  # sections
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("reloaded", "unchanged")

    def json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "version": self.version,
            "previous": self.previous,
            "changed": list(self.changed),
            "errors": list(self.errors),
        }

    @classmethod
    def of(cls, message: dict[str, Any]) -> Outcome:
        return cls(
            str(message.get("status")),
            str(message.get("version")),
            message.get("previous"),
            tuple(message.get("changed") or ()),
            tuple(message.get("errors") or ()),
        )

    def describe(self) -> str:
        """One line for the log."""
        if self.status == "reloaded":
            what = ", ".join(self.changed) or "no section: the file's text, or a file it names"
            return f"configuration {self.previous} -> {self.version} ({what})"
        if self.status == "unchanged":
            return f"configuration unchanged (version {self.version})"
        return f"reload {self.status}; the running configuration (version {self.version}) stays: " + "; ".join(
            self.errors
        )


@dataclass
class Examined:
    """A file read for a reload: the Loaded configuration to put in place, or the outcome already."""

    loaded: Loaded | None = None
    outcome: Outcome | None = None
    changed: tuple[str, ...] = field(default_factory=tuple)


def examine(source: ConfigSource, version: str, running: Settings) -> Examined:
    """Reads and checks the file against the running configuration (at `version`), as at start."""
    try:
        loaded = source.load()
    except ConfigError as exc:
        return Examined(outcome=Outcome("invalid", version, errors=(str(exc),)))
    if loaded.version == version:
        return Examined(outcome=Outcome("unchanged", version))
    problems = restart_needed(running, loaded.settings)
    if problems:
        return Examined(outcome=Outcome("restart_required", version, errors=tuple(problems)))
    return Examined(loaded, changed=tuple(changed_sections(running, loaded.settings)))
