"""The processes bench/request_path.py compares, each started pinned to its cores, and what their CPU is.

- the upstream: testkit/fake_upstream.py (uvicorn, Python) or nginx with canned bodies (bench/nginx_upstream.py);
- `direct`: that upstream alone, for reference;
- `floor`: bench/floor_proxy.py, the thinnest uvicorn + Starlette + aiohttp pass-through;
- `gateway`: `python -m gateway.cli.main serve` with auth off;
- `gateway+quota`: the same with keys and quotas on a private redis-server, whose CPU is counted with it;
- `litellm`: LiteLLM's proxy (bench/setup-litellm.sh), master key only: its virtual keys need a database
  through Prisma, whose engines are downloaded from Prisma's own servers at first use (not a package
  registry), which this machine cannot reach;
- `sglang`: SGLang's router (Rust, bench/setup-sglang.sh), round robin over the one upstream, no auth and
  no accounting: the compiled bare relay.

Every process is started under `taskset -c CPUS`; the children a server starts inherit the mask.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repo root, for bench/ and testkit/ (run as `python bench/x.py`)
from bench.gateway_overhead import tree_cpu
from bench.nginx_upstream import available as nginx_missing
from bench.nginx_upstream import nginx_upstream
from gateway.access import lease_scripts, quota_scripts
from gateway.resp.client import Script
from testkit.procs import Proc, fake_upstream, free_port, tree_rss, write_config

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fake"
ADMIN_KEY = "bench-admin"
LITELLM_MASTER_KEY = "sk-bench-master"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
SGLANG = ROOT / ".venv-sglang" / "bin" / "python"
# What the quota scripts run inside Redis (commandstats counts those too). ZADD and PEXPIRE are also
# sent on their own by the lease refresh, every lease_ttl / 3: none during a bench run.
IN_SCRIPTS = frozenset(
    name.lower()
    for module in (quota_scripts, lease_scripts)
    for value in vars(module).values()
    if isinstance(value, Script)
    for name in re.findall(r"redis\.call\('(\w+)'", value.source)
)
SCHEDSTAT = Path("/proc/self/schedstat").exists()
# A key that is checked and counted on every request but never refused.
UNLIMITED_KEY = {"name": "bench", "rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "daily_tokens": 10**15}


def pinned(args: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *args] if cpus is not None else args


def _on_cpu_ns(pid: int) -> int:
    """Nanoseconds the process's live threads have run (/proc/PID/task/*/schedstat), user and kernel."""
    total = 0
    with suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with suppress(OSError, ValueError):
                total += int(Path(task.path, "schedstat").read_text().split()[0])
    return total


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU time of these processes and their children. From the scheduler's nanosecond counters where the
    kernel has them: the user+system times psutil reads tick in 10 ms, too coarse for a run of a second."""
    if not SCHEDSTAT:
        return sum(sum(tree_cpu(p)) for p in processes)
    total = 0
    for p in processes:
        pids = [p.pid]
        with suppress(psutil.Error):
            pids += [c.pid for c in p.children(recursive=True)]
        total += sum(_on_cpu_ns(pid) for pid in pids)
    return total / 1e9


@dataclass
class Upstream:
    kind: str  # fake | nginx
    proc: Proc
    json_url: str  # answers whole chat completions
    sse_url: str  # answers paced event streams

    @property
    def process(self) -> psutil.Process:
        assert self.proc.proc is not None
        return psutil.Process(self.proc.proc.pid)

    def stop(self) -> None:
        self.proc.stop()


def start_upstream(kind: str, tmp: Path, *, chunks: int, pace_ms: float, cpus: str | None) -> Upstream:
    """The fake upstream (one port: its answer follows the request's "stream") or nginx (a port for each)."""
    if kind == "nginx":
        why = nginx_missing()
        if why:
            raise SystemExit(f"--upstream nginx: {why}")
        proc, sse_port = nginx_upstream(tmp, model=MODEL, chunks=chunks, pace_ms=pace_ms, cpus=cpus)
        proc.start().wait_healthy("/health")
        return Upstream(kind, proc, proc.url, f"http://127.0.0.1:{sse_port}")
    extra = ("--chunks", str(chunks), "--pace-ms", str(pace_ms), "--model", MODEL)
    proc = fake_upstream(tmp, *extra, name=f"fake-{pace_ms:g}ms")
    proc.args = pinned(proc.args, cpus)
    proc.start().wait_healthy("/health")
    return Upstream(kind, proc, proc.url, proc.url)


class RedisServer:
    """A private redis-server on a free port, no persistence."""

    def __init__(self, tmp: Path, cpus: str | None) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise SystemExit("redis-server is needed (scripts/setup.sh installs it)")
        self.port = free_port()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(tmp)]
        self.proc = subprocess.Popen(pinned(args, cpus), stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@dataclass
class Server:
    """One compared server: its process, where it says it is ready, the headers clients send it, and the
    other processes whose CPU is its cost (a gateway's Redis)."""

    name: str
    proc: Proc
    ready: str
    headers: dict[str, str] = field(default_factory=dict)
    redis: RedisServer | None = None
    owns_proc: bool = True  # False for `direct`: the upstream is the section's

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def process(self) -> psutil.Process:
        assert self.proc.proc is not None
        return psutil.Process(self.proc.proc.pid)

    def accounted(self) -> list[psutil.Process]:
        """The processes whose CPU this server's requests cost."""
        return [self.process] + ([self.redis.process] if self.redis else [])

    def cpu(self) -> float:
        return cpu_seconds(self.accounted())

    def redis_cpu(self) -> float:
        return cpu_seconds([self.redis.process]) if self.redis else 0.0

    def redis_commands(self) -> int:
        """Commands clients sent this server's Redis so far (0 without one): INFO commandstats counts
        a script's own commands too, which are no round trips; this bench's INFO is left out."""
        if not self.redis:
            return 0
        with redis.Redis(port=self.redis.port) as client:
            stats = client.info("commandstats")
        sent = 0
        for name, figures in stats.items():
            command = name.removeprefix("cmdstat_")
            if command not in IN_SCRIPTS and command != "info":
                sent += int(figures["calls"])
        return sent

    def rss(self) -> int:
        """The server's own resident memory (its children included, its Redis not)."""
        return tree_rss(self.process)

    def start(self, timeout: float = 90) -> Server:
        if self.owns_proc:
            self.proc.start().wait_healthy(self.ready, timeout=timeout)
        return self

    def stop(self) -> None:
        if self.owns_proc:
            self.proc.stop()
        if self.redis:
            self.redis.stop()


def direct(upstream: Upstream, url: str) -> Server:
    proc = Proc("direct", upstream.proc.args, int(url.rsplit(":", 1)[1]), upstream.proc.log_path)
    proc.proc = upstream.proc.proc
    return Server("direct", proc, "/health", owns_proc=False)


def floor(tmp: Path, upstream_url: str, cpus: str | None) -> Server:
    port = free_port()
    args = [sys.executable, str(ROOT / "bench" / "floor_proxy.py"), "--port", str(port), "--upstream", upstream_url]
    return Server("floor", Proc("floor", pinned(args, cpus), port, tmp / f"floor-{port}.log"), "/health")


def gateway(
    tmp: Path,
    upstream_url: str,
    cpus: str | None,
    *,
    quota: RedisServer | None = None,
    workers: int = 1,
    name: str | None = None,
    tree: Path | None = None,
    extra: dict[str, object] | None = None,
    failover: str | None = None,
) -> Server:
    """`llm-gateway serve` with auth off, or with keys and quotas on `quota`'s Redis (create_key() after
    start). `tree`: run the gateway of another checkout (a worktree at an earlier commit) instead of
    this one, to measure before and after in one run. `extra`: more config sections (logging,
    tracing). `failover`: the model's (resume or error; unset: the default, resume)."""
    name = name or ("gateway+quota" if quota else "gateway")
    config: dict[str, object] = {
        "engines": [{"name": "fake", "kind": "openai", "url": upstream_url}],
        "models": [{"name": MODEL, "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": quota is not None},
    }
    if failover is not None:
        config["models"] = [{"name": MODEL, "routes": [{"engine": "fake"}], "failover": failover}]
    if quota:
        config["redis"] = {"url": quota.url}
    config.update(extra or {})
    port = free_port()
    slug = name.replace("+", "-")
    path = write_config(tmp, f"{slug}-{port}", config)
    args = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(path), "--port", str(port)]
    if tree is not None:  # the package layout changed over time: find that tree's command line
        module = "gateway.cli.main" if (tree / "gateway" / "cli" / "main.py").exists() else "gateway.cli"
        code = (
            f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); runpy.run_module({module!r}, run_name='__main__')"
        )
        args = [sys.executable, "-c", code, "serve", "--config", str(path), "--port", str(port)]
    args += ["--workers", str(workers), "--log-level", "warning"]
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY} if quota else {}
    proc = Proc(name, pinned(args, cpus), port, tmp / f"{slug}-{port}.log", env=env)
    return Server(name, proc, "/ready", redis=quota)


