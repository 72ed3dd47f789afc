"""N gateway replicas on one Redis, or on one Redis Cluster, under one shared API key: the set-up of
bench/replicas.py, and what it reads from them (CPU of every process, Redis's command counters, the
key's usage and leases at the end).

A fleet is N `llm-gateway serve --workers 1` processes (pinned with taskset) with keys and quotas on,
in front of one upstream, all pointed at the same Redis: a private `redis-server`, or a private
6-node Redis Cluster (3 masters, 3 replicas) made by the tests' cluster helper (testkit/redis_cluster.py).
The key has rpm, tpm, max_concurrent and a daily budget set far too high ever to refuse, so each
request runs the full admission and reconciliation. All of the key's Redis keys share one hash tag,
so on the cluster its traffic lands on one master (and that master's replica).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench import servers
from bench.servers import IN_SCRIPTS, MODEL, UNLIMITED_KEY, RedisServer, Server, pinned
from testkit.procs import Proc, free_port, write_config
from testkit.redis_cluster import ClusterNode, RedisCluster, free_cluster_ports

ADMIN_KEY = "bench-admin"
# Not from the gateways: this bench's INFO, and the replicas' acknowledgements to their master.
NOT_CLIENTS = frozenset({"info", "replconf"})


def pin_threads(pid: int, cpus: str | None) -> None:
    """Pin every thread of a running process (redis-server starts with its background threads)."""
    if cpus is None:
        return
    wanted = {int(c) for c in cpus.split(",")}
    for task in os.scandir(f"/proc/{pid}/task"):
        with suppress(OSError):
            os.sched_setaffinity(int(task.name), wanted)


@dataclass
class RedisNode:
    port: int
    process: psutil.Process
    role: str = "node"  # after the key exists: "key master", "key replica", "other master", "other replica"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def commands(self) -> tuple[int, int, int]:
        """(script calls, commands the scripts ran, other commands clients sent) so far, from INFO
        commandstats (which counts a script's own commands too)."""
        with self.client() as client:
            stats = client.info("commandstats")
        scripts = inside = others = 0
        for name, figures in stats.items():
            command = name.removeprefix("cmdstat_")
            calls = int(figures["calls"])
            if command in ("evalsha", "eval"):
                scripts += calls
            elif command in IN_SCRIPTS:
                inside += calls
            elif command not in NOT_CLIENTS:
                others += calls
        return scripts, inside, others


@dataclass
class Backing:
    """The Redis a fleet shares: one redis-server, or a Redis Cluster."""

    kind: str  # "cluster" | "one Redis"
    url: str
    nodes: list[RedisNode]
    cluster: RedisCluster | None = None
    single: RedisServer | None = None

    def node_holding(self, key: str) -> RedisNode:
        if self.cluster is None:
            return self.nodes[0]
        port = self.cluster.master_of(key).port
        return next(n for n in self.nodes if n.port == port)

    def name_roles(self, key: str) -> None:
        """Name each node by what it does for `key`: its master, that master's replica, the others."""
        if self.cluster is None:
            self.nodes[0].role = "key master"
            return
        master = self.node_holding(key)
        replica_port = self.cluster.replica_of(self.cluster.node(master.port)).port
        masters = {n.port for n in self.cluster.masters()}
        for node in self.nodes:
            if node is master:
                node.role = "key master"
            elif node.port == replica_port:
                node.role = "key replica"
            else:
                node.role = "other master" if node.port in masters else "other replica"

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.single is not None:
            self.single.stop()


def one_redis(tmp: Path, cpus: str | None) -> Backing:
    server = RedisServer(tmp, cpus)
    return Backing("one Redis", server.url, [RedisNode(server.port, server.process)], single=server)


def redis_cluster(tmp: Path, cpus: str | None) -> Backing:
    """6 nodes, 3 masters with a replica each, as the tests make it; every node pinned to `cpus`."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not binary or not cli:
        raise SystemExit("redis-server and redis-cli are needed (scripts/setup.sh installs them)")
    nodes = []
    for port in free_cluster_ports(6):
        (tmp / f"cluster-{port}").mkdir()
        nodes.append(ClusterNode(binary, port, tmp / f"cluster-{port}"))
    cluster = RedisCluster(nodes, cli)
    try:
        cluster.create()
    except BaseException:
        cluster.stop()
        raise
    found = []
    for node in nodes:
        assert node.proc is not None
        pin_threads(node.proc.pid, cpus)
        found.append(RedisNode(node.port, psutil.Process(node.proc.pid)))
    return Backing("cluster", cluster.url, found, cluster=cluster)


def gateway(tmp: Path, name: str, upstream_url: str, redis_url: str, cpus: str | None) -> Server:
    """`llm-gateway serve`, 1 worker, keys and quotas on `redis_url`, in front of the upstream."""
    config: dict[str, object] = {
        "engines": [{"name": "fake", "kind": "openai", "url": upstream_url}],
        "models": [{"name": MODEL, "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": True},
        "redis": {"url": redis_url},
    }
    port = free_port()
    path = write_config(tmp, f"{name}-{port}", config)
    args = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(path), "--port", str(port)]
    args += ["--workers", "1", "--log-level", "warning"]
    proc = Proc(name, pinned(args, cpus), port, tmp / f"{name}-{port}.log", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    return Server(name, proc, "/ready")


@dataclass
class Fleet:
    """N gateway replicas on one Backing under one API key, and the 200s sent through them."""

    name: str
    backing: Backing
    gateways: list[Server]
    key_id: str = ""
    ok: int = 0  # answers with status 200 the bench received, warm-ups included
    answered: int = 0  # every answer, whatever its status
    refused: dict[str, int] = field(default_factory=dict)

    def start(self) -> Fleet:
        for g in self.gateways:
            g.proc.start()
        for g in self.gateways:
            g.proc.wait_healthy(g.ready, timeout=120)
        r = httpx.post(
            self.gateways[0].url + "/admin/keys",
            json=UNLIMITED_KEY,
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=10,
        )
        r.raise_for_status()
        self.key_id = r.json()["id"]
        for g in self.gateways:
            g.headers = {"authorization": f"Bearer {r.json()['key']}"}
        self.backing.name_roles(self.record_key)
        return self

    @property
    def record_key(self) -> str:
        return f"gw:{{{self.key_id}}}:rec"

    def count(self, answered: int, failures: int, errors: dict[str, int]) -> None:
        self.answered += answered
        self.ok += answered - failures
        for why, n in errors.items():
            self.refused[why] = self.refused.get(why, 0) + n

    def gateway_cpu(self) -> list[float]:
        """CPU seconds so far of each gateway process (and its worker)."""
        return [servers.cpu_seconds([g.process]) for g in self.gateways]

    def redis_cpu(self) -> dict[str, float]:
        """CPU seconds so far of the Redis nodes, summed by role."""
        out: dict[str, float] = {}
        for node in self.backing.nodes:
            out[node.role] = out.get(node.role, 0.0) + servers.cpu_seconds([node.process])
        return out

    def commands(self) -> tuple[int, int, int]:
        """(script calls, commands the scripts ran, other commands) on the masters: a replica counts
        what its master's replication stream applies (MULTI, the script's writes, EXEC), which are
        no round trips."""
        totals = [0, 0, 0]
        for node in self.backing.nodes:
            if node.role.endswith("master"):
                totals = [t + n for t, n in zip(totals, node.commands(), strict=True)]
        return totals[0], totals[1], totals[2]

    def exactness(self, wait_s: float = 10.0) -> dict[str, Any]:
        """The key's usage against what the bench saw, once every release has landed: requests counted
        equal the 200s, every reservation reconciled, no lease left."""
        base = f"gw:{{{self.key_id}}}:"
        holder = self.backing.node_holding(self.record_key)
        deadline = time.monotonic() + wait_s
        while True:
            r = httpx.get(
                f"{self.gateways[-1].url}/admin/keys/{self.key_id}/usage",
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
                timeout=10,
            )
            r.raise_for_status()
            day = r.json()["day"]
            with holder.client() as client:
                leases = int(client.zcard(base + "leases"))
            reconciled = day["tokens"] == day["prompt_tokens"] + day["completion_tokens"]
            exact = day["requests"] == self.ok and reconciled and leases == 0
            if exact or time.monotonic() > deadline:
                return {
                    "fleet": self.name,
                    "answered": self.answered,
                    "status_200": self.ok,
                    "refused": self.refused,
                    "counted_requests": day["requests"],
                    "tokens": day["tokens"],
                    "prompt_plus_completion": day["prompt_tokens"] + day["completion_tokens"],
                    "leases_left": leases,
                    "exact": exact,
                }
            time.sleep(0.2)

    def stop(self) -> None:
        """The gateways; the backing is stopped by whoever made it."""
        for g in self.gateways:
            g.stop()
