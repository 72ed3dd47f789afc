"""Many gateway replicas under one shared API key, on one Redis Cluster and on one plain Redis, side by
side in one run: requests per second per replica and in total, CPU per request of every gateway process
and of the Redis nodes, at a few concurrency levels; at the end, whether the key's usage is exact.

Set-up (bench/replica_fleet.py): two fleets of --replicas (4) `llm-gateway serve --workers 1` processes
with keys and quotas on, one fleet on a private 6-node Redis Cluster (3 masters + 3 replicas), one on a
private redis-server; one API key per fleet with rpm, tpm, max_concurrent and a daily budget set too high
ever to refuse; both in front of one fast upstream (nginx with canned answers, bench/nginx_upstream.py,
or testkit/fake_upstream.py with --upstream fake). The gateways share --gateway-cores (1); the load
generator (this process), the upstream and every Redis node share --client-cores (0).

A run: --levels total clients (4, 16, 64), dealt evenly over the replicas, each a closed loop of
non-streaming chat completions on its own connections for --seconds, after a warm-up of 2 requests
per client. CPU is read before and after each run from the scheduler's counters (idle CPU: health
checks, the other fleet's idling, included). Fleets alternate, the order rotating each round; figures
are medians over --rounds. Exactness: every answer the bench got is counted, and at the end the key's
day usage must count exactly the 200s, every reservation reconciled, and no lease left.

    .venv/bin/python bench/replicas.py [--rounds 5] [--levels 4,16,64] [--seconds 2.5] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench import servers
from bench.gateway_overhead import run_async
from bench.replica_fleet import Backing, Fleet, gateway, one_redis, redis_cluster
from bench.request_path import git_commit
from bench.request_path_runs import JSON_BODY, session_for
from bench.servers import Upstream, start_upstream
from testkit.loadgen import closed_loop

MACHINE_NOTE = (
    "The machine: 2 vCPUs shared with other sessions' work. The gateways share one core and the load\n"
    "generator, the upstream and every Redis node the other, so req/s are what one core of gateways served\n"
    "next to a busy client core; CPU per request is the figure that carries to other machines."
)


@dataclass
class Run:
    fleet: str
    round: int
    clients: int  # in all, over the replicas
    seconds: float
    replica_rps: list[float]
    rps: float
    gateway_cpu_ms: list[float]  # per replica: its CPU over its requests
    redis_cpu_us: dict[str, float]  # per request of the fleet, by node role
    scripts_per_request: float  # EVALSHA / EVAL calls
    others_per_request: float  # other commands clients sent (not those the scripts run)
    in_scripts_per_request: float  # commands the scripts ran inside Redis (no round trips)
    p50_ms: float  # median over the replicas' p50
    p99_ms: float  # the worst replica's p99
    client_core_busy: float  # the load generator, the upstream and Redis, over the wall time
    failures: int
    errors: dict[str, int]


def client_core_cpu(upstream: Upstream, backings: list[Backing]) -> float:
    nodes = [n.process for b in backings for n in b.nodes]
    return time.process_time() + servers.cpu_seconds([upstream.process, *nodes])


async def measure(
    fleet: Fleet, upstream: Upstream, backings: list[Backing], round_: int, clients: int, seconds: float
) -> Run:
    per = clients // len(fleet.gateways)
    async with AsyncExitStack() as stack:
        timeout = aiohttp.ClientTimeout(total=120)
        sessions = [await stack.enter_async_context(session_for(g, per, timeout)) for g in fleet.gateways]
        urls = [g.url + "/v1/chat/completions" for g in fleet.gateways]

        async def loops(requests: int, limit_s: float) -> list[Any]:
            runs = (
                closed_loop(s, u, JSON_BODY, per, requests=requests, seconds=limit_s)
                for s, u in zip(sessions, urls, strict=True)
            )
            return list(await asyncio.gather(*runs))

        for w in await loops(2 * per, 30):  # the connections the measured run uses are open
            fleet.count(w.requests, w.failures, w.errors)
        gw0, redis0, (scripts0, inside0, others0) = fleet.gateway_cpu(), fleet.redis_cpu(), fleet.commands()
        core0, wall0 = client_core_cpu(upstream, backings), time.perf_counter()
        results = await loops(10**9, seconds)
        wall = time.perf_counter() - wall0
        gw1, redis1, (scripts1, inside1, others1) = fleet.gateway_cpu(), fleet.redis_cpu(), fleet.commands()
        core = client_core_cpu(upstream, backings) - core0
    errors: dict[str, int] = {}
    for r in results:
        fleet.count(r.requests, r.failures, r.errors)
        for why, n in r.errors.items():
            errors[why] = errors.get(why, 0) + n
    total = max(1, sum(r.requests for r in results))
    return Run(
        fleet=fleet.name,
        round=round_,
        clients=clients,
        seconds=wall,
        replica_rps=[r.rps for r in results],
        rps=sum(r.rps for r in results),
        gateway_cpu_ms=[(b - a) / max(1, r.requests) * 1e3 for a, b, r in zip(gw0, gw1, results, strict=True)],
        redis_cpu_us={role: (redis1[role] - redis0[role]) / total * 1e6 for role in redis1},
        scripts_per_request=(scripts1 - scripts0) / total,
        others_per_request=(others1 - others0) / total,
        in_scripts_per_request=(inside1 - inside0) / total,
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        client_core_busy=core / wall,
        failures=sum(r.failures for r in results),
        errors=errors,
    )


def log_run(r: Run) -> None:
    redis_us = sum(r.redis_cpu_us.values())
    print(
        f"  {r.fleet:<9} round {r.round + 1} clients {r.clients:>3}: {r.rps:6.0f} req/s "
        f"({' / '.join(f'{x:.0f}' for x in r.replica_rps)}), gateway CPU "
        f"{' / '.join(f'{x:.3f}' for x in r.gateway_cpu_ms)} ms/req, Redis {redis_us:.0f} us/req, "
        f"{r.scripts_per_request:.2f} scripts + {r.others_per_request:.3f} other commands/req, "
        f"client core {r.client_core_busy:.0%}" + (f"  FAILURES {r.errors}" if r.failures else ""),
        flush=True,
    )


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Medians over rounds, per fleet and level."""
    out = []
    for fleet in dict.fromkeys(r.fleet for r in runs):
        for clients in dict.fromkeys(r.clients for r in runs):
            rs = [r for r in runs if r.fleet == fleet and r.clients == clients]
            if not rs:
                continue
            replicas = len(rs[0].replica_rps)
            roles = list(rs[0].redis_cpu_us)
            per_replica_cpu = [statistics.median(r.gateway_cpu_ms[i] for r in rs) for i in range(replicas)]
            out.append(
                {
                    "fleet": fleet,
                    "clients": clients,
                    "rounds": len(rs),
                    "rps": statistics.median(r.rps for r in rs),
                    "replica_rps": [statistics.median(r.replica_rps[i] for r in rs) for i in range(replicas)],
                    "gateway_cpu_ms": per_replica_cpu,
                    "gateway_cpu_ms_mean": statistics.fmean(per_replica_cpu),
                    "redis_cpu_us": {role: statistics.median(r.redis_cpu_us[role] for r in rs) for role in roles},
                    "redis_cpu_us_total": statistics.median(sum(r.redis_cpu_us.values()) for r in rs),
                    "scripts_per_request": statistics.median(r.scripts_per_request for r in rs),
                    "others_per_request": statistics.median(r.others_per_request for r in rs),
                    "in_scripts_per_request": statistics.median(r.in_scripts_per_request for r in rs),
                    "p50_ms": statistics.median(r.p50_ms for r in rs),
                    "p99_ms": statistics.median(r.p99_ms for r in rs),
                    "client_core_busy": statistics.median(r.client_core_busy for r in rs),
                    "failures": sum(r.failures for r in rs),
                }
            )
    return out


