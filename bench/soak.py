"""A soak of hostile requests (issue 9): 10,000 by default, drawn from the strategies of the fuzz
suite (tests/hostile.py) by Hypothesis, against the same setup (tests/fuzz_rig.py: two gateway
replicas with keys on over one private redis-server, one SQLite store, a fast fake engine).

Nothing stops at the first bad answer: it counts answers by status (and by error code for every
status >= 400), keeps the first example of every problem (a 500, a status >= 500 other than
503/504 with their documented codes, an error not in OpenAI's shape, a missing x-request-id, a
request the gateway did not answer), measures each replica's RSS (main process and workers)
before and after, and runs the after-checks: both replicas healthy and ready, the key list and
model routes readable on both, no traceback in their logs. Exits 1 when anything was wrong.

    .venv/bin/python bench/soak.py [--cases 10000] [--seed 9] [--concurrency 8] [--json soak.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gateway_overhead import tree_rss
from tests.fuzz_rig import after_checks, rig
from tests.hostile import cases, learn, problem, send
from tests.hostile_http import Case, World
from tests.procs import Proc, free_port
from tests.redis_fixtures import RedisServer


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


def summary(report: dict[str, Any]) -> str:
    lines = [f"{report['requests']} hostile requests, {report['concurrency']} at a time, in {report['seconds']} s"]
    lines.append("by status: " + ", ".join(f"{k}: {v}" for k, v in report["by_status"].items()))
    lines += [f"  {code}: {n}" for code, n in report["by_error_code"].items()]
    for sent, sample in report["rss_mib"].items():
        lines.append(
            f"RSS MiB after {sent:>6}: " + " | ".join(", ".join(f"{k} {v}" for k, v in r.items()) for r in sample)
        )
    lines.append(f"problems: {report['problems']}")
    lines += [f"  {example}" for example in report["problem_examples"].values()]
    lines.append("after-checks: " + ("all passed" if not report["after_checks"] else ""))
    lines += [f"  {t[:2000]}" for t in report["after_checks"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--logs", type=Path, help="keep the processes' logs in this folder (default: a temporary one)")
    args = p.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("soak: redis-server is not on PATH (scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        redis = RedisServer(binary, free_port(), logs).start()
        try:
            with rig(logs, redis, name="soak") as (world, replicas):
                tally, seconds = soak(world, replicas, args.cases, args.seed, args.concurrency)
                trouble = after_checks(world, replicas)
        finally:
            redis.stop()
    report: dict[str, Any] = {
        "requests": sum(tally.by_status.values()),
        "concurrency": args.concurrency,
        "seconds": round(seconds, 1),
        "by_operation": dict(tally.by_op.most_common()),
        "by_status": {str(k): v for k, v in sorted(tally.by_status.items())},
        "by_error_code": dict(sorted(tally.by_code.items())),
        "rss_mib": {str(sent): sample for sent, sample in tally.rss},
        "problems": tally.problem_count,
        "problem_examples": tally.problems,
        "after_checks": trouble,
    }
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    sys.exit(1 if tally.problem_count or trouble else 0)


if __name__ == "__main__":
    main()
