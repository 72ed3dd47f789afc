"""Property-based fuzzing of the whole HTTP surface (issue 9, "How to show it"), on real processes:
two gateway replicas with keys on over one private Redis, one SQLite store and a fast fake engine.

Hypothesis draws hostile requests (testkit/hostile.py) for the public API, the Files and Batches
APIs, the admin API and odd paths and methods; every answer must be OpenAI-shaped JSON when it is
an error, never a 500, and a status >= 500 only 503/504 with their documented codes. After the
run both replicas must be healthy and ready, with the key list and model routes readable and no
traceback in their logs. Derandomized (a fixed seed per test) so CI is reproducible; the example
counts keep the whole file well under two minutes on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testkit.fuzz_rig import after_checks, rig
from testkit.hostile import cases, learn, problem, send
from testkit.hostile_http import Case, World
from testkit.procs import Proc
from testkit.redis_server import RedisServer
from testkit.soak import soak


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


@pytest.fixture(scope="module")
def attacked(logs_dir: Path, redis_session: RedisServer) -> Iterator[tuple[World, list[Proc], httpx.Client]]:
    with rig(logs_dir, redis_session) as (world, replicas), httpx.Client(timeout=60) as client:
        yield world, replicas, client


def check(client: httpx.Client, world: World, case: Case) -> None:
    response = send(client, world, case)
    trouble = problem(case, response)
    assert trouble is None, f"{trouble}\nrequest: {case.describe()}"
    learn(world, case, response)


@pytest.mark.timeout(900)  # CPU-bound: a parallel run on a busy machine gives it a fraction of a core
@pytest.mark.parametrize(
    ("area", "examples"), [("public", 1300), ("files", 700), ("admin", 1000), ("odd", 400), ("agent", 800)]
)
def test_hostile_requests_get_clear_answers(
    attacked: tuple[World, list[Proc], httpx.Client], area: str, examples: int
) -> None:
    world, _, client = attacked

    sent = 0

    @fuzz_settings(examples)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        nonlocal sent
        sent += 1
        check(client, world, data.draw(cases(world, area)))

    run()
    assert sent >= examples  # the whole budget was spent, none of it lost to exhaustion


def test_the_soak_counts_every_answer(attacked: tuple[World, list[Proc], httpx.Client]) -> None:
    """The soak (testkit/soak.py, bench/soak.py) on the same setup, briefly: every request counted once, by status and by
    operation, memory sampled, and no problem."""
    world, replicas, _ = attacked
    tally, _ = soak(world, replicas, total=60, rng_seed=1, concurrency=4)
    assert sum(tally.by_status.values()) == sum(tally.by_op.values()) == 60
    assert tally.problem_count == 0, tally.problems
    assert [sent for sent, _ in tally.rss] == list(range(0, 61, 6))
    assert all(r["main"] > 0 and r["workers"] > 0 for _, sample in tally.rss for r in sample)


def test_both_replicas_are_sound_after_the_attack(attacked: tuple[World, list[Proc], httpx.Client]) -> None:
    world, replicas, _ = attacked
    assert after_checks(world, replicas) == []
