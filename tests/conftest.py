"""The suite's fixtures live in testkit/ (shared with bench/); they are registered here as plugins.

Under pytest-xdist (scripts/test.sh: `-n 4 --dist loadfile --no-loadscope-reorder`) each file runs
on one worker, handed out in collection order; the slowest files are collected first so that none
of them starts last and keeps one worker busy after the others are done.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["testkit.fixtures", "testkit.redis_server", "testkit.redis_cluster", "testkit.stores"]

# The longest files, longest first (measured with --durations=0 on 2 cores); the rest keep their order.
SLOW_FIRST = (
    "test_fuzz.py",
    "test_vllm.py",
    "test_batch_api.py",
    "test_hardening.py",
    "test_gateway_quota.py",
    "test_scheduler.py",
    "test_monitor_gateway.py",
    "test_console.py",
    "test_worker.py",
    "test_store_batches.py",
    "test_scale_to_zero.py",
    "test_reload.py",
    "test_gateway.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