def print_summary(rows: list[dict[str, Any]], exactness: list[dict[str, Any]], header: str) -> None:
    print(f"\n{header}\n{MACHINE_NOTE}\n")
    print(
        f"{'fleet':<10} {'clients':>7} {'req/s':>7} {'per replica req/s':<24} {'gw CPU ms/req (each)':<28} "
        f"{'mean':>6} {'Redis us/req':>12} {'key master':>10} {'key replica':>11} {'others':>6} "
        f"{'scripts/req':>11} {'other/req':>9} {'in scripts':>10} {'p50 ms':>7} {'p99 ms':>7} {'client core':>11} {'failures':>8}"
    )
    for row in rows:
        redis_us = row["redis_cpu_us"]
        others = sum(v for k, v in redis_us.items() if k.startswith("other"))
        print(
            f"{row['fleet']:<10} {row['clients']:>7} {row['rps']:>7.0f} "
            f"{' / '.join(f'{x:.0f}' for x in row['replica_rps']):<24} "
            f"{' / '.join(f'{x:.3f}' for x in row['gateway_cpu_ms']):<28} {row['gateway_cpu_ms_mean']:>6.3f} "
            f"{row['redis_cpu_us_total']:>12.1f} {redis_us.get('key master', 0):>10.1f} "
            f"{redis_us.get('key replica', 0):>11.1f} {others:>6.1f} {row['scripts_per_request']:>11.2f} "
            f"{row['others_per_request']:>9.3f} {row['in_scripts_per_request']:>10.1f} {row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f} "
            f"{row['client_core_busy']:>11.0%} {row['failures']:>8}"
        )
    print(
        "gw CPU: each gateway process's CPU (its worker included) over the requests it answered; Redis us/req:\n"
        "all of the fleet's Redis nodes over all its requests (key master: the node holding the shared key's\n"
        "slot; key replica: its replica; others: the two other masters and their replicas); scripts/req and\n"
        "other/req: commands clients sent the masters per request (round trips); in scripts: the commands the\n"
        "scripts ran inside Redis per request"
    )
    print("\nexactness (the key's day usage against the answers the bench got, warm-ups included):")
    for e in exactness:
        print(
            f"  {e['fleet']:<10} answered {e['answered']}, 200: {e['status_200']}, counted {e['counted_requests']}; "
            f"tokens {e['tokens']} = prompt + completion {e['prompt_plus_completion']}; leases left "
            f"{e['leases_left']}: {'EXACT' if e['exact'] else 'NOT EXACT'}"
            + (f"; refused {e['refused']}" if e["refused"] else "")
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--levels", default="4,16,64", help="clients in all, each a multiple of --replicas")
    p.add_argument("--seconds", type=float, default=2.5, help="each measured run")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--fleets", default="cluster,single", help="cluster, single (one plain Redis), or both")
    p.add_argument("--upstream", choices=("nginx", "fake"), default="nginx")
    p.add_argument("--gateway-cores", default="1", help="taskset list for the gateways; '' leaves them free")
    p.add_argument("--client-cores", default="0", help="for the load generator, the upstream and Redis; '' free")
    p.add_argument("--json", type=Path, help="write every run, the medians and the exactness check here")
    args = p.parse_args()
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if any(n % args.replicas or n <= 0 for n in args.levels):
        p.error(f"--levels must be positive multiples of --replicas ({args.replicas})")
    args.fleets = [f.strip() for f in args.fleets.split(",") if f.strip()]
    if not args.fleets or set(args.fleets) - {"cluster", "single"}:
        p.error("--fleets: cluster, single or both")
    args.gateway_cores = args.gateway_cores or None
    args.client_cores = args.client_cores or None
    return args


def main() -> None:
    args = parse_args()
    if args.client_cores is not None:
        os.sched_setaffinity(0, {int(c) for c in args.client_cores.split(",")})
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_start = os.getloadavg()[0]
    runs: list[Run] = []
    fleets: list[Fleet] = []
    backings: list[Backing] = []
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = start_upstream(args.upstream, tmp, chunks=8, pace_ms=0, cpus=args.client_cores)
        try:
            for kind in args.fleets:
                backing = (redis_cluster if kind == "cluster" else one_redis)(tmp, args.client_cores)
                backings.append(backing)
                gws = [
                    gateway(tmp, f"{kind}-gw{i}", upstream.json_url, backing.url, args.gateway_cores)
                    for i in range(args.replicas)
                ]
                fleets.append(Fleet(backing.kind, backing, gws))
                print(f"starting {args.replicas} gateways on {backing.kind} ({backing.url})", flush=True)
                fleets[-1].start()
            for round_ in range(args.rounds):
                for clients in args.levels:
                    for i in range(len(fleets)):
                        fleet = fleets[(i + round_) % len(fleets)]
                        run = run_async(partial(measure, fleet, upstream, backings, round_, clients, args.seconds))
                        runs.append(run)
                        log_run(run)
            exactness = [fleet.exactness() for fleet in fleets]
        finally:
            for fleet in fleets:
                fleet.stop()
            for backing in backings:
                backing.stop()
            upstream.stop()
    header = (
        f"{args.replicas} gateway replicas (1 worker each) under one shared key, {args.upstream} upstream; "
        f"commit {git_commit()}, {started}, load average {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end; {args.seconds:g} s per run, medians of {args.rounds} rounds"
    )
    rows = summarize(runs)
    print_summary(rows, exactness, header)
    if args.json:
        doc = {"header": header, "summary": rows, "exactness": exactness, "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if not all(e["exact"] for e in exactness):
        raise SystemExit("the key's usage is not exact: see above")


if __name__ == "__main__":
    main()
