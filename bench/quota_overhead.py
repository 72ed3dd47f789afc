"""What keys and quotas cost: the same gateway with auth + quotas on (a real local Redis) and off,
side by side in one run, against the fast fake engine so the gateway's own cost shows; a third
gateway with quotas on but leased budgets off (`leases: {enabled: false}`: two Redis calls per
request), so leases' effect shows in the same run; and, on the same gateway, a key of a team with
money budgets at every level (two levels checked and reserved in the one admission script), and of
a team of an organization (three), against a key alone.

Prints requests/s and the gateway's CPU time per request for each, their difference, and the Redis
commands each request cost (from Redis's own INFO counters).

    .venv/bin/python bench/quota_overhead.py [--rounds 3] [--requests 2000] [--levels 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import psutil
import redis

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from testkit.procs import Proc, fake_upstream, free_port, gateway
from testkit.redis_server import RedisServer

ADMIN = "bench-admin"


async def load(url: str, requests: int, concurrency: int, key: str | None) -> float:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem, session.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                assert r.status == 200, r.status

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (time.perf_counter() - start)


def cpu_seconds(proc: Proc) -> float:
    assert proc.proc is not None
    p = psutil.Process(proc.proc.pid)
    times = [p.cpu_times(), *(c.cpu_times() for c in p.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"] + cpu["used_cpu_sys"])


CLIENT_COMMANDS = ("evalsha", "eval", "get", "hgetall", "ping", "publish")  # what our clients send


def redis_commands(client: redis.Redis) -> int:
    """Commands clients sent (the ones scripts run inside Redis are not round trips)."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in CLIENT_COMMANDS)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--levels", default="1,16,64")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (scripts/setup.sh installs it)"

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(binary, free_port(), tmp).start()
        up = fake_upstream(tmp, "--model", "fake", name="fake-q").start().wait_healthy()
        engines = [{"name": "fake", "kind": "openai", "url": up.url}]
        models = [{"name": "fake", "routes": [{"engine": "fake"}]}]
        url = redis_server.url
        pricing = {"models": {"fake": {"input": 0.5, "output": 1.5}}}
        on = gateway(
            tmp,
            {
                "engines": engines,
                "models": models,
                "redis": {"url": url, "timeout": 5},  # a loaded machine stalls Redis at times: no 503s
                "auth": {"enabled": True},
                "pricing": pricing,
            },
            name="gw-quota-on",
            env={"GATEWAY_ADMIN_KEY": ADMIN},
        )
        off = gateway(tmp, {"engines": engines, "models": models, "auth": {"enabled": False}}, name="gw-quota-off")
        plain = gateway(
            tmp,
            {
                "engines": engines,
                "models": models,
                "redis": {"url": url},
                "auth": {"enabled": True},
                "pricing": pricing,
                "leases": {"enabled": False},
            },
            name="gw-quota-plain",
            env={"GATEWAY_ADMIN_KEY": ADMIN},
        )
        results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
        try:
            for g in (on, off, plain):
                g.start().wait_healthy("/ready", timeout=60)
            r = httpx.post(
                on.url + "/admin/keys",
                json={"name": "bench", "rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "daily_tokens": 10**15},
                headers={"authorization": f"Bearer {ADMIN}"},
            )
            key = r.json()["key"]
            big = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "daily_tokens": 10**15}
            money = {"daily_budget": 10**8, "monthly_budget": 10**8}
            admin = {"authorization": f"Bearer {ADMIN}"}
            org = httpx.post(on.url + "/admin/orgs", json={"name": "bench", **big, **money}, headers=admin).json()
            body = {"name": "bench", "org": org["id"], **big, **money}
            team = httpx.post(on.url + "/admin/teams", json=body, headers=admin).json()
            body = {"name": "bench-team", "team": team["id"], **big, **money}
            team_key = httpx.post(on.url + "/admin/keys", json=body, headers=admin).json()["key"]
            body = {"name": "bench-alone", **big, **money}  # a team without an organization
            lone_team = httpx.post(on.url + "/admin/teams", json=body, headers=admin).json()
            body = {"name": "bench-lone-team", "team": lone_team["id"], **big, **money}
            lone_team_key = httpx.post(on.url + "/admin/keys", json=body, headers=admin).json()["key"]
            client = redis_server.client()
            for g, k in ((on, key), (on, team_key), (on, lone_team_key), (off, None), (plain, key)):
                asyncio.run(load(g.url, 300, 8, k))  # warm-up: caches, connection pools
            for r in range(args.rounds):
                for n in levels:
                    variants = [
                        ("quotas on", on, key),
                        ("key + team", on, lone_team_key),
                        ("team levels", on, team_key),
                        ("quotas off", off, None),
                        ("no leases", plain, key),
                    ]
                    # the variant run first after the other gateway ran pays for cold caches: each in turn
                    for name, g, k in variants[r % len(variants) :] + variants[: r % len(variants)]:
                        cpu0, cmd0, rcpu0 = cpu_seconds(g), redis_commands(client), redis_cpu(client)
                        rate = asyncio.run(load(g.url, args.requests, n, k))
                        cpu = (cpu_seconds(g) - cpu0) / args.requests * 1000
                        cmds = (redis_commands(client) - cmd0) / args.requests
                        rcpu = (redis_cpu(client) - rcpu0) / args.requests * 1000
                        results.setdefault((name, n), []).append((rate, cpu, cmds, rcpu))
        finally:
            for g in (on, off, plain):
                g.stop()
            up.stop()
            redis_server.stop()

    print(
        f"keys + quotas on (local Redis) vs off; fake engine; {args.requests} requests per run, "
        f"median of {args.rounds} rounds"
    )
    print(
        f"{'clients':>7} {'on req/s':>9} {'off req/s':>10} {'on CPU ms':>10} {'off CPU ms':>11} "
        f"{'quota CPU ms':>13} {'on/off, Redis counted':>22} {'Redis round trips/req':>22}"
    )
    for n in levels:
        on_r = [statistics.median(v[i] for v in results[("quotas on", n)]) for i in range(3)]
        off_r = [statistics.median(v[i] for v in results[("quotas off", n)]) for i in range(3)]
        # each round's own ratio (the pair shares that round's noise), then the median
        pairs = zip(results[("quotas on", n)], results[("quotas off", n)], strict=True)
        ratio = statistics.median((on[1] + on[3]) / off[1] for on, off in pairs)
        print(
            f"{n:>7} {on_r[0]:>9.0f} {off_r[0]:>10.0f} {on_r[1]:>10.3f} {off_r[1]:>11.3f} "
            f"{on_r[1] - off_r[1]:>13.3f} {ratio:>21.2f}x {on_r[2]:>22.2f}"
        )
    print("target (leases on): keys and quotas <= 1.3x off at 1 client, <= 1.15x at 16 and 64; Redis commands <= 0.3")
    print()
    print("leased budgets on vs off (quotas on both; CPU: the gateway's processes plus redis-server's)")
    print(
        f"{'clients':>7} {'leases CPU ms':>14} {'no leases CPU ms':>17} {'leases cmds/req':>16} {'no leases cmds/req':>19}"
    )
    for n in levels:
        leased = [statistics.median(v[1] + v[3] for v in results[("quotas on", n)])]
        unleased = [statistics.median(v[1] + v[3] for v in results[("no leases", n)])]
        cmds = [statistics.median(v[2] for v in results[(name, n)]) for name in ("quotas on", "no leases")]
        print(f"{n:>7} {leased[0]:>14.3f} {unleased[0]:>17.3f} {cmds[0]:>16.2f} {cmds[1]:>19.2f}")
    print()
    print("a key of a team (of an organization) with money budgets at every level vs a key alone (same gateway,")
    print("same run); CPU ms per request: the gateway's processes plus redis-server's")
    print(f"{'clients':>7} {'levels':>22} {'CPU ms':>8} {'vs key alone ms':>16} {'round trips/req':>16}")
    for n in levels:
        alone = statistics.median(v[1] + v[3] for v in results[("quotas on", n)])
        for name, label in (
            ("quotas on", "key alone"),
            ("key + team", "key + team"),
            ("team levels", "key + team + org"),
        ):
            cpu = statistics.median(v[1] + v[3] for v in results[(name, n)])
            trips = statistics.median(v[2] for v in results[(name, n)])
            extra = f"{cpu - alone:>+16.3f}" if name != "quotas on" else f"{'':>16}"
            print(f"{n:>7} {label:>22} {cpu:>8.3f} {extra} {trips:>16.2f}")
    print("target: at most 0.03 ms more CPU per request, Redis included")


if __name__ == "__main__":
    main()
