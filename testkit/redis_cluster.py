"""A private Redis Cluster for tests: 6 `redis-server --cluster-enabled yes` nodes (3 masters, 3
replicas) on free local ports, made by `redis-cli --cluster create`; one per session, flushed per
test. Helpers kill a master the way a crash does (SIGKILL) and wait until its replica has taken
over, and restart a node (it rejoins as a replica of whoever owns its slots now).

Registered as a plugin in tests/conftest.py: `pytest_plugins = [..., "testkit.redis_cluster"]`.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis
from redis.crc import key_slot

from testkit.ci import require
from testkit.poll import eventually
from testkit.procs import bindable, port_block
from testkit.redis_server import RedisServer

NODE_TIMEOUT_MS = 1500  # how long a silent master is given before its replica takes over
BUS_OFFSET = 10_000  # the cluster bus listens on port + 10000


_cluster_ports = port_block(10_000, 125)  # 8 blocks: 10000-10999, their buses 20000-20999


def free_cluster_ports(count: int) -> list[int]:
    """Ports p whose cluster-bus port p + 10000 is free too, from this worker's block (below the
    ephemeral range and free_port's blocks, which start at 21000)."""
    ports: list[int] = []
    for port in itertools.islice(_cluster_ports, 125):
        if port not in ports and bindable(port) and bindable(port + BUS_OFFSET):
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"fewer than {count} free ports (and bus ports) in this worker's block")


@dataclass
class ClusterNode(RedisServer):
    """A cluster node: restarted after kill(), nodes.conf in its dir keeps its identity."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def server_args(self) -> list[str]:
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no"]
        # A replica always stands for election, however long it was cut off, and syncs at once.
        return [*args, "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0"]

    def info(self, section: str) -> dict[str, str]:
        with self.client() as client:
            text = client.execute_command("CLUSTER", "INFO") if section == "cluster" else client.info(section)
        if isinstance(text, dict):
            return {k: str(v) for k, v in text.items()}
        text = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def role(self) -> str:
        with self.client() as client:
            role = client.execute_command("ROLE")[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    def node_id(self) -> str:
        with self.client() as client:
            node_id = client.execute_command("CLUSTER", "MYID")
        return node_id.decode() if isinstance(node_id, bytes) else str(node_id)


@dataclass
class RedisCluster:
    nodes: list[ClusterNode]
    cli: str
    ids: dict[int, str] = field(default_factory=dict)  # port -> node id

    @property
    def seeds(self) -> list[str]:
        return [n.address for n in self.nodes]

    @property
    def url(self) -> str:
        """All nodes as seeds: any live one is enough for a client to learn the slot map."""
        return "redis+cluster://" + ",".join(self.seeds)

    def create(self, timeout: float = 60.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        args = [self.cli, "--cluster", "create", *self.seeds, "--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout.decode()} {done.stderr.decode()}")
        self.ids = {n.port: n.node_id() for n in self.nodes}
        return self.wait_ok(timeout)

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.running]

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def wait_ok(self, timeout: float = 30.0) -> RedisCluster:
        """Until every live node says cluster_state:ok, sees every slot served, and agrees on the
        master of every slot."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if self._agreed():
                    return self
            except redis.exceptions.RedisError as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok after {timeout}s {last}: {[(n.port, n.running) for n in self.nodes]}")

    def _agreed(self) -> bool:
        views = set()
        for node in self.live():
            info = node.info("cluster")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            replication = node.info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False  # a replica still syncing could not take over yet
            views.add(tuple(sorted(self._slot_owners(node).items())))
        return len(views) == 1

    def _slot_owners(self, node: ClusterNode) -> dict[int, int]:
        """Each slot range's first slot -> the port of its master, as `node` sees it."""
        with node.client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        if isinstance(ranges, dict):  # redis-py parses CLUSTER SLOTS into {(start, end): {...}}
            return {start: int(v["primary"][1]) for (start, _), v in ranges.items()}
        return {int(r[0]): int(r[2][1]) for r in ranges}

    def masters(self) -> list[ClusterNode]:
        return [n for n in self.live() if n.role() == "master"]

    def master_of(self, key: str) -> ClusterNode:
        slot = key_slot(key.encode())
        owners = self._slot_owners(self.live()[0])
        start = max(s for s in owners if s <= slot)
        return self.node(owners[start])

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        master_id = self.ids[master.port]
        for node in self.live():
            with node.client() as client:
                role = client.execute_command("ROLE")
            if role[0] in (b"slave", "slave") and int(role[2]) == master.port:
                return node
        raise LookupError(f"master {master.port} ({master_id}) has no live replica")

    def wait_replicated(self, master: ClusterNode, timeout: float = 10.0) -> None:
        """Until the master's replica has received every write the master has (its replication
        offset caught up), so a failover now loses nothing."""
        replica = self.replica_of(master)
        offset = int(master.info("replication")["master_repl_offset"])
        eventually(
            lambda: int(replica.info("replication")["slave_repl_offset"]),
            lambda seen: seen >= offset,
            timeout=timeout,
            what=f"replica {replica.port} at offset {offset}",
        )

    def kill_master(self, master: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """SIGKILL a master and wait until its replica is promoted and the cluster is ok again.
        Returns the promoted replica."""
        replica = self.replica_of(master)
        master.kill()
        deadline = time.monotonic() + timeout
        while replica.role() != "master":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.port} of {master.port} not promoted within {timeout}s")
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        return replica

    def restart(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start a killed node again; it rejoins (a killed master comes back as a replica)."""
        node.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = node.info("cluster")
                if info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(self.nodes):
                    break
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.port} did not rejoin within {timeout}s")
            time.sleep(0.05)
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def heal(self) -> None:
        """Every node running, no slot left half-migrated, the cluster ok."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)  # a test may have stopped one
        for node in self.nodes:
            if not node.running:
                self.restart(node)
        for node in self.live():
            with node.client() as client:
                for line in client.execute_command("CLUSTER", "NODES").decode().splitlines():
                    fields = line.split()
                    if "myself" not in fields[2]:
                        continue
                    for part in fields[8:]:
                        if part.startswith("[") and "-" in part:  # [slot->-id] or [slot-<-id]
                            client.execute_command("CLUSTER", "SETSLOT", int(part[1:].split("-")[0]), "STABLE")
        self.wait_ok()

    def flush(self) -> None:
        """Empty every master, and zero every node's counters (tests count MOVED/ASK replies)."""
        for node in self.masters():
            with node.client() as client:
                client.flushall()
        for node in self.live():
            with node.client() as client:
                client.config_resetstat()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    require(server is not None and cli is not None, "redis-server and redis-cli are not on PATH")
    assert server is not None and cli is not None
    base = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    for port in free_cluster_ports(6):
        (base / str(port)).mkdir()
        nodes.append(ClusterNode(server, port, base / str(port)))
    cluster = RedisCluster(nodes, cli)
    try:
        yield cluster.create()
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisCluster) -> RedisCluster:
    """The session cluster, whole (a test may have killed a node) and empty."""
    redis_cluster_session.heal()
    redis_cluster_session.flush()
    return redis_cluster_session
