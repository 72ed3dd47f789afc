"""The graceful drain of one worker process: what SIGTERM (or Ctrl-C) starts.

Seconds after the signal:
- at once: `/ready` answers 503, idle keep-alive connections are closed, and every response from
  now on closes its connection;
- `drain_grace` (SIGTERM only; 0 on Ctrl-C): the listeners close, so new connections are refused
  (a load balancer had that long to notice /ready and stop sending);
- until `drain_timeout`: requests and streams in flight finish normally; the process exits as
  soon as none is left;
- at `drain_timeout`: what is still in flight is cut: a stream being relayed ends with an SSE
  error event and `data: [DONE]`, like any other broken stream; a request not answered yet gets
  503 `shutting_down`. Each exchange reconciles its quota reservation as it ends.

The server (gateway/process/worker.py) drives the timeline; exchanges (gateway/proxy/exchange.py) register here
while they live so that they can be cut.
"""

from __future__ import annotations

import time
from typing import Protocol

from gateway.core.errors import Code, GatewayError


class Cuttable(Protocol):
    def cut(self, error: GatewayError) -> None: ...


class Drain:
    def __init__(self) -> None:
        self.started_at: float | None = None
        self.draining = False  # read on every request and response: a plain attribute
        self.grace = 0.0
        self.live: set[Cuttable] = set()  # every exchange in flight adds itself while it lives

    def begin(self, grace: float) -> None:
        """Safe to call from a signal handler: it only notes the time."""
        if self.started_at is None:
            self.grace = grace
            self.started_at = time.monotonic()
            self.draining = True

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    @property
    def in_flight(self) -> int:
        return len(self.live)

    def cut_all(self) -> int:
        """Ends everything still in flight (see the module docstring); returns how many."""
        error = GatewayError(
            503, "The gateway is shutting down and could not finish this request; retry it.", code=Code.SHUTTING_DOWN
        )
        live = list(self.live)
        for exchange in live:
            exchange.cut(error)
        return len(live)
