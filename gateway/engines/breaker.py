"""A circuit breaker per engine: an engine whose requests fail is taken out even while /health passes.

The health check sees only /health. An engine can answer it and still fail every request: a
wedged scheduler, a model stuck behind one prompt, a proxy in front of a dead backend. Those
requests time out before their first byte, one `first_byte_timeout` each, while the pool keeps
sending more. The breaker counts the requests' own outcomes instead:

- closed: traffic flows. `failures` consecutive failed requests (a refused connection, no first
  byte in time, a 5xx answer, a stream broken mid-way) open it; any answer resets the count.
- open: no traffic, for `cooldown` seconds.
- half-open: the next request, one real request, is its trial: an answer closes the breaker, a
  failure opens it for another cooldown. A passing health check does not close it, since it is
  what passed while the requests failed.

This module holds the state machine only; gateway/engines/pool.py owns the timers and turns the
state into the one flag the router reads (`Engine.healthy`). Each gateway process keeps its own
breakers, as it keeps its own health checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


BREAKER_STATES = tuple(str(s) for s in BreakerState)


@dataclass(slots=True)
class Breaker:
    threshold: int  # consecutive failures that open it; 0: never opens
    state: BreakerState = BreakerState.CLOSED
    errors: int = 0  # consecutive failed requests
    last_error: str = ""
    opened_at: float = 0.0  # wall time of the last opening (the admin API shows it)
    opens: int = 0  # times opened, ever
    trial: bool = False  # half-open, and its trial request is out: no other traffic meanwhile

    @property
    def admits(self) -> bool:
        """Whether a request may be sent: closed, or half-open with no trial out yet."""
        return self.state is BreakerState.CLOSED or (self.state is BreakerState.HALF_OPEN and not self.trial)

    def failed(self, why: str) -> bool:
        """One failed request; True when this opens the breaker."""
        self.errors += 1
        self.last_error = why
        if self.state is BreakerState.OPEN or not self.threshold:
            return False
        if self.state is BreakerState.HALF_OPEN or self.errors >= self.threshold:
            self.state = BreakerState.OPEN
            self.trial = False
            self.opens += 1
            return True
        return False

    def succeeded(self) -> bool:
        """One answered request; True when this closes the breaker (a trial passed). An open
        breaker stays open: an answer to a request sent before it opened proves little."""
        self.errors = 0
        if self.state is not BreakerState.HALF_OPEN:
            return False
        self.state = BreakerState.CLOSED
        self.trial = False
        return True

    def cooled(self) -> None:
        """The cooldown is over: the next request is a trial."""
        if self.state is BreakerState.OPEN:
            self.state = BreakerState.HALF_OPEN
            self.trial = False
