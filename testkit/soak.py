"""The soak's engine (issue 9), shared by bench/soak.py (10,000 hostile requests) and the fuzz
suite (tests/test_fuzz.py, briefly): hostile requests drawn by Hypothesis from testkit/hostile.py,
sent in groups at once, every answer tallied by status, error code and operation, the replicas'
memory sampled as it goes.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from testkit.hostile import cases, learn, problem, send
from testkit.hostile_http import Case, World
from testkit.procs import Proc, tree_rss


def rss_mib(replicas: list[Proc]) -> list[dict[str, float]]:
    """Per replica: the main process, its children (the worker and multiprocessing's resource
    tracker), and the prompt-counting pool a worker starts on the first big prompt of a
    token-limited key (gateway/access/tokens.py), in MiB."""
    out = []
    for proc in replicas:
        assert proc.proc is not None
        main = psutil.Process(proc.proc.pid)
        parts = {"main": main.memory_info().rss / 2**20, "workers": 0.0, "counting pool": 0.0}
        for child in main.children():
            try:
                parts["workers"] += child.memory_info().rss / 2**20
                parts["counting pool"] += (tree_rss(child) - child.memory_info().rss) / 2**20
            except psutil.Error:
                continue
        out.append({k: round(v, 1) for k, v in parts.items()})
    return out


class Tally:
    """Counts answers as they come; `record` takes a group of cases sent at once (one thread each)."""

    def __init__(self, replicas: list[Proc], sample_every: int, pool: ThreadPoolExecutor) -> None:
        self.by_status: Counter[int] = Counter()
        self.by_code: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()
        self.problems: dict[str, str] = {}  # the first request of each kind of problem
        self.problem_count = 0
        self.replicas = replicas
        self.sample_every = sample_every
        self.pool = pool
        self.rss: list[tuple[int, list[dict[str, float]]]] = [(0, rss_mib(replicas))]

    def record(self, group: list[Case], client: httpx.Client, world: World) -> None:
        answers = list(self.pool.map(lambda case: _answer(client, world, case), group))
        for case, answer in zip(group, answers, strict=True):
            before = sum(self.by_op.values())
            self.by_op[case.op] += 1
            self._judge(case, answer, world)
            if (before + 1) % self.sample_every == 0:
                self.rss.append((before + 1, rss_mib(self.replicas)))

    def _judge(self, case: Case, answer: httpx.Response | Exception, world: World) -> None:
        if isinstance(answer, Exception):
            self.by_status[0] += 1
            self._problem(f"no answer: {type(answer).__name__}: {answer}"[:200], case)
            return
        status = answer.status_code
        self.by_status[status] += 1
        if status >= 400 and case.method.upper() != "HEAD":
            try:
                code = answer.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            self.by_code[f"{status} {code}"] += 1
        trouble = problem(case, answer)
        if trouble is not None:
            self._problem(trouble, case)
        else:
            learn(world, case, answer)

    def _problem(self, trouble: str, case: Case) -> None:
        self.problem_count += 1
        kind = trouble.split(":", 1)[0][:120]
        self.problems.setdefault(kind, f"{trouble[:400]}\n    request: {case.describe()}")


def _answer(client: httpx.Client, world: World, case: Case) -> httpx.Response | Exception:
    try:
        return send(client, world, case)
    except httpx.HTTPError as exc:
        return exc


def soak(world: World, replicas: list[Proc], total: int, rng_seed: int, concurrency: int) -> tuple[Tally, float]:
    """`total` requests of every kind mixed (each operation as likely as in AREAS), drawn in
    groups of `concurrency` that are sent at once."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with ThreadPoolExecutor(concurrency) as pool, httpx.Client(timeout=60, limits=limits) as client:
        tally = Tally(replicas, max(1, total // 10), pool)
        started = time.perf_counter()
        group: list[Case] = []

        @seed(rng_seed)
        @settings(
            max_examples=total,
            phases=[Phase.generate],  # no shrinking: every request is counted, none repeated
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            group.append(data.draw(cases(world)))
            if len(group) == concurrency:
                tally.record(group, client, world)
                group.clear()

        run()
        if group:
            tally.record(group, client, world)
    return tally, time.perf_counter() - started
