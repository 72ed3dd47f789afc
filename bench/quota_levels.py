"""What each further quota level costs, in-process and precise: `Quota.admit` and `Quota.release`
(gateway/access/quota.py) against a private `redis-server`, for a key alone and for a key of a team
of an organization (every level with rpm, tpm, max_concurrent, daily tokens and daily and monthly
money budgets), side by side in one run, alternating, medians of rounds.

Per request it reports this process's CPU (the lean client: building, packing and parsing the
script calls) and the Redis server's CPU (INFO cpu: the scripts, the protocol, the network), each
for admission and for the settle, and the difference between the levels. `--before DIR` runs the
same in a checkout of an older commit (a subprocess with that tree on its path) against the same
Redis, interleaved, so the two are compared in one run. `--callgrind` runs redis-server under
valgrind and counts the instructions it executes per request instead: slow, but the same figure on
a busy machine as on a quiet one.

    .venv/bin/python bench/quota_levels.py [--rounds 5] [--requests 4000] [--concurrency 16] [--before DIR]
    .venv/bin/python bench/quota_levels.py --callgrind --rounds 1 --requests 512 [--before DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
BIG = {"rpm": "1000000000", "tpm": "1000000000000", "max_concurrent": "1000000", "daily_tokens": "1000000000000000"}
MONEY = {"daily_budget": str(10**17), "monthly_budget": str(10**17)}
COMMON = {"created_at": "1", "revoked_at": "", "expires_at": "", "models": "", "metadata": "{}", "monthly_tokens": ""}
KEY = {**COMMON, "name": "bench", "priority": "normal", "weight": "1", "prefix": "sk-gw-abcd", **BIG}
VARIANTS = ("key alone", "key + team", "key + team + org")


def seed(r: redis.Redis, prefix: str) -> None:
    """The records admission reads: a key alone, and a key of team_y of org_z (the mirror of its
    record under the organization's hash tag, gateway/access/levels.py), and for key + team a
    second team without an organization."""
    r.hset(f"{prefix}:{{key_a}}:rec", mapping={**KEY, "id": "key_a", "daily_budget": "", "monthly_budget": ""})
    r.hset(f"{prefix}:{{org_z}}:key:key_b", mapping={**KEY, "id": "key_b", **MONEY, "team": "team_y", "org": "org_z"})
    r.hset(f"{prefix}:{{org_z}}:team:team_y", mapping={**COMMON, "name": "t", **BIG, **MONEY, "org": "org_z"})
    r.hset(f"{prefix}:{{org_z}}:org:org_z", mapping={**COMMON, "name": "o", **BIG, **MONEY})
    r.hset(f"{prefix}:{{team_x}}:key:key_c", mapping={**KEY, "id": "key_c", **MONEY, "team": "team_x", "org": ""})
    r.hset(f"{prefix}:{{team_x}}:team:team_x", mapping={**COMMON, "name": "t", **BIG, **MONEY, "org": ""})


def variant_keys() -> dict[str, Any]:
    """The keys `seed` made, as the key store would answer them."""
    from gateway.access.keys import ApiKey

    return {
        "key alone": ApiKey(id="key_a", name="a"),
        "key + team": ApiKey(id="key_c", name="c", team="team_x"),
        "key + team + org": ApiKey(id="key_b", name="b", team="team_y", org="org_z"),
    }


def redis_cpu(r: redis.Redis) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_user"] + cpu["used_cpu_sys"])


async def measure(port: int, prefix: str, requests: int, concurrency: int) -> dict[str, list[float]]:
    """Per variant: CPU µs per request of this process and of Redis, for admission and settle."""
    from gateway.access.quota import Quota
    from gateway.resp.client import RespClient

    r = redis.Redis(port=port)
    seed(r, prefix)
    keys = variant_keys()
    out: dict[str, list[float]] = {}
    for name, key in keys.items():
        quota = Quota(RespClient(f"redis://127.0.0.1:{port}/0", 1.0), prefix)
        for _ in range(2):  # warm-up: the connection, the scripts, the caches of keys
            await quota.release(await quota.admit(key, "m", 40, money=1000), 10, 16, 900)
        admit_cpu = admit_redis = settle_cpu = settle_redis = 0.0
        for _ in range(0, requests, concurrency):
            # Redis's counters are read outside this process's timings (INFO costs both sides the
            # same for every variant: it cancels out of the differences)
            server = redis_cpu(r)
            cpu = time.process_time()
            admitted = await asyncio.gather(*(quota.admit(key, "m", 40, money=1000) for _ in range(concurrency)))
            admit_cpu += time.process_time() - cpu
            server2 = redis_cpu(r)
            admit_redis += server2 - server
            cpu = time.process_time()
            await asyncio.gather(*(quota.release(adm, 10, 16, 900) for adm in admitted))
            quota.settles.flush()
            await quota.redis.execute("PING")  # the settle has run
            settle_cpu += time.process_time() - cpu
            settle_redis += redis_cpu(r) - server2
        figures = [admit_cpu, admit_redis, settle_cpu, settle_redis]
        await quota.close()
        await quota.redis.close()
        out[name] = [f / requests * 1e6 for f in figures]
    r.close()
    return out


class Callgrind:
    """Instructions Redis executed (valgrind's callgrind counts them: the same on a busy machine as on
    a quiet one), between `zero` and `total`."""

    def __init__(self, pid: int, out: str) -> None:
        self.pid, self.out = pid, out

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], capture_output=True, check=True)

    def total(self) -> int:
        subprocess.run(["callgrind_control", "-d", str(self.pid)], capture_output=True, check=True)
        dumps = sorted(Path(self.out).parent.glob(Path(self.out).name + "*"), key=lambda f: f.stat().st_mtime)
        for line in dumps[-1].read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
        raise RuntimeError(f"no totals in {dumps[-1]}")


async def instructions(port: int, prefix: str, requests: int, concurrency: int, meter: Callgrind) -> dict[str, Any]:
    """Per variant: Redis's instructions per request, for admission and for the settle."""
    from gateway.access.quota import Quota
    from gateway.resp.client import RespClient

    r = redis.Redis(port=port)
    seed(r, prefix)
    keys = variant_keys()
    out: dict[str, Any] = {}
    for name, key in keys.items():
        quota = Quota(RespClient(f"redis://127.0.0.1:{port}/0", 30.0), prefix, redis_timeout=30.0)
        await quota.release(await quota.admit(key, "m", 40, money=1000), 10, 16, 900)  # loads the scripts
        meter.zero()
        admitted = []
        for _ in range(0, requests, concurrency):
            admitted += await asyncio.gather(*(quota.admit(key, "m", 40, money=1000) for _ in range(concurrency)))
        admit = meter.total()
        meter.zero()
        for i in range(0, len(admitted), concurrency):
            await asyncio.gather(*(quota.release(adm, 10, 16, 900) for adm in admitted[i : i + concurrency]))
            quota.settles.flush()
        await quota.redis.execute("PING")
        settle = meter.total()
        await quota.close()
        await quota.redis.close()
        out[name] = [admit / len(admitted), settle / len(admitted)]
    r.close()
    return out


def child(port: int, prefix: str, requests: int, concurrency: int, callgrind: str) -> None:
    if callgrind:
        pid, out = callgrind.split(":", 1)
        figures = asyncio.run(instructions(port, prefix, requests, concurrency, Callgrind(int(pid), out)))
    else:
        figures = asyncio.run(measure(port, prefix, requests, concurrency))
    print(json.dumps(figures))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--before", type=Path, help="a checkout of an older commit, run side by side")
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="count Redis's instructions instead of its CPU time (redis-server under valgrind; use few requests)",
    )
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]), args.child[4])
        return
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (scripts/setup.sh installs it)"
    sys.path.insert(0, str(ROOT))
    from testkit.procs import free_port

    trees = {"now": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[tuple[str, str], list[list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
        out = f"{tmp}/callgrind.out"
        if args.callgrind:
            assert shutil.which("valgrind") and shutil.which("callgrind_control"), "--callgrind needs valgrind"
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meter = f"{server.pid}:{out}" if args.callgrind else ""
        try:
            for _ in range(600):
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            for round_ in range(args.rounds):
                for tree_name, tree in trees.items():
                    command = [sys.executable, __file__, "--child", str(port), f"r{round_}", str(args.requests)]
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    command += [str(args.concurrency), meter]
                    done = subprocess.run(command, env=env, cwd=tree, capture_output=True)
                    if done.returncode:
                        raise SystemExit(done.stderr.decode())
                    for variant, figures in json.loads(done.stdout).items():
                        results.setdefault((tree_name, variant), []).append(figures)
        finally:
            server.terminate()
            server.wait(10)
    report(args, trees, results)


def report(args: Any, trees: dict[str, Path], results: dict[tuple[str, str], list[list[float]]]) -> None:
    load = os.getloadavg()[0]
    if args.callgrind:
        print(f"Redis's instructions per request (thousands), median of {args.rounds} rounds of {args.requests}")
        print(f"{'':<8} {'':<18}{'admission':>12}{'settle':>12}{'total':>12}{'vs key alone':>14}")
        for tree_name in trees:
            alone = 0.0
            for variant in VARIANTS:
                runs = results[(tree_name, variant)]
                admit, settle = (statistics.median(run[i] for run in runs) / 1000 for i in range(2))
                alone = admit + settle if variant == "key alone" else alone
                extra = f"{admit + settle - alone:>+14.0f}" if variant != "key alone" else ""
                print(f"{tree_name:<8} {variant:<18}{admit:>12.0f}{settle:>12.0f}{admit + settle:>12.0f}{extra}")
        return
    print(
        f"CPU µs per request, median of {args.rounds} rounds of {args.requests} requests, {args.concurrency} at a "
        f"time (load average {load:.1f})"
    )
    columns = ("admit client", "admit Redis", "settle client", "settle Redis", "total")
    print(f"{'':<8} {'':<18}" + "".join(f"{c:>14}" for c in columns) + f"{'vs key alone':>14}")
    for tree_name in trees:
        alone = 0.0
        for variant in VARIANTS:
            runs = results[(tree_name, variant)]
            row = [statistics.median(run[i] for run in runs) for i in range(4)]
            total = statistics.median(sum(run) for run in runs)
            alone = total if variant == "key alone" else alone
            extra = f"{total - alone:>+14.1f}" if variant != "key alone" else ""
            print(f"{tree_name:<8} {variant:<18}" + "".join(f"{v:>14.1f}" for v in (*row, total)) + extra)
    print("target (issue 22): key + team (+ org) with money budgets at most 30 µs over the key alone, Redis included")


if __name__ == "__main__":
    main()
