"""What a new user sees, on real processes: one line when the gateway can serve and one when it has
stopped, every log line with a timestamp and a level, a clear error when the port is taken, the
keys CLI waiting for a gateway that is still starting (and printing no HTTP client logs), a
Redis outage logged once when it starts and once when it ends, a too-low open-files limit that
says how to fix it, an admin API that says why it is off, CLIs whose errors and help name what to
set, and set-up scripts that show progress while pip and apt-get are silent."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from testkit.keyed import ADMIN_KEY
from testkit.procs import ROOT, Proc, gateway, write_config
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
    # Every line is a log line with its time and level, or an access log line (one JSON object).
    access = [line for line in log if line.startswith('{"time":')]
    assert "/admin/keys" in [json.loads(line)["path"] for line in access], access
    assert log and all(LOG_LINE.match(line) for line in log if line not in access), "\n".join(log)
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


def open_config(fake: Proc) -> dict[str, Any]:
    return {
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
    }


def serve_on_taken_port(config_path: Path, nofile: int) -> str:
    """Standard error of `serve` under an open-files limit of `nofile`. The limit is raised before
    anything is bound, so a taken port ends the run right after that step."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(config_path), "--port", str(port)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, preexec_fn=limit)
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    return done.stderr


def test_too_few_open_files_says_what_to_do(fake_engine: Proc, tmp_path: Path) -> None:
    cfg = open_config(fake_engine)  # server.max_connections 10000 by default: 21024 descriptors wanted
    err = serve_on_taken_port(write_config(tmp_path, "nofile", cfg), 4096)
    assert "open files are limited to 4096" in err and "server.max_connections 10000" in err, err
    assert "ulimit -Hn 21024" in err and "LimitNOFILE=21024" in err, err
    assert "set server.max_connections to 1536 or less" in err, err
    cfg["server"] = {"max_connections": 1536}  # exactly what the message advised: no warning
    err = serve_on_taken_port(write_config(tmp_path, "nofile-fits", cfg), 4096)
    assert "open files" not in err, err


def test_the_admin_api_says_why_it_is_off(logs_dir: Path, fake_engine: Proc) -> None:
    no_key = gateway(logs_dir, open_config(fake_engine), name="admin-off", env={"GATEWAY_ADMIN_KEY": ""})
    keyed = gateway(logs_dir, open_config(fake_engine), name="admin-no-redis", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    no_key.start()
    keyed.start()
    try:
        no_key.wait_healthy("/ready", timeout=60)
        keyed.wait_healthy("/ready", timeout=60)
        # No Redis and no admin key: the key and route paths name both.
        for method, path in [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("PUT", "/admin/models/fake/routes")]:
            r = httpx.request(method, no_key.url + path, json={})
            error = r.json()["error"]
            assert r.status_code == 404 and error["code"] == "admin_disabled", r.text
            assert "GATEWAY_REDIS_URL" in error["message"] and "GATEWAY_ADMIN_KEY" in error["message"], r.text
        # The inference log needs no Redis, only the admin key.
        r = httpx.get(no_key.url + "/admin/requests")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", r.text
        assert "GATEWAY_ADMIN_KEY" in r.json()["error"]["message"], r.text
        # A path that is no admin route at all is still an unknown route.
        r = httpx.get(no_key.url + "/admin/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found", r.text

        # An admin key but no Redis: only Redis is missing.
        r = httpx.get(keyed.url + "/admin/engines", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        error = r.json()["error"]
        assert r.status_code == 404 and error["code"] == "admin_disabled", r.text
        assert "GATEWAY_REDIS_URL" in error["message"] and "GATEWAY_ADMIN_KEY" not in error["message"], r.text
        # The refusals on /admin speak of the admin key, never of a client key.
        r = httpx.get(keyed.url + "/admin/requests")
        assert r.status_code == 401 and r.json()["error"]["message"].startswith("Missing admin key"), r.text
        r = httpx.get(keyed.url + "/admin/requests", headers={"authorization": "Bearer sk-gw-not-the-admin-key"})
        error = r.json()["error"]
        assert r.status_code == 403 and error["code"] == "not_admin", r.text
        assert "admin key" in error["message"] and "client" not in error["message"], r.text
        r = httpx.get(keyed.url + "/admin/requests", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200 and r.json()["data"] == [], r.text
    finally:
        no_key.stop()
        keyed.stop()


def test_a_batch_without_a_key_names_where_the_key_goes(
    logs_dir: Path, fake_engine: Proc, redis_server: RedisServer, tmp_path: Path
) -> None:
    gw = gateway(logs_dir, config(fake_engine, redis_server), name="batch-no-key", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})
    gw.start().wait_healthy("/ready", timeout=60)
    lines = tmp_path / "questions.jsonl"
    lines.write_text(
        '{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", '
        '"body": {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}}\n'
    )
    try:
        cmd = [sys.executable, "-m", "gateway.cli.main", "batch", "run", str(lines), "--url", gw.url]
        env = {"PATH": "/usr/bin:/bin"}  # no GATEWAY_API_KEY
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)
    finally:
        gw.stop()
    assert done.returncode == 1, done.stderr
    assert "401" in done.stderr and "--key" in done.stderr and "GATEWAY_API_KEY" in done.stderr, done.stderr


def test_keys_help_describes_every_subcommand() -> None:
    cmd = [sys.executable, "-m", "gateway.cli.main", "keys", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    for op in ("create", "list", "get", "revoke", "usage", "update"):
        assert re.search(rf"^\s+{op}\s+\w+", done.stdout, re.MULTILINE), f"no help for keys {op}:\n{done.stdout}"
    assert "GATEWAY_ADMIN_KEY" in done.stdout
    cmd = [sys.executable, "-m", "gateway.cli.main", "keys", "update", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert "requests per minute" in done.stdout and "tokens per UTC day" in done.stdout, done.stdout


def progress(script: str, every: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PROGRESS_EVERY": every}
    cmd = ["bash", "-c", f". scripts/progress.sh; {script}"]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env)
    return done, time.monotonic() - started


def test_set_up_steps_print_progress_while_they_are_silent() -> None:
    done, _ = progress('with_progress "installing the project" sleep 3.5', "1")
    assert done.returncode == 0, done.stderr
    ticks = re.findall(r"^setup: installing the project: still going \((\d+)s\)$", done.stderr, re.MULTILINE)
    assert len(ticks) >= 2 and [int(t) for t in ticks] == sorted(int(t) for t in ticks), done.stderr
    # The step's own exit status comes through, and a step shorter than the interval prints nothing.
    done, _ = progress('with_progress "failing" sh -c "exit 3"', "1")
    assert done.returncode == 3 and "still going" not in done.stderr, done.stderr
    # The ticker's sleep holds no pipe open: a quick step ends quickly even with a long interval.
    done, took = progress('with_progress "quick" true', "60")
    assert done.returncode == 0 and took < 30, (took, done.stderr)
