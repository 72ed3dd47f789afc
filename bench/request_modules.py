"""Which gateway modules one keyed, streamed chat request runs through (startup excluded).

A private redis-server and the fake engine run as processes; the gateway's worker server runs in
this process, and a profile hook notes the file of every Python function called in the request's
own task (the server's `Cycle.run`: a timer or background task that runs meanwhile is not the
request's code), after
warm-up requests; a module counts when each of three requests ran it. Prints the gateway modules, grouped by package, and the count.

    .venv/bin/python bench/request_modules.py
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.process.worker import WorkerSpec, build_server  # noqa: E402
from gateway.settings import parse_settings  # noqa: E402

GATEWAY = str(ROOT / "gateway") + os.sep
ADMIN = "sk-admin-modules"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Recorder:
    def __init__(self) -> None:
        self.on = False
        self.files: set[str] = set()
        self.functions: dict[str, set[str]] = defaultdict(set)

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        # Code run in the request's own task (its handler, the relay, the Redis and engine calls
        # it awaits: the server runs each request in a task of `Cycle.run`), not a timer or a
        # background task of the process (health checks, the store, flushes) that ran meanwhile.
        task = asyncio.current_task() if self.on and event == "call" else None
        if task is not None and task.get_coro().__qualname__ == "Cycle.run":  # type: ignore[union-attr]
            name = frame.f_code.co_filename
            if name.startswith(GATEWAY):
                self.files.add(name[len(GATEWAY) :])
                self.functions[name[len(GATEWAY) :]].add(frame.f_code.co_qualname)


async def measure(gateway_port: int, recorder: Recorder) -> None:
    base = f"http://127.0.0.1:{gateway_port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for _ in range(200):
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        made = await client.post(
            "/admin/keys", json={"name": "modules", "rpm": 1000}, headers={"authorization": f"Bearer {ADMIN}"}
        )
        made.raise_for_status()
        headers = {"authorization": f"Bearer {made.json()['key']}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}

        async def one() -> int:
            chunks = 0
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                r.raise_for_status()
                async for _ in r.aiter_bytes():
                    chunks += 1
            return chunks

        for _ in range(20):  # warm-up: connections, caches, lazy imports
            await one()
        await asyncio.sleep(0.5)
        # Three requests, each recorded on its own: a module counts when all three ran it, so a
        # timer that happened to fire during one (health checks, the lag meter) does not.
        seen: list[set[str]] = []
        for _ in range(3):
            recorder.files = set()
            recorder.on = True
            await one()
            await asyncio.sleep(0.05)  # what runs just after the last byte (settle, metrics)
            recorder.on = False
            seen.append(recorder.files)
        recorder.files = set.intersection(*seen)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="modules-"))
    redis_port, engine_port, gateway_port = free_port(), free_port(), free_port()
    procs = [
        subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, str(ROOT / "testkit" / "fake_upstream.py"), "--port", str(engine_port), "--chunks", "8"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    try:
        wait_port(redis_port)
        wait_port(engine_port)
        config = {
            "server": {"host": "127.0.0.1", "port": gateway_port},
            "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
            "auth": {"enabled": True},
            "store": {"url": f"sqlite:///{tmp / 'gateway.db'}"},
            "engines": [{"name": "fake", "kind": "openai", "url": f"http://127.0.0.1:{engine_port}"}],
            "models": [{"name": "m", "routes": [{"engine": "fake"}]}],
        }
        settings = parse_settings(config, source="request_modules", env={"GATEWAY_ADMIN_KEY": ADMIN})
        server = build_server(WorkerSpec(settings, 0, log_level="warning"))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", gateway_port))
        recorder = Recorder()

        async def run() -> None:
            sock.listen(128)
            serving = asyncio.create_task(server.serve([sock]))
            try:
                await measure(gateway_port, recorder)
            finally:
                server.exit()
                await serving

        sys.setprofile(recorder)
        asyncio.run(run())
        sys.setprofile(None)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    by_package: dict[str, list[str]] = defaultdict(list)
    for name in sorted(recorder.files):
        package = name.split(os.sep)[0] if os.sep in name else "."
        by_package[package].append(name)
    for package, names in sorted(by_package.items()):
        print(f"{package}: {', '.join(n.split(os.sep, 1)[-1] for n in names)}")
        if "-v" in sys.argv:
            for n in names:
                print(f"    {n}: {', '.join(sorted(recorder.functions[n]))}")
    print(f"modules: {len(recorder.files)}")


if __name__ == "__main__":
    main()
