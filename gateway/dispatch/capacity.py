"""How many requests an engine runs at once, as this gateway process sees it (its slots).

Configured: `max_inflight` on the engine, split evenly between the gateway's worker processes
(each schedules its own traffic; at least one slot each).

Learned, when the engine has no `max_inflight` (and `scheduler.learn_capacity` is on), from the
running and waiting figures the engine reports on /metrics (vLLM's `vllm:num_requests_running`
and `_waiting`, the CPU worker's `engine_num_requests_running` and `_waiting`), read at every
health check:

- Until the engine is first seen saturated there is no limit: requests go straight through.
- Saturated: the engine reports a queue of at least max(2, running / 8) requests at two health
  checks in a row while this process has requests there. A request caught between two engine
  steps (a prefill, vLLM's admission at the next step) makes a queue of one or two for an
  instant, which says nothing; a queue that outlives a health interval and is at least an
  eighth of the running batch means the engine is full. The capacity becomes what the engine
  runs at that moment, times this process's share of the engine's requests (outstanding /
  (running + waiting)), so several replicas in front of one engine share it.
- Probing: after three checks in a row at which this process used every slot and the engine
  showed no such queue, the capacity grows by an eighth (at least one). If the engine could not
  take them, the next saturation sets the capacity back to what it runs. So a capacity learned
  too low recovers (by 12.5% every three checks), and what waits in the engine's own first-come
  queue, out of the scheduler's reach, stays around an eighth of its capacity.

A configured capacity is exact; prefer it where the engine's limit is known (vLLM's
`max_num_seqs`, the CPU worker's batch).
"""

from __future__ import annotations

from gateway.engines.pool import Engine
from gateway.settings import EngineSettings

QUEUE_FRACTION = 8  # a queue of running / 8 (at least MIN_QUEUE) means saturated
MIN_QUEUE = 2
SATURATED_CHECKS = 2
PROBE_AFTER = 3  # calm checks at full use before growing
PROBE_FRACTION = 8  # grow by capacity / 8, at least 1


class Capacity:
    """One engine's slots for this process. `limit` None means no limit (not learned yet)."""

    __slots__ = ("_calm", "_queued", "configured", "learns", "limit")

    def __init__(self, settings: EngineSettings, workers: int = 1, learn: bool = True) -> None:
        self.configured = None if settings.max_inflight is None else max(1, settings.max_inflight // max(1, workers))
        self.limit: int | None = self.configured
        self.learns = learn and self.configured is None and settings.metrics_path is not None
        self._queued = 0  # consecutive checks that saw the engine saturated
        self._calm = 0  # consecutive checks at full use with no queue

    @property
    def source(self) -> str:
        if self.configured is not None:
            return "configured"
        return "learned" if self.limit is not None else "unknown"

    def has_room(self, engine: Engine) -> bool:
        limit = self.limit
        return limit is None or engine.outstanding < limit

    def observe(self, engine: Engine) -> bool:
        """After a health check: learn from the engine's figures. True when the limit rose or
        went away (waiting requests may now fit)."""
        if not self.learns or not engine.healthy:
            return False
        running, waiting, ours = engine.running, engine.waiting, engine.outstanding
        if ours > 0 and waiting >= max(MIN_QUEUE, running / QUEUE_FRACTION):
            self._calm = 0
            self._queued += 1
            if self._queued >= SATURATED_CHECKS:
                share = min(1.0, ours / (running + waiting))
                learned = max(1, int(running * share))
                raised = self.limit is not None and learned > self.limit
                self.limit = learned
                return raised
            return False
        self._queued = 0
        limit = self.limit
        if limit is not None and ours >= limit:
            self._calm += 1
            if self._calm >= PROBE_AFTER:
                self._calm = 0
                self.limit = limit + max(1, limit // PROBE_FRACTION)
                return True
        else:
            self._calm = 0
        return False
