"""The gateway's waiting room: priority bands, one queue per key, deficit round robin by tokens.

Pure bookkeeping with no I/O and no clock of its own, so its ordering is unit-tested in-process;
gateway/dispatch/scheduler.py decides when requests are pushed and when one is popped (an engine slot freed).

- Bands: `high`, `normal`, `low`, then `batch` (the lines of a batch). A higher band always goes
  first; a lower band is served only while no ticket of a higher band can use a free engine.
- Flows: within a band, one flow per key (per `user` with auth off). A flow keeps one FIFO per
  group of engines a request may use (its model's route), so a key's request for engines that
  are full never holds back its request for engines with room: the flow's next request is the
  oldest of those that can go.
- Deficit round robin by tokens: on its turn a flow earns `QUANTUM x weight` tokens of credit and
  dispatches while its credit covers its next request's cost (its token reservation). Over time
  each waiting key gets engine slots in proportion to its weight, counted in tokens, however
  many requests it piles up. The quantum is one token, so a turn is about one request and a
  flood from one key delays another key by one dispatch at most; the rounds in which nobody
  could afford its next request are skipped arithmetically rather than looped through.
- A flow that starts waiting goes to the front of the rotation (as new flows do in fq_codel),
  so a key that sends one request at a time gets the next slot instead of waiting a full round
  behind keys with long queues. It earns no extra credit there: on equal costs it wins ties.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.access.base import PRIORITIES

BANDS = (*PRIORITIES, "batch")  # dispatch order: batch lines sit below low
BATCH = BANDS.index("batch")
NORMAL = BANDS.index("normal")
QUANTUM = 1.0  # tokens of credit per turn, times the flow's weight
_MAX_PASSES = 4  # one pass, a skip of idle rounds, one pass; the rest is float slack


@dataclass(eq=False, slots=True)
class Ticket:
    """One waiting request."""

    flow: str  # who waits: a key id, or `user:<name>` / `anonymous` with auth off
    band: int  # index in BANDS
    group: Hashable  # the engines it may use (the scheduler's: its route); eligibility is per group
    cost: float  # tokens: the reservation, or the prompt estimate plus max_tokens
    weight: float = 1.0
    model: str = ""  # for the admin view
    enqueued: float = 0.0  # monotonic seconds, for the wait metrics
    payload: Any = None  # the scheduler's own (the future the request waits on)
    seq: int = 0  # arrival order
    queued: bool = False


@dataclass(eq=False, slots=True)
class _Flow:
    name: str
    weight: float
    deficit: float = 0.0
    fresh: bool = True  # earns a quantum at its next turn
    size: int = 0
    queues: dict[Hashable, deque[Ticket]] = field(default_factory=dict)  # per group, FIFO

    def head(self, eligible: Callable[[Hashable], bool]) -> Ticket | None:
        """The oldest ticket whose group can use an engine now."""
        best: Ticket | None = None
        for group, queue in self.queues.items():
            ticket = queue[0]
            if (best is None or ticket.seq < best.seq) and eligible(group):
                best = ticket
        return best


class _Band:
    __slots__ = ("active", "flows", "size")

    def __init__(self) -> None:
        self.flows: dict[str, _Flow] = {}
        self.active: deque[_Flow] = deque()  # the rotation; active[0] has the turn
        self.size = 0

    def push(self, ticket: Ticket) -> None:
        flow = self.flows.get(ticket.flow)
        if flow is None:
            flow = self.flows[ticket.flow] = _Flow(ticket.flow, ticket.weight)
            self.active.appendleft(flow)
        flow.weight = ticket.weight  # the key's latest record
        flow.queues.setdefault(ticket.group, deque()).append(ticket)
        flow.size += 1
        self.size += 1

    def remove(self, ticket: Ticket) -> None:
        flow = self.flows[ticket.flow]
        queue = flow.queues[ticket.group]
        if queue[0] is ticket:
            queue.popleft()
        else:
            queue.remove(ticket)
        if not queue:
            del flow.queues[ticket.group]
        flow.size -= 1
        self.size -= 1
        if not flow.size:
            del self.flows[flow.name]
            if self.active[0] is flow:
                self.active.popleft()
            else:
                self.active.remove(flow)

    def pop(self, eligible: Callable[[Hashable], bool]) -> Ticket | None:
        active = self.active
        heads: list[tuple[_Flow, Ticket]] = []
        for _ in range(_MAX_PASSES):
            heads.clear()
            for _ in range(len(active)):
                flow = active[0]
                ticket = flow.head(eligible)
                if ticket is not None:
                    if flow.fresh:
                        flow.deficit += QUANTUM * flow.weight
                        flow.fresh = False
                    if ticket.cost <= flow.deficit:
                        flow.deficit -= ticket.cost
                        self.remove(ticket)  # the flow keeps the turn while its credit lasts
                        return ticket
                    heads.append((flow, ticket))
                flow.fresh = True
                active.rotate(-1)
            if not heads:
                return None
            # Nobody could afford its next request: give every flow that could go the credit of
            # the rounds in which nothing would happen; the next pass then dispatches.
            rounds = min(math.ceil((t.cost - f.deficit) / (QUANTUM * f.weight)) for f, t in heads)
            if rounds > 1:
                for f, _ in heads:
                    f.deficit += (rounds - 1) * QUANTUM * f.weight
        flow, ticket = min(heads, key=lambda h: (h[1].cost - h[0].deficit) / h[0].weight)
        flow.deficit = max(0.0, flow.deficit - ticket.cost)
        self.remove(ticket)
        return ticket

    def tickets(self) -> Iterator[Ticket]:
        for flow in self.flows.values():
            for queue in flow.queues.values():
                yield from queue


class FairQueue:
    def __init__(self) -> None:
        self._bands = [_Band() for _ in BANDS]
        self._per_flow: dict[str, int] = {}
        self._seq = itertools.count()
        self.size = 0

    def queued_by(self, flow: str) -> int:
        """Tickets of this key waiting, all bands together (the per-key cap)."""
        return self._per_flow.get(flow, 0)

    def band_size(self, band: int) -> int:
        return self._bands[band].size

    def push(self, ticket: Ticket) -> None:
        ticket.seq = next(self._seq)
        ticket.queued = True
        self._bands[ticket.band].push(ticket)
        self._per_flow[ticket.flow] = self._per_flow.get(ticket.flow, 0) + 1
        self.size += 1

    def remove(self, ticket: Ticket) -> bool:
        """Takes a ticket out (its client left, or it waited too long); False if it was not queued."""
        if not ticket.queued:
            return False
        self._bands[ticket.band].remove(ticket)
        self._taken(ticket)
        return True

    def pop(self, eligible: Callable[[Hashable], bool]) -> Ticket | None:
        """The next ticket to dispatch: the highest band with a ticket whose group can use an
        engine now (`eligible(group)`), and within it the flow whose turn it is."""
        if not self.size:
            return None
        for band in self._bands:
            if band.size:
                ticket = band.pop(eligible)
                if ticket is not None:
                    self._taken(ticket)
                    return ticket
        return None

    def _taken(self, ticket: Ticket) -> None:
        ticket.queued = False
        self.size -= 1
        left = self._per_flow[ticket.flow] - 1
        if left:
            self._per_flow[ticket.flow] = left
        else:
            del self._per_flow[ticket.flow]

    def tickets(self, band: int) -> Iterator[Ticket]:
        return self._bands[band].tickets()
