"""The `cache:` section: the exact response cache (gateway/cache/). Off by default; a model's own
`cache: true|false` overrides `enabled` for that model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings.reader import Reader

MAX_ENTRY = 64 << 20


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = False  # cache every model's deterministic answers (a model's `cache:` overrides)
    ttl: float = 3600.0  # seconds an answer stays cached
    max_entry_bytes: int = 1 << 20  # larger answers are not cached
    max_memory: int = 256 << 20  # bytes of cached answers in Redis, all replicas together; oldest go first
    local_memory: int = 32 << 20  # bytes of them each gateway process also keeps in memory (0: hits ask Redis)
    tools: bool = False  # also cache requests that carry tools or functions
    charge: float = 0.0  # share of a hit's tokens counted in quotas, usage and spend (prompt at cached_input; 0: free)
    shared: tuple[str, ...] = ()  # models whose cached answers every key may get (else per key)


def parse_cache(r: Reader, data: Mapping[str, Any]) -> CacheSettings:
    section = r.section(data, "cache", "")
    p = "cache."
    r.known(
        section, p, ("enabled", "ttl", "max_entry_bytes", "max_memory", "local_memory", "tools", "charge", "shared")
    )
    d = CacheSettings()
    shared = section.get("shared") or []
    if not isinstance(shared, list) or not all(isinstance(m, str) and m for m in shared):
        raise r.fail(f"{p}shared", "must be a list of model names")
    return CacheSettings(
        enabled=r.get(section, "enabled", p, bool, d.enabled),
        ttl=r.get(section, "ttl", p, float, d.ttl, 1, 30 * 86400),
        max_entry_bytes=r.get(section, "max_entry_bytes", p, int, d.max_entry_bytes, 64, MAX_ENTRY),
        max_memory=r.get(section, "max_memory", p, int, d.max_memory, 1024),
        local_memory=r.get(section, "local_memory", p, int, d.local_memory, 0),
        tools=r.get(section, "tools", p, bool, d.tools),
        charge=r.get(section, "charge", p, float, d.charge, 0, 1),
        shared=tuple(shared),
    )
