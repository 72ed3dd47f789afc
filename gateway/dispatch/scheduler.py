"""Engine slots: who gets the next one when every engine of a model is full.

The exchange asks for a slot between admission and the upstream call (`acquire`), and gives it
back when the request ends (`release`). Every change of an engine's in-flight count goes
through here, so the count never exceeds the engine's capacity (gateway/dispatch/capacity.py).

- The route (version) is assigned first, by weight, as without the scheduler; capacity decides
  when and on which of that route's engines the request runs, never which version serves it,
  so a canary keeps its share when the stable version is saturated instead of taking its
  overflow (give the canary's engines a `max_inflight` to bound its load).
- Work-conserving: while an engine of the route has room and nobody waits, `acquire` picks at
  once (the router chooses among the engines with room, as it chooses among healthy ones) and
  the request never enters a queue.
- Otherwise the request waits in the fair queue (gateway/dispatch/fair_queue.py: priority bands, one
  flow per key, deficit round robin by tokens). Whenever a slot frees, an engine turns healthy
  or a capacity grows, the next ticket that can use a free engine is dispatched: its engine is
  picked and its slot taken right there, before its task resumes, so a newcomer cannot take
  the slot it was woken for.
- Bounds: `max_queued_per_key` (429 queue_full at once), `max_queue_wait` (429 queue_timeout).
  A client that leaves while waiting is out of the queue at once; its quota reservation and
  concurrency lease are released by the exchange's settle, as for any ending.
- Each gateway process schedules its own traffic; nothing is shared between replicas.

`Unscheduled` is the same seam with the scheduler off (`scheduler.enabled: false`): no limits,
no queue, the engines' own first-come queues.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from gateway.access.base import PRIORITIES, Grant, Principal
from gateway.core.errors import Code, GatewayError
from gateway.core.metrics import GatewayMetrics
from gateway.core.request import ApiRequest
from gateway.dispatch.capacity import Capacity
from gateway.dispatch.fair_queue import BANDS, BATCH, NORMAL, FairQueue, Ticket
from gateway.dispatch.routing import Pick, Router
from gateway.engines.pool import Engine, Pool
from gateway.settings import RouteSettings, Settings

NOTHING: frozenset[str] = frozenset()
BYTES_PER_TOKEN = 4  # a prompt's cost before it is counted: its body size over this
_RECENT = 0.2  # weight of the newest wait in a band's moving average


class Dispatcher(Protocol):
    async def acquire(self, request: ApiRequest, principal: Principal, grant: Grant | None) -> Pick | None:
        """An engine with its slot taken, waiting for one if needed; None when no engine of the
        model is healthy. Raises GatewayError 429 when the queue refuses or gives up."""
        ...

    def retry(self, request: ApiRequest, tried: frozenset[str]) -> Pick | None:
        """Another engine with room, its slot taken, for a request whose engine failed before
        answering; None when there is none (the retry does not queue)."""
        ...

    def release(self, engine: Engine) -> None: ...

    def waiting(self) -> int:
        """Requests waiting in the gateway for an engine slot (a trace notes a request's place)."""
        ...

    def view(self, model: str) -> dict[str, Any]: ...


class Unscheduled:
    """The scheduler off: every request goes to an engine at once; the engines queue."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def acquire(self, request: ApiRequest, principal: Principal, grant: Grant | None) -> Pick | None:
        return self.retry(request, NOTHING)

    def retry(self, request: ApiRequest, tried: frozenset[str]) -> Pick | None:
        pick = self._router.pick(request, tried)
        if pick is not None:
            pick.engine.outstanding += 1
        return pick

    def release(self, engine: Engine) -> None:
        engine.outstanding -= 1

    def waiting(self) -> int:
        return 0

    def view(self, model: str) -> dict[str, Any]:
        return {"enabled": False, "engines": _engines_view(self._router, model, {})}


class SlotQueue:
    """What the schedulers of one process share, whatever configuration each was built from: the
    waiting requests, each engine's capacity, the bands' recent waits. A reload builds a new
    `Scheduler` over the same queue, so requests waiting under the old configuration keep their
    place (and their route, picked by the router of their configuration), and every engine's
    in-flight count stays one count."""

    def __init__(self, pool: Pool, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self.clock = clock
        self.queue = FairQueue()
        self._caps: dict[str, Capacity] = {}
        self._workers = 1
        self._learn = True
        self._recent_wait = [0.0] * len(BANDS)
        self.queued = [metrics.queued.labels(b) for b in BANDS]
        self._waits = [metrics.queue_wait.labels(b) for b in BANDS]
        self._dispatches = [metrics.dispatches.labels(b) for b in BANDS]
        self.timeouts = [metrics.queue_timeouts.labels(b) for b in BANDS]
        self.full = [metrics.queue_full.labels(b) for b in BANDS]
        pool.on_checked.append(self._checked)

    def configure(self, settings: Settings) -> None:
        """The capacity settings of the newest configuration; capacities start over when they change."""
        workers, learn = settings.server.workers, settings.scheduler.learn_capacity
        if (workers, learn) != (self._workers, self._learn):
            self._workers, self._learn = workers, learn
            self._caps.clear()

    def forget(self, names: Iterable[str]) -> None:
        """Engines whose settings changed or that are gone: their capacity is learnt again."""
        for name in names:
            self._caps.pop(name, None)

    def release(self, engine: Engine) -> None:
        engine.outstanding -= 1
        if self.queue.size:
            self._pump()

    # ---- slots -----------------------------------------------------------------------------

    def capacity(self, engine: Engine) -> Capacity:
        cap = self._caps.get(engine.name)
        if cap is None:
            cap = self._caps[engine.name] = Capacity(engine.settings, self._workers, self._learn)
        return cap

    def room(self, route: RouteSettings, tried: frozenset[str]) -> frozenset[str] | None:
        """None when no usable engine of the route has room; else the engines to leave out of
        the pick (the full ones and those tried), usually none at all."""
        caps = self._caps
        room = False
        full: list[str] | None = None
        for engine in self._pool.members_of(route.engines):
            name = engine.name
            if not engine.healthy or name in tried:
                continue
            cap = caps.get(name) or self.capacity(engine)
            if cap.limit is None or engine.outstanding < cap.limit:
                room = True
            elif full is None:
                full = [name]
            else:
                full.append(name)
        if not room:
            return None
        return tried if full is None else tried.union(full)

    @staticmethod
    def take(router: Router, request: ApiRequest, route: RouteSettings, leave_out: frozenset[str]) -> Pick | None:
        pick = router.pick(request, leave_out, route)
        if pick is not None:
            pick.engine.outstanding += 1
        return pick

    def _checked(self, engine: Engine) -> None:
        """After each health check: learn capacity; room may have appeared (an engine back in
        rotation, a capacity raised), so waiting requests are offered it."""
        self.capacity(engine).observe(engine)
        if self.queue.size:
            if not engine.healthy:
                self._reroute()
            self._pump()

    def _reroute(self) -> None:
        """Waiting requests whose route lost every healthy engine are assigned a route again;
        with none left for their model they get 503 at once rather than wait for nothing."""
        for band in range(len(BANDS)):
            stranded = [
                t
                for t in self.queue.tickets(band)
                if not any(e.healthy for e in self._pool.members_of(t.payload[2].engines))
            ]
            for ticket in stranded:
                future, request, _, router = ticket.payload
                self.leave(ticket)
                if future.done():
                    continue  # its client left a moment ago
                route = router.assign(request)
                if route is None:
                    no_engine = f"No healthy engine serves '{request.model}' right now."
                    future.set_exception(GatewayError(503, no_engine, code=Code.NO_HEALTHY_ENGINE))
                    continue
                ticket.group, ticket.payload = route, (future, request, route, router)
                self.queue.push(ticket)
                self.queued[band].inc()

    # ---- the queue -------------------------------------------------------------------------

    def push(self, ticket: Ticket) -> None:
        self.queue.push(ticket)
        self.queued[ticket.band].inc()
        self._pump()  # it may go at once: those ahead of it may wait for other engines

    def leave(self, ticket: Ticket) -> None:
        if self.queue.remove(ticket):
            self.queued[ticket.band].dec()

    def _pump(self) -> None:
        """Dispatches waiting tickets while one of them can use a free engine slot."""
        queue = self.queue
        while queue.size:
            room: dict[Hashable, frozenset[str] | None] = {}  # per route, for this one decision
            ticket = queue.pop(functools.partial(self._eligible, room))
            if ticket is None:
                return
            self.queued[ticket.band].dec()
            future, request, route, router = ticket.payload
            if future.done():
                continue  # its client left a moment ago; its task has not run yet
            leave_out = room[ticket.group]
            assert leave_out is not None
            waited = self.clock() - ticket.enqueued
            band = ticket.band
            self._recent_wait[band] += _RECENT * (waited - self._recent_wait[band])
            self._waits[band].observe(waited)
            self._dispatches[band].inc()
            future.set_result(self.take(router, request, route, leave_out))

    def _eligible(self, room: dict[Hashable, frozenset[str] | None], route: Hashable) -> bool:
        if route not in room:
            assert isinstance(route, RouteSettings)
            room[route] = self.room(route, NOTHING)
        return room[route] is not None

    def retry_after(self, band: int) -> str:
        """How long requests of this band have waited lately: when a retry may get through."""
        return str(max(1, math.ceil(self._recent_wait[band])))

    def view(self, router: Router, model: str) -> dict[str, Any]:
        now = self.clock()
        bands: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(BANDS):
            waits = [now - t.enqueued for t in self.queue.tickets(i) if t.model == model]
            bands[name] = {"queued": len(waits), "oldest_wait_s": round(max(waits, default=0.0), 3)}
        return {"enabled": True, "bands": bands, "engines": _engines_view(router, model, self._caps)}


class Scheduler:
    """The scheduler of one configuration: its router and queue bounds, over the process's SlotQueue."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        slots: SlotQueue | None = None,
    ) -> None:
        s = settings.scheduler
        self._router = router
        self._slots = slots or SlotQueue(router.pool, metrics, clock)
        self._slots.configure(settings)
        self._max_wait = s.max_queue_wait
        self._max_per_key = s.max_queued_per_key
        self._default_max_tokens = settings.auth.default_max_tokens

    @property
    def slots(self) -> SlotQueue:
        return self._slots

    # ---- the request path ------------------------------------------------------------------

    async def acquire(self, request: ApiRequest, principal: Principal, grant: Grant | None) -> Pick | None:
        router = self._router
        route = router.assign(request)
        if route is None:
            return None
        slots = self._slots
        if not slots.queue.size:
            leave_out = slots.room(route, NOTHING)
            if leave_out is not None:
                return slots.take(router, request, route, leave_out)
        return await self._wait(self._ticket(request, principal, grant, route))

    def retry(self, request: ApiRequest, tried: frozenset[str]) -> Pick | None:
        router = self._router
        route = router.assign(request, tried)
        if route is None:
            return None
        leave_out = self._slots.room(route, tried)
        return None if leave_out is None else self._slots.take(router, request, route, leave_out)

    def release(self, engine: Engine) -> None:
        self._slots.release(engine)

    def waiting(self) -> int:
        return self._slots.queue.size

    def view(self, model: str) -> dict[str, Any]:
        return self._slots.view(self._router, model)

    # ---- the queue -------------------------------------------------------------------------

    def _ticket(self, request: ApiRequest, principal: Principal, grant: Grant | None, route: RouteSettings) -> Ticket:
        if request.batch_id is not None:
            band = BATCH
        else:
            band = PRIORITIES.index(principal.priority) if principal.priority in PRIORITIES else NORMAL
        if principal.key_id is not None:
            flow = principal.key_id
        else:  # auth off: the `user` field names the flow, so an application can share fairly
            flow = f"user:{request.subject}" if request.subject else "anonymous"
        slots = self._slots
        if slots.queue.queued_by(flow) >= self._max_per_key:
            slots.full[band].inc()
            raise GatewayError(
                429,
                f"Too many requests of this key are waiting for an engine ({self._max_per_key}); retry later.",
                code=Code.QUEUE_FULL,
                headers={"retry-after": slots.retry_after(band)},
            )
        cost = _cost(request, grant, self._default_max_tokens)
        future: asyncio.Future[Pick | None] = asyncio.get_running_loop().create_future()
        payload = (future, request, route, self._router)
        return Ticket(flow, band, route, cost, principal.weight, request.model, slots.clock(), payload)

    async def _wait(self, ticket: Ticket) -> Pick | None:
        future: asyncio.Future[Pick | None] = ticket.payload[0]
        slots = self._slots
        slots.push(ticket)
        try:
            async with asyncio.timeout(self._max_wait):
                return await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # dispatched just as the time ran out: take it
            slots.leave(ticket)
            slots.timeouts[ticket.band].inc()
            raise GatewayError(
                429,
                f"No engine slot freed up within {self._max_wait:g} s; retry later.",
                code=Code.QUEUE_TIMEOUT,
                headers={"retry-after": slots.retry_after(ticket.band)},
            ) from None
        except asyncio.CancelledError:  # the client left, or the server is stopping
            if not future.done() or future.cancelled():
                slots.leave(ticket)
            elif future.exception() is None:
                pick = future.result()
                if pick is not None:
                    self.release(pick.engine)  # woken for a slot nobody will use now
            raise


def _cost(request: ApiRequest, grant: Grant | None, default_max_tokens: int) -> float:
    """A request's size in tokens for fair share: its reservation when one was made, else the
    prompt (counted at admission, or estimated from the body's size) plus what it may write."""
    admission = grant.admission if grant is not None else None
    if admission is not None and admission.reserved > 0:
        return float(admission.reserved)
    prompt = request.prompt_tokens  # counted at admission, when the reservation or the prompt bound needed it
    if prompt is None:
        prompt = request.size // BYTES_PER_TOKEN
    completion = 0
    if request.endpoint.kind != "embeddings":
        completion = (request.max_tokens or default_max_tokens) * request.n * request.prompts
    return float(max(1, prompt + completion))


def _engines_view(router: Router, model: str, caps: dict[str, Capacity]) -> list[dict[str, Any]]:
    engines = {e.name: e for route in router.routes[model] for e in router.members(route)}
    out = []
    for name, engine in engines.items():
        cap = caps.get(name)
        out.append(
            {
                "name": name,
                "healthy": engine.healthy,
                "in_flight": engine.outstanding,
                "capacity": cap.limit if cap is not None else None,
                "capacity_source": cap.source if cap is not None else "unknown",
            }
        )
    return out
