"""What the two per-request quota scripts cost, on one Redis and on a Redis Cluster, side by side
in one run: the gateway-side CPU per EVALSHA of the lean client (gateway/resp/client.py on one node,
gateway/resp/cluster.py on the cluster; `--before FILE` adds an older resp.py for comparison),
and the Redis-side CPU per script (INFO cpu and commandstats of the node that ran it), hence the
script calls per second one Redis shard can take.

The scripts are the real ones (gateway/access/quota.py), called with the keys and arguments Quota uses:
phase 1 admits every request (the full path: every limit set, nothing refused), phase 2 releases
them all.

    .venv/bin/python bench/redis_scripts.py [--rounds 3] [--requests 20000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from gateway.access.quota import _ADMIT, _RELEASE, admit_args, window
from gateway.resp.client import RespClient, Script
from gateway.resp.cluster import ClusterClient
from testkit.procs import free_port
from testkit.redis_cluster import ClusterNode, RedisCluster, free_cluster_ports

KEYS = 64  # API keys, spread over the slots (and so over the cluster's masters)
RECORD = {"id": "", "name": "bench", "models": "", "rpm": "1000000000", "tpm": "1000000000000"}
RECORD |= {"max_concurrent": "1000000", "daily_tokens": "1000000000000000", "monthly_tokens": "1000000000000000"}
RECORD |= {"expires_at": "", "revoked_at": "", "created_at": "1", "metadata": "", "hash": "x", "prefix": "sk-gw-x"}


def key_ids() -> list[str]:
    return [f"key_{i:016x}" for i in range(KEYS)]


def admit_call(key_id: str, lease: str, now: float) -> tuple[list[str], list[Any]]:
    base, win = f"gw:{{{key_id}}}:", window(now)
    # the tombstone, then the key's one level: limits, minute, day, month, leases (gateway/access/quota.py)
    keys = [f"{base}gone:{lease}", base + "rec", f"{base}min:{win.minute}", base + "day:" + win.day]
    keys += [base + "month:" + win.month, base + "leases"]
    return keys, admit_args(round(now * 1000), "bench", 40, lease, 300_000)


def release_call(key_id: str, lease: str, now: float) -> tuple[list[str], list[Any]]:
    base, win = f"gw:{{{key_id}}}:", window(now)
    keys = [base + "leases", f"{base}min:{win.minute}", base + "day:" + win.day, base + "month:" + win.month]
    return keys, [lease, -10, 20, 10, 0]


async def phase(client: Any, script: Any, call: Callable[..., Any], requests: int, concurrency: int) -> float:
    """CPU microseconds of this process per script call, `concurrency` callers at once."""
    ids, now = key_ids(), time.time()
    todo = iter(range(requests))

    async def caller() -> None:
        for i in todo:
            keys, args = call(ids[i % KEYS], f"lease{i}", now)
            await client.run_script(script, keys, args)

    cpu = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return (time.process_time() - cpu) / requests * 1e6


def server_cpu(ports: list[int]) -> tuple[float, float, int]:
    """CPU seconds the nodes have used in all, the seconds spent running scripts (Redis's own
    command timing), and the script calls they have run."""
    seconds, in_scripts, calls = 0.0, 0.0, 0
    for port in ports:
        with redis.Redis(port=port) as r:
            cpu = r.info("cpu")
            seconds += cpu["used_cpu_user"] + cpu["used_cpu_sys"]
            stats = r.info("commandstats")
            for command in ("evalsha", "eval"):
                calls += int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
                in_scripts += int(stats.get(f"cmdstat_{command}", {}).get("usec", 0)) / 1e6
    return seconds, in_scripts, calls


async def measure(
    make: Callable[[], Any], script_type: Any, ports: list[int], requests: int, concurrency: int
) -> dict[str, float]:
    client = make()
    admit, release = script_type(_ADMIT), script_type(_RELEASE)
    try:
        await phase(client, admit, admit_call, 200, 4)  # warm-up: connections, the map, SCRIPT LOAD
        await phase(client, release, release_call, 200, 4)
        out: dict[str, float] = {}
        for name, script, call in (("admit", admit, admit_call), ("release", release, release_call)):
            cpu0, script0, calls0 = server_cpu(ports)
            started = time.perf_counter()
            out[f"{name} client us"] = await phase(client, script, call, requests, concurrency)
            out[f"{name} calls/s"] = requests / (time.perf_counter() - started)
            cpu1, script1, calls1 = server_cpu(ports)
            out[f"{name} redis us"] = (cpu1 - cpu0) / max(1, calls1 - calls0) * 1e6
            out[f"{name} script us"] = (script1 - script0) / max(1, calls1 - calls0) * 1e6
        return out
    finally:
        await client.close()


def load_resp(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("resp_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--before", type=Path, help="an older gateway/resp/client.py to compare the single-node path with")
    args = p.parse_args()
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert binary and cli, "redis-server and redis-cli are needed (scripts/setup.sh installs them)"

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        single = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp_name],
            stdout=subprocess.DEVNULL,
        )
        nodes = []
        for node_port in free_cluster_ports(6):
            (tmp / str(node_port)).mkdir()
            nodes.append(ClusterNode(binary, node_port, tmp / str(node_port)))
        cluster = RedisCluster(nodes, cli)
        results: dict[str, list[dict[str, float]]] = {}
        try:
            cluster.create()
            time.sleep(0.5)
            with redis.Redis(port=port) as r:
                r.ping()
            masters = [n.port for n in cluster.masters()]
            for key_id in key_ids():
                name = f"gw:{{{key_id}}}:rec"
                with redis.Redis(port=port) as r:
                    r.hset(name, mapping={**RECORD, "id": key_id})
                with redis.Redis(port=cluster.master_of(name).port) as r:
                    r.hset(name, mapping={**RECORD, "id": key_id})
            url = f"redis://127.0.0.1:{port}/0"
            variants: list[tuple[str, Callable[[], Any], Any, list[int]]] = [
                ("one node, resp.py", lambda: RespClient(url, 1.0), Script, [port]),
                ("cluster, resp_cluster.py", lambda: ClusterClient.from_url(cluster.url, 1.0), Script, masters),
            ]
            if args.before:
                old = load_resp(args.before)
                variants.insert(0, ("one node, --before", lambda: old.RespClient(url, 1.0), old.Script, [port]))
            for _ in range(args.rounds):
                for name, make, script_type, ports in variants:
                    figures = asyncio.run(measure(make, script_type, ports, args.requests, args.concurrency))
                    results.setdefault(name, []).append(figures)
        finally:
            cluster.stop()
            single.terminate()
            single.wait(10)

    print(f"quota scripts, {args.requests} calls per phase, {args.concurrency} callers, median of {args.rounds} rounds")
    columns = ["admit client us", "release client us", "admit calls/s"]
    columns += ["admit redis us", "release redis us", "admit script us", "release script us"]
    print(f"{'':<26}" + "".join(f"{c:>18}" for c in columns))
    for name, runs in results.items():
        print(f"{name:<26}" + "".join(f"{statistics.median(r[c] for r in runs):>18.1f}" for c in columns))
    print(
        "client us: CPU of this process per call; redis us: CPU of the Redis masters per call (INFO cpu: the\n"
        "script, the network and, on the cluster, the replication stream); script us: Redis's own timing of\n"
        "the script alone (INFO commandstats)"
    )


if __name__ == "__main__":
    main()
