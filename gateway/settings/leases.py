"""The `leases:` section: leased budgets, each process admitting a busy key's requests from a
slice of its budget taken from Redis in one step (gateway/access/leases.py does the leasing)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings.reader import Reader, simple_section


@dataclass(frozen=True)
class LeaseSettings:
    # false: every request is admitted by its own Redis call, as without leases
    enabled: bool = True
    # a slice holds about this many seconds of the key's recent rate of requests
    horizon: float = 0.2
    # a slice takes at most 1/share of the room a limit has left (at every level)
    share: int = 4
    # seconds a slice no request used is kept before it goes back
    idle: float = 1.0
    # seconds a refusal, a usage read or an admin change waits for other processes' slices to come back
    wait: float = 0.5


def parse_leases(r: Reader, data: Mapping[str, Any]) -> LeaseSettings:
    leases: LeaseSettings = simple_section(r, data, "leases", LeaseSettings)
    zero = next((name for name in ("horizon", "idle", "wait") if getattr(leases, name) == 0), None)
    if zero is not None:  # the reader refused negative numbers already
        raise r.fail(f"leases.{zero}", "must be > 0 seconds")
    if leases.share < 2:
        raise r.fail("leases.share", f"must be >= 2 (a slice never takes all the room), got {leases.share!r}")
    return leases
