"""What a new user sees, on real processes: one line when the gateway can serve and one when it has
stopped, every log line with a timestamp and a level, a clear error when the port is taken, the
keys CLI waiting for a gateway that is still starting (and printing no HTTP client logs), and a
Redis outage logged once when it starts and once when it ends."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testkit.keyed import ADMIN_KEY
from testkit.procs import Proc, gateway, write_config
from testkit.redis_server import RedisServer

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def config(fake_engine: Proc, redis: RedisServer) -> dict[str, Any]:
    return {
        "health": {"interval": 0.3},
        "redis": {"url": redis.url, "timeout": 0.5},
        "auth": {"enabled": True},
        "engines": [{"name": "fake", "kind": "openai", "url": fake_engine.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
    }


def keys_cli(url: str, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "gateway.cli.main", "keys", "--url", url, *args]
    env = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_line(gw: Proc, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, gw.log_path.read_text()):
        assert time.monotonic() < deadline, f"no line matching {pattern!r}:\n{gw.log_tail()}"
        time.sleep(0.1)


def test_a_first_run_says_when_it_is_ready_and_when_it_stopped(
    logs_dir: Path, fake_engine: Proc, redis_server: RedisServer
) -> None:
    gw = gateway(logs_dir, config(fake_engine, redis_server), name="first-run", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    # The keys CLI started before the gateway waits for it instead of failing at once.
    cli = keys_cli(gw.url, "create", "--name", "early", "--wait", "60")
    assert cli.stderr is not None
    waiting = cli.stderr.readline()  # the gateway starts once the CLI has found nothing there
    assert "waiting up to 60s for the gateway" in waiting, waiting
    gw.start()
    try:
        out, err = cli.communicate(timeout=90)
        err = waiting + err
        assert cli.returncode == 0, err
        assert '"name": "early"' in out
        assert "httpx" not in err and "INFO" not in err
        wait_for_line(gw, "llm-gateway is ready on")
        ready = [line for line in gw.log_path.read_text().splitlines() if "llm-gateway is ready on" in line]
        assert len(ready) == 1 and f"http://127.0.0.1:{gw.port}: fake (1 worker)" in ready[0]
        assert "Ctrl-C" in ready[0]
    finally:
        gw.stop()
    log = gw.log_path.read_text().splitlines()
    assert len([line for line in log if "llm-gateway stopped" in line]) == 1
    assert log and all(LOG_LINE.match(line) for line in log), "\n".join(log)
    # Nothing listens any more: the CLI without --wait fails at once with a clear message.
    late = keys_cli(gw.url, "list", "--wait", "0")
    _, err = late.communicate(timeout=60)
    assert late.returncode == 1 and "cannot reach the gateway" in err


def test_a_taken_port_is_a_clear_error_and_no_ready_line(logs_dir: Path, fake_engine: Proc, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = {
            "engines": [{"name": "fake", "kind": "openai", "url": fake_engine.url}],
            "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
            "auth": {"enabled": False},
        }
        path = write_config(tmp_path, "taken", cfg)
        cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(path), "--port", str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "is ready" not in done.stderr


def test_redis_going_away_is_logged_once_and_its_return_once(
    logs_dir: Path, fake_engine: Proc, redis_server: RedisServer
) -> None:
    gw = gateway(logs_dir, config(fake_engine, redis_server), name="redis-outage", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    gw.start().wait_healthy("/ready", timeout=60)
    try:
        redis_server.kill()
        wait_for_line(gw, "Redis unreachable")
        time.sleep(4)  # the route store's subscription retries meanwhile
        redis_server.start()
        wait_for_line(gw, "Redis reachable again")
        log = gw.log_path.read_text()
        assert log.count("Redis unreachable") == 1, log
        assert log.count("Redis reachable again") == 1, log
    finally:
        gw.stop()
