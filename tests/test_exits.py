"""Clean exits (issue 20), with real processes: a gateway of two workers, a managed CPU engine and a
fake engine, whose big prompts start the prompt-counting process pool in the workers. However the
main process ends (SIGKILL under load, a stop cut short by SIGKILL two seconds after SIGTERM, or a
normal stop), every process it had (workers, the pool's children, the managed engine) stops
accepting at once and is gone within seconds: none is left after 10 s."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from testkit.keyed import ADMIN_KEY, create_key
from testkit.procs import ROOT, TINY_MODEL, Proc, cpu_engine, fake_upstream, free_port, gateway
from testkit.redis_server import RedisServer

BIG = "word " * 8000  # 40 KB: past tokens.OFF_LOOP_BYTES, so counted in the pool
SEEN: list[psutil.Process] = []  # the gateway's processes, for the cleanup after a failed test


@pytest.fixture(scope="module")
def engine(logs_dir: Path) -> Iterator[Proc]:
    proc = fake_upstream(logs_dir, "--model", "fake", "--chunks", "20", "--pace-ms", "20", name="exits-engine")
    proc.start().wait_healthy()
    yield proc
    proc.stop()


@contextmanager
def started(
    logs_dir: Path, engine: Proc, redis: RedisServer, name: str
) -> Iterator[tuple[subprocess.Popen[bytes], Proc, str]]:
    """The gateway in a session of its own (so its process group is only its own), ready, and a
    client key (keys on: prompts are counted to reserve quota, big ones in the pool)."""
    cfg: dict[str, Any] = {
        "server": {"drain_grace": 1, "drain_timeout": 20},
        "redis": {"url": redis.up().url, "timeout": 1.0},
        "auth": {"enabled": True},
        "engines": [cpu_engine("tiny", free_port()), {"name": "fake", "kind": "openai", "url": engine.url}],
        "models": [
            {"name": "tiny", "routes": [{"engine": "tiny", "model": "tiny-llama"}]},
            {"name": "fake", "routes": [{"engine": "fake"}], "tokenizer": str(TINY_MODEL)},
        ],
    }
    gw = gateway(logs_dir, cfg, name=name, workers=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "GATEWAY_ADMIN_KEY": ADMIN_KEY}
    with gw.log_path.open("ab") as log:
        popen = subprocess.Popen(
            gw.args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    gw.proc = popen
    try:
        gw.wait_healthy("/ready", timeout=120)
        yield popen, gw, create_key(gw, tpm=10**12)[1]  # token-limited: its prompts are counted
    finally:
        left = _family(popen.pid, []) + SEEN  # what a failed test left, even with main gone
        with _quiet():
            os.killpg(popen.pid, signal.SIGKILL)
        for p in left:
            with _quiet():
                p.kill()
        SEEN.clear()
        popen.wait(10)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, psutil.Error))  # type: ignore[arg-type]


def _family(pid: int, known: list[psutil.Process]) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return known


def pools_started(popen: subprocess.Popen[bytes]) -> bool:
    workers = [c for c in psutil.Process(popen.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    return len(workers) == 2 and all(w.children() for w in workers)


def warm_up(gw: Proc, popen: subprocess.Popen[bytes], secret: str) -> None:
    """Big prompts in both workers (each starts its pool) and one answer of the managed engine."""
    auth = {"authorization": f"Bearer {secret}"}
    for _ in range(40):  # a new connection each: either worker may take it
        body = {"model": "fake", "prompt": BIG, "max_tokens": 2}
        r = httpx.post(gw.url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        if pools_started(popen):
            break
    assert pools_started(popen)
    with httpx.Client(timeout=60, headers=auth) as client:
        deadline = time.monotonic() + 120  # /ready needs one model served; the CPU engine loads slower
        while True:
            r = client.post(gw.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text


@contextmanager
def load(gw: Proc, secret: str, threads: int = 4) -> Iterator[list[int]]:
    """Steady traffic (big prompts, streams) until the block ends; the statuses it got."""
    stop = threading.Event()
    statuses: list[int] = []

    def run() -> None:
        with httpx.Client(timeout=5, headers={"authorization": f"Bearer {secret}"}) as client:
            while not stop.is_set():
                body = {"model": "fake", "prompt": BIG, "max_tokens": 20, "stream": True}
                try:
                    with client.stream("POST", gw.url + "/v1/completions", json=body) as r:
                        for _ in r.iter_bytes():
                            pass
                        statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(0)
                    time.sleep(0.05)

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        yield statuses
    finally:
        stop.set()
        for t in workers:
            t.join(10)


def accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def seconds_until(condition: Any, limit: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


def family_of(popen: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The main process's descendants: two workers, each with its pool child, and the engine."""
    children = psutil.Process(popen.pid).children(recursive=True)
    commands = [" ".join(c.cmdline()) for c in children]
    assert sum("engines.worker" in c for c in commands) == 1, commands
    assert len(children) >= 5, commands  # 2 workers + their pool children + the engine
    SEEN.extend(children)
    return children


def test_sigkill_of_the_main_process_under_load_leaves_nothing(
    logs_dir: Path, engine: Proc, redis_session: RedisServer
) -> None:
    with started(logs_dir, engine, redis_session, "exits-kill") as (popen, gw, secret):
        warm_up(gw, popen, secret)
        family = family_of(popen)
        with load(gw, secret) as statuses:
            assert seconds_until(lambda: len(statuses) >= 8, 60) is not None
            popen.send_signal(signal.SIGKILL)
            refused = seconds_until(lambda: not accepting(gw.port), 10)
            gone = seconds_until(lambda: not alive(family), 10)
        print(f"after SIGKILL of main: port refused after {refused}s, every process gone after {gone}s")
        assert refused is not None and refused < 2.0, f"still accepting: {alive(family)}\n{gw.log_tail()}"
        assert gone is not None, f"left after 10 s: {alive(family)}\n{gw.log_tail()}"
        assert gone < 5.0, gone


def test_a_stop_cut_short_leaves_nothing(logs_dir: Path, engine: Proc, redis_session: RedisServer) -> None:
    """SIGTERM to the process group, SIGKILL to it two seconds later (a supervisor without cgroups)."""
    with started(logs_dir, engine, redis_session, "exits-cut") as (popen, gw, secret):
        warm_up(gw, popen, secret)
        family = family_of(popen)
        with load(gw, secret):
            time.sleep(1.0)
            os.killpg(popen.pid, signal.SIGTERM)
            time.sleep(2.0)
            os.killpg(popen.pid, signal.SIGKILL)
            killed = time.monotonic()
            gone = seconds_until(lambda: not alive(family), 10)
        print(f"stop cut short: every process gone {gone}s after the SIGKILL ({time.monotonic() - killed:.1f}s)")
        assert gone is not None, f"left after 10 s: {alive(family)}\n{gw.log_tail()}"
        assert gone < 5.0, gone
        assert not accepting(gw.port)


def test_a_normal_stop_leaves_nothing(logs_dir: Path, engine: Proc, redis_session: RedisServer) -> None:
    with started(logs_dir, engine, redis_session, "exits-stop") as (popen, gw, secret):
        warm_up(gw, popen, secret)
        family = family_of(popen)
        popen.send_signal(signal.SIGTERM)
        assert popen.wait(30) == 0
        gone = seconds_until(lambda: not alive(family), 10)
        assert gone is not None, f"left after 10 s: {alive(family)}\n{gw.log_tail()}"
        assert "Traceback" not in gw.log_path.read_text(errors="replace")
