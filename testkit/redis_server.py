"""A private redis-server for tests (never the shared one on 6379): one per session, flushed per test.

Registered as a plugin in tests/conftest.py: `pytest_plugins = ["testkit.redis_server"]`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest
import redis

from testkit.ci import require
from testkit.procs import free_port


@dataclass
class RedisServer:
    binary: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def server_args(self) -> list[str]:
        return ["--save", "", "--appendonly", "no"]

    def start(self, timeout: float = 10.0) -> Self:
        """Start (or restart after kill()) on the same port, and wait until PING answers."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen([*args, *self.server_args()], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: see {self.dir / 'redis.log'}")
            try:
                with self.client() as client:
                    client.ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes with no goodbye, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process dies only once continued
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, host="127.0.0.1", socket_timeout=2, socket_connect_timeout=2)

    def flush(self) -> None:
        with self.client() as client:
            client.flushall()

    def up(self) -> Self:
        """Running again if an earlier test killed it and failed before restarting it."""
        return self if self.running else self.start()

    def fresh(self) -> Self:
        """Running and empty."""
        self.up().flush()
        return self


@contextmanager
def private_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server of its own, in `directory`, for a test that stalls or kills it."""
    binary = shutil.which("redis-server")
    require(binary is not None, "redis-server is not on PATH")
    assert binary is not None
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, free_port(), directory).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with private_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session server, running (a test may have killed it) and empty."""
    return redis_session.fresh()