def create_key(server: Server) -> None:
    """An API key with every limit set (rpm, tpm, concurrency, daily tokens), too high ever to refuse."""
    r = httpx.post(
        server.url + "/admin/keys", json=UNLIMITED_KEY, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    r.raise_for_status()
    server.headers = {"authorization": f"Bearer {r.json()['key']}"}


def litellm_missing() -> str | None:
    return None if LITELLM.exists() else f"{LITELLM} is missing: run bench/setup-litellm.sh"


def litellm(tmp: Path, upstream_url: str, cpus: str | None) -> Server:
    """LiteLLM's proxy, one worker, the upstream as an OpenAI-compatible model, its master key as the key."""
    import yaml

    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": upstream_url + "/v1", "api_key": "unused"},
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    path = tmp / f"litellm-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    # uvicorn's access log off, as the gateway's is: one log line per request is not what is compared.
    log_config = tmp / "litellm-logging.json"
    log_config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "loggers": {"uvicorn.access": {"level": "WARNING"}, "uvicorn.error": {"level": "WARNING"}},
            }
        )
    )
    args = [str(LITELLM), "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    args += ["--log_config", str(log_config)]
    # The model cost map ships with the package; without this LiteLLM fetches a fresh one at start.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    proc = Proc("litellm", pinned(args, cpus), port, tmp / f"litellm-{port}.log", env=env)
    return Server("litellm", proc, "/health/liveliness", headers={"authorization": f"Bearer {LITELLM_MASTER_KEY}"})


def sglang_missing() -> str | None:
    return None if SGLANG.exists() else f"{SGLANG} is missing: run bench/setup-sglang.sh"


def sglang(tmp: Path, upstream_url: str, cpus: str | None) -> Server:
    """SGLang's router in front of the upstream (its /health answers the router's probes), round robin."""
    port = free_port()
    args = [str(SGLANG), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--worker-urls", upstream_url, "--policy", "round_robin", "--log-level", "error"]
    proc = Proc("sglang", pinned(args, cpus), port, tmp / f"sglang-{port}.log")
    return Server("sglang", proc, "/liveness")
