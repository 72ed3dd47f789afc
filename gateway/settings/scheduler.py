"""The `scheduler:` section: priorities and fair share when every engine of a model is full
(gateway/dispatch/scheduler.py does the scheduling)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.settings.reader import Reader, simple_section


@dataclass(frozen=True)
class SchedulerSettings:
    # false: no gateway queue; requests go to the engines first come, first served
    enabled: bool = True
    # seconds a request may wait for an engine slot before it gets 429 queue_timeout
    max_queue_wait: float = 30.0
    # requests one key (one `user` with auth off) may have waiting; the next gets 429 queue_full
    max_queued_per_key: int = 256
    # learn an engine's capacity from its running/waiting figures when it has no max_inflight
    learn_capacity: bool = True


def parse_scheduler(r: Reader, data: Mapping[str, Any]) -> SchedulerSettings:
    scheduler: SchedulerSettings = simple_section(r, data, "scheduler", SchedulerSettings)
    if scheduler.max_queue_wait <= 0:
        raise r.fail("scheduler.max_queue_wait", f"must be > 0 seconds, got {scheduler.max_queue_wait!r}")
    if scheduler.max_queued_per_key < 1:
        raise r.fail("scheduler.max_queued_per_key", f"must be >= 1, got {scheduler.max_queued_per_key!r}")
    return scheduler
