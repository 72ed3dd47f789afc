"""Start and stop the project's real processes for tests and benches: engine workers, gateways, the fake engine."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = Path(os.environ.get("TINY_MODEL_DIR", ROOT / "engines" / "tiny_model" / "tiny-llama"))


# Ports for the processes tests start come from below the kernel's ephemeral range (32768-60999
# on Linux), so no outgoing connection takes one between its choice and the process binding it,
# and from a block of their own for each pytest-xdist worker (up to 8), so parallel workers never
# choose the same one. Within a block the choice starts at random (two separate runs rarely meet)
# and goes round, skipping ports something else holds.
WORKER_BLOCKS = 8


def worker_index() -> int:
    """This pytest-xdist worker's number (gw3: 3), 0 outside xdist (a serial run, a bench)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) % WORKER_BLOCKS if name[2:].isdigit() else 0


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_block(first: int, size: int) -> Iterator[int]:
    """Endless: the ports of this worker's block of `size` from `first`, from a random start."""
    block = range(first + worker_index() * size, first + (worker_index() + 1) * size)
    start = random.Random().randrange(size)
    while True:
        for i in range(size):
            yield block[(start + i) % size]


_ports = port_block(21_000, 1_375)  # 8 blocks: 21000-31999


def free_port() -> int:
    for _ in range(1_375):
        port = next(_ports)
        if bindable(port):
            return port
    raise RuntimeError("no free port in this worker's block")


@dataclass
class Proc:
    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proc:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def wait_healthy(self, path: str = "/health", timeout: float = 180.0) -> Proc:
        """Polls `path` until 200; the default wait allows for several engines loading torch at once
        on 2 cores (a parallel run starts one per worker)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def worker(tmp: Path, *extra: str, name: str = "worker", port: int | None = None, threads: int = 1) -> Proc:
    port = port or free_port()
    args = [sys.executable, "-m", "engines.worker", "--port", str(port), "--threads", str(threads), *extra]
    return Proc(name, args, port, tmp / f"{name}-{port}.log")


@contextmanager
def running(proc: Proc, path: str = "/health", timeout: float = 180.0) -> Iterator[Proc]:
    """Started and healthy for the block; stopped after it, whatever happens."""
    proc.start()
    try:
        yield proc.wait_healthy(path, timeout)
    finally:
        proc.stop()


@contextmanager
def all_healthy(procs: dict[str, Proc]) -> Iterator[dict[str, Proc]]:
    """Start them all (so they load side by side), wait until each is healthy; stop them all after."""
    for p in procs.values():
        p.start()
    try:
        for p in procs.values():
            p.wait_healthy()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def write_config(tmp: Path, name: str, config: dict[str, object]) -> Path:
    import yaml

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def gateway(
    tmp: Path, config: dict[str, object], *, name: str = "gateway", env: dict[str, str] | None = None, workers: int = 1
) -> Proc:
    port = free_port()
    if "store" not in config:  # a store of its own: gateways of one test session never share a log
        config = {**config, "store": {"url": f"sqlite:///{tmp / f'{name}-{port}.db'}"}}
    path = write_config(tmp, f"{name}-{port}", config)
    args = [
        sys.executable,
        "-m",
        "gateway.cli.main",
        "serve",
        "--config",
        str(path),
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "info",
    ]
    return Proc(name, args, port, tmp / f"{name}-{port}.log", env=env or {})


def fake_upstream(tmp: Path, *extra: str, name: str = "fake", port: int | None = None) -> Proc:
    port = port or free_port()
    args = [sys.executable, str(ROOT / "testkit" / "fake_upstream.py"), "--port", str(port), *extra]
    return Proc(name, args, port, tmp / f"{name}-{port}.log")


def cpu_engine(name: str, port: int, *args: str) -> dict[str, object]:
    """A managed CPU engine entry for a gateway config."""
    return {"name": name, "kind": "cpu", "model": str(TINY_MODEL), "port": port, "args": ["--threads", "1", *args]}


def child_pid_listening_on(parent_pid: int, port: int) -> int:
    """The pid of the parent's child process started with `--port PORT` (a managed engine)."""
    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--port" in cmd and cmd[cmd.index("--port") + 1] == str(port):
            return child.pid
    raise LookupError(f"no child of {parent_pid} serves port {port}")


def tree_rss(p: psutil.Process) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    total = p.memory_info().rss
    for child in p.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total
