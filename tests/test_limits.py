"""Connection limits (findings 7 and 8 of the hostile probe), on a real gateway over raw sockets:
a header over `max_header_bytes` is refused with 431, unfinished huge headers do not grow memory,
idle and slow connections are closed after the header, body and keep-alive timeouts, and a
process over `max_connections` answers 503 while its admin listener still serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from testkit.poll import eventually
from testkit.procs import Proc, free_port, gateway

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE = 1.0


def limited_gateway(logs: Path, fake_engine: Proc, name: str, **server: Any) -> Proc:
    config = {
        "server": server,
        "health": {"interval": 0.3},
        "engines": [{"name": "fake", "kind": "openai", "url": fake_engine.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
    }
    return gateway(logs, config, name=name).start().wait_healthy("/ready", timeout=60)


@pytest.fixture(scope="module")
def gw(logs_dir: Path, fake_engine: Proc) -> Iterator[Proc]:
    proc = limited_gateway(
        logs_dir,
        fake_engine,
        "gw-limits",
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
        keepalive_timeout=KEEPALIVE,
    )
    try:
        yield proc
    finally:
        proc.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a content-length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed the connection (reads and drops what it sends first)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def worker_pid(gw: Proc) -> int:
    assert gw.proc is not None
    children = psutil.Process(gw.proc.pid).children()
    return next(c.pid for c in children if "spawn_main" in " ".join(c.cmdline()))


def test_a_1mb_header_is_refused_with_431(gw: Proc) -> None:
    for size in (1 << 20, 10 << 20):
        with connect(gw.port) as sock:
            head = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: "
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(head + b"a" * size + b"\r\n\r\n")  # refused before all is sent
            status, headers, body = read_response(sock)
        assert status == 431, body
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "headers_too_large"
    # Just under the limit is fine.
    r = httpx.get(gw.url + "/v1/models", headers={"x-fits": "a" * 60_000}, timeout=10)
    assert r.status_code == 200


def test_a_malformed_request_gets_an_openai_shaped_400(gw: Proc) -> None:
    with connect(gw.port) as sock:  # both lengths at once: a request smuggling attempt
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n")
        sock.sendall(b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "invalid_request"


def test_unfinished_8mb_headers_do_not_grow_memory(gw: Proc) -> None:
    worker = psutil.Process(worker_pid(gw))
    before = worker.memory_info().rss

    async def hold(peak: list[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ")
        piece = b"a" * (256 * 1024)
        try:
            for _ in range(32):  # 8 MB, never finished
                writer.write(piece)
                await writer.drain()
                peak[0] = max(peak[0], worker.memory_info().rss)
            await asyncio.wait_for(reader.read(), 10)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    async def run() -> int:
        peak = [before]
        await asyncio.gather(*(hold(peak) for _ in range(40)))
        return peak[0]

    peak = asyncio.run(run())
    grew = (peak - before) / 2**20
    # Before the limit: 40 such connections took the gateway from 60 to 388 MB.
    assert grew < 40, f"worker memory grew by {grew:.0f} MB"
    assert httpx.get(gw.url + "/v1/models", timeout=10).status_code == 200


def test_idle_and_slow_connections_are_closed(gw: Proc) -> None:
    # 50 connections that never send a byte: closed after header_timeout, without an answer.
    idle = [connect(gw.port) for _ in range(50)]
    started = time.monotonic()
    for sock in idle:
        closed_within(sock, HEADER_TIMEOUT + 10)
        sock.close()
    assert time.monotonic() - started < HEADER_TIMEOUT + 5

    # Headers trickling in: 408 once header_timeout has passed since the first byte.
    with connect(gw.port) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
        started = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(100):
                sock.sendall(b"x-slow: 1\r\n")
                time.sleep(0.1)
        status, _, body = read_response(sock)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert HEADER_TIMEOUT - 0.2 < time.monotonic() - started < HEADER_TIMEOUT + 5

    # A body that stops halfway: 408 after body_timeout.
    with connect(gw.port) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n")
        sock.sendall(b"content-length: 100\r\n\r\n" + b'{"model": "fake"')
        started = time.monotonic()
        status, _, body = read_response(sock)
        assert status == 408 and "body" in json.loads(body)["error"]["message"]
        assert time.monotonic() - started >= BODY_TIMEOUT - 0.2

    # An idle keep-alive connection: closed after keepalive_timeout.
    with connect(gw.port) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 200
        assert closed_within(sock, KEEPALIVE + 10) < KEEPALIVE + 5


def test_connections_over_the_cap_get_503(logs_dir: Path, fake_engine: Proc) -> None:
    admin_port = free_port()
    gw = limited_gateway(logs_dir, fake_engine, "gw-cap", max_connections=5, header_timeout=60, admin_port=admin_port)
    try:
        held = [connect(gw.port) for _ in range(5)]

        def sixth() -> tuple[int, dict[str, str], bytes]:
            with connect(gw.port) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
                return read_response(sock)

        # once the worker has accepted the five held connections
        _, headers, body = eventually(sixth, lambda answer: answer[0] == 503, timeout=20, what="a sixth refused")
        assert headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        # The admin listener is not counted: metrics stay readable during a flood.
        assert httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).status_code == 200
        for sock in held:
            sock.close()
        eventually(lambda: httpx.get(gw.url + "/v1/models", timeout=10).status_code, lambda st: st == 200, timeout=20)
    finally:
        gw.stop()
