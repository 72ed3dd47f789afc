"""The slices of budget one process holds, and how big the next one should be: bookkeeping only,
no Redis (gateway/access/leases.py takes and returns them).

A slice was charged to Redis in full when it was taken: R requests, T tokens and M money in its
minute, day and month windows, C concurrency leases. Requests admitted from it draw on those
locally, so what all processes admit never exceeds a limit. A settled request's actual usage
replaces its reservation in `held_tokens` and `held_money`; the slice's return gives back the
difference between what it took and what it holds (gateway/access/lease_scripts.py).

Sizing: a slice holds about `horizon` seconds of the key's recent rate of requests on this
process, as many leases as twice its recent peak of requests in flight, and tokens and money for
that many requests at their recent average; Redis scales that down to 1/share of the room left.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from gateway.access.levels import Level

MAX_REQUESTS = 4096  # the most requests one slice may hold, however busy the key
SMOOTHING = 0.25  # weight of the newest gap between two admissions in the average


@dataclass(eq=False, slots=True)
class Slice:
    id: str
    account: Account
    minute: int
    day: str
    month: str
    until: float  # unix seconds: admits nothing from then on (the minute's end, the key's expiry, its life)
    requests: int
    tokens: int
    money: int
    leases: int  # concurrency leases <id>.1 .. <id>.<leases>; 0: no level limits concurrency
    rpm: int | None  # the key's, for the rate-limit headers
    tpm: int | None
    requests_before: int  # the key's minute window before this slice was taken
    tokens_before: int
    admitted: int = 0
    held_tokens: int = 0  # reserved by requests in flight + used by requests settled
    held_money: int = 0
    prompt: int = 0  # of the requests settled
    completion: int = 0
    free: list[int] = field(default_factory=list)  # numbers of the leases no request holds
    busy: dict[str, int] = field(default_factory=dict)  # lease id -> its number: the requests in flight
    last: float = 0.0  # monotonic: the last admission
    stopped: float = 0.0  # monotonic: when it stopped admitting (0: it admits)
    returned: bool = False  # given back: its requests still in flight are released on their own

    def __post_init__(self) -> None:
        self.free = list(range(self.leases, 0, -1))

    def take(self, reserve: int, money: int) -> str | None:
        """A lease id for one more request, or None when the slice has no room for it."""
        if (
            self.admitted >= self.requests
            or self.held_tokens + reserve > self.tokens
            or self.held_money + money > self.money
        ):
            return None
        if self.leases:
            if not self.free:
                return None
            number = self.free.pop()
        else:
            number = self.admitted + 1
        self.admitted += 1
        self.held_tokens += reserve
        self.held_money += money
        lease = f"{self.id}.{number}"
        self.busy[lease] = number
        return lease

    def settle(self, lease: str, reserved: int, money: int, prompt: int, completion: int, spend: int) -> None:
        number = self.busy.pop(lease)
        if self.leases:
            self.free.append(number)
        self.held_tokens += prompt + completion - reserved
        self.held_money += spend - money
        self.prompt += prompt
        self.completion += completion

    def full(self, reserve: int, money: int) -> bool:
        """No room for another request like this one: it may as well stop admitting."""
        return (
            self.admitted >= self.requests
            or self.held_tokens + reserve > self.tokens
            or self.held_money + money > self.money
        )


@dataclass(eq=False, slots=True)
class Account:
    """One key's (and model's) slices on this process, and what sizes the next."""

    key_id: str
    model: str
    levels: tuple[Level, ...]
    ids: frozenset[str]  # the ids of its levels: a change to any of them returns its slices
    team: str | None = None  # where its levels are: a key moved to another team starts afresh
    org: str | None = None
    open: list[Slice] = field(default_factory=list)  # admitting, oldest first
    draining: list[Slice] = field(default_factory=list)  # stopped, waiting for their requests
    gap: float = 1.0  # seconds between two admissions, smoothed
    arrived: float = 0.0  # monotonic: the last admission asked for
    in_flight: int = 0
    peak: int = 0  # the most requests in flight since the last slice was taken
    reserve: float = 0.0  # tokens a request reserves, smoothed
    money: float = 0.0
    waiting: int = 0  # requests waiting for a lease call
    leasing: asyncio.Task[Slice] | None = None  # the lease call in flight: one at a time
    epoch: int = 0  # counts recalls: a slice leased across one goes straight back

    def arrive(self, now: float, reserve: int, money: int) -> None:
        if self.arrived:
            self.gap += SMOOTHING * (min(now - self.arrived, 10.0) - self.gap)
        self.arrived = now
        self.reserve += SMOOTHING * (reserve - self.reserve)
        self.money += SMOOTHING * (money - self.money)

    def wanted(self, horizon: float, reserve: int, money: int) -> tuple[int, int, int, int]:
        """Requests, tokens, money and leases the next slice should hold."""
        requests = max(1 + self.waiting, min(MAX_REQUESTS, math.ceil(horizon / max(self.gap, 1e-6))))
        tokens = requests * max(reserve, math.ceil(self.reserve))
        cash = requests * max(money, math.ceil(self.money))
        leases = min(requests, max(4, 2 * max(self.peak, self.in_flight + self.waiting + 1)))
        return requests, tokens, cash, leases

    def take(self, reserve: int, money: int, now: float, mono: float) -> tuple[Slice, str] | None:
        for s in self.open:
            if now < s.until:
                lease = s.take(reserve, money)
                if lease is not None:
                    s.last = mono
                    self.in_flight += 1
                    if self.in_flight > self.peak:
                        self.peak = self.in_flight
                    return s, lease
        return None

    def stop(self, s: Slice, mono: float) -> None:
        """No more admissions from `s`; it goes back once its requests are done."""
        self.open.remove(s)
        s.stopped = mono
        self.draining.append(s)

    def slices(self) -> list[Slice]:
        return [*self.open, *self.draining]
