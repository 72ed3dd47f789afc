"""The access log (gateway/observe/access_log.py) against real processes: one line per request for
every outcome (200, 4xx, 429, 5xx, a client that hangs up mid-stream, a batch line), each with every
field, never a secret; X-Forwarded-For believed only from trusted proxies; logfmt; a file of its
own reopened on SIGHUP (logrotate); Server-Timing when asked for."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.observe.access_log import FIELDS
from testkit.batch import client, jsonl, wait_final
from testkit.keyed import ADMIN_KEY, chat, create_key, start_gateway
from testkit.poll import eventually
from testkit.procs import Proc, fake_upstream, gateway
from testkit.redis_server import RedisServer


def lines_of(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The file's JSON lines, once there are at least `count` (the log is written every 0.25 s)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        found = [json.loads(line) for line in text.splitlines()]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def line_for(path: Path, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for line in lines_of(path, 0):
            if line["request_id"] == request_id:
                return line
        assert time.monotonic() < deadline, f"no access log line for {request_id}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def engines(logs_dir: Path) -> Iterator[dict[str, Proc]]:
    procs = {
        "fast": fake_upstream(logs_dir, "--chunks", "4", name="al-fast"),
        "slow": fake_upstream(logs_dir, "--chunks", "50", "--pace-ms", "100", name="al-slow"),
        "broken": fake_upstream(logs_dir, "--fail-status", "500", name="al-broken"),
    }
    for p in procs.values():
        p.start()
    try:
        yield {name: p.wait_healthy() for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def keyed_gw(
    logs_dir: Path, engines: dict[str, Proc], redis_session: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proc, Path]]:
    tmp = tmp_path_factory.mktemp("access-log")
    log_file = tmp / "access.log"
    config = {
        "health": {"interval": 0.3},
        "redis": {"url": redis_session.up().url, "timeout": 1.0},
        "auth": {"enabled": True, "default_max_tokens": 16},
        "engines": [{"name": name, "kind": "openai", "url": p.url} for name, p in engines.items()],
        "models": [{"name": name, "routes": [{"engine": name}]} for name in engines],
        "store": {"url": "sqlite:///batches.db", "data_dir": str(tmp)},
        "batch": {"concurrency": 2, "poll_interval": 0.2, "min_completion_window": 1},
        "logging": {"access": {"file": str(log_file)}, "trusted_proxies": ["127.0.0.1/32"], "server_timing": True},
    }
    proc = start_gateway(logs_dir, config, "gw-access-log")
    try:
        yield proc, log_file
    finally:
        proc.stop()


def test_a_line_with_every_field_for_every_outcome(keyed_gw: tuple[Proc, Path], redis_server: RedisServer) -> None:
    gw, log_file = keyed_gw
    key_id, secret = create_key(gw)
    limited_id, limited = create_key(gw, rpm=1)
    rid: dict[str, str] = {}

    # 200, streamed, through a trusted proxy that names the client
    headers = {"authorization": f"Bearer {secret}", "x-forwarded-for": "203.0.113.7, 127.0.0.1"}
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        # Server-Timing (on in this config): admission, queue and upstream, in milliseconds
        timing = r.headers["server-timing"]
        assert [part.split(";")[0] for part in timing.split(", ")] == ["admission", "queue", "upstream"]
        streamed = b"".join(r.iter_bytes())
        rid["ok"] = r.headers["x-request-id"]
    # 4xx: no key, an unknown model
    r = chat(gw, None, model="fast")
    assert r.status_code == 401
    rid["401"] = r.headers["x-request-id"]
    r = chat(gw, secret, model="no-such-model")
    assert r.status_code == 404
    rid["404"] = r.headers["x-request-id"]
    # 429: the key's rpm is 1
    assert chat(gw, limited, model="fast").status_code == 200
    r = chat(gw, limited, model="fast")
    assert r.status_code == 429
    rid["429"] = r.headers["x-request-id"]
    # 5xx: the engine fails
    r = chat(gw, secret, model="broken")
    assert r.status_code >= 500
    rid["5xx"] = r.headers["x-request-id"]
    # the client hangs up mid-stream
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}, timeout=30
    ) as r:
        assert r.status_code == 200
        rid["gone"] = r.headers["x-request-id"]
        next(r.iter_bytes())
    # a batch line
    c = client(gw, secret)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fast", "messages": []},
    }
    line["body"]["messages"] = [{"role": "user", "content": "hello"}]
    uploaded = c.files.create(file=("in.jsonl", jsonl([line])), purpose="batch")
    batch = c.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1s")
    done = wait_final(c, batch.id, timeout=60)
    assert done.status == "completed", done

    lines = {name: line_for(log_file, request_id) for name, request_id in rid.items()}
    batch_lines = [x for x in lines_of(log_file, 0) if x["batch_id"] == batch.id]
    assert len(batch_lines) == 1
    lines["batch"] = batch_lines[0]
    for name, entry in lines.items():
        assert list(entry) == list(FIELDS), name
        assert entry["time"].endswith("Z") and entry["duration_ms"] >= 0, name

    ok = lines["ok"]
    assert ok["client"] == "203.0.113.7"  # X-Forwarded-For from a trusted proxy
    assert (ok["status"], ok["error_code"], ok["client_hung_up"]) == (200, None, False)
    assert (ok["key_id"], ok["api"], ok["model"], ok["route"], ok["engine"]) == (key_id, "chat", "fast", "v1", "fast")
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (8, 4)  # as the fake engine reports
    assert 0 < ok["ttft_ms"] <= ok["duration_ms"]
    assert ok["bytes_out"] == len(streamed)
    assert ok["method"] == "POST" and ok["path"] == "/v1/chat/completions"

    assert (lines["401"]["status"], lines["401"]["key_id"], lines["401"]["client"]) == (401, None, "127.0.0.1")
    assert lines["401"]["error_code"] == "missing_api_key"
    assert (lines["404"]["status"], lines["404"]["error_code"], lines["404"]["key_id"]) == (
        404,
        "model_not_found",
        key_id,
    )
    assert (lines["429"]["status"], lines["429"]["error_code"], lines["429"]["key_id"]) == (
        429,
        "rpm_exceeded",
        limited_id,
    )
    assert lines["5xx"]["status"] >= 500 and lines["5xx"]["error_code"] and lines["5xx"]["engine"] == "broken"
    gone = lines["gone"]
    assert (gone["status"], gone["client_hung_up"], gone["engine"]) == (499, True, "slow")
    assert gone["bytes_out"] > 0 and gone["ttft_ms"] is not None
    b = lines["batch"]
    assert (b["status"], b["key_id"], b["api"], b["model"], b["engine"]) == (200, key_id, "chat", "fast", "fast")
    assert b["bytes_out"] > 0 and b["completion_tokens"] == 4 and b["client"] is None

    # no secret anywhere: not in the access log, not in the gateway's own log
    text = log_file.read_text() + gw.log_path.read_text()
    for s in (secret, limited, ADMIN_KEY):
        assert s not in text


def test_logfmt_to_a_file_reopened_on_sighup_and_untrusted_forwarding_ignored(
    logs_dir: Path, engines: dict[str, Proc], tmp_path: Path
) -> None:
    log_file = tmp_path / "access.log"
    config = {
        "auth": {"enabled": False},
        "engines": [{"name": "fast", "kind": "openai", "url": engines["fast"].url}],
        "models": [{"name": "fast", "routes": [{"engine": "fast"}]}],
        "logging": {"access": {"format": "logfmt", "file": str(log_file)}},
    }
    gw = gateway(logs_dir, config, name="gw-logfmt", workers=2).start().wait_healthy("/ready", timeout=60)
    try:
        headers = {"x-forwarded-for": "198.51.100.1", "x-request-id": "before-rotation"}
        body = {"model": "fast", "messages": [{"role": "user", "content": 'a "quoted" prompt'}]}
        r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and "server-timing" not in r.headers  # off by default
        deadline = time.monotonic() + 10
        while "before-rotation" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        line = next(x for x in log_file.read_text().splitlines() if "request_id=before-rotation" in x)
        fields = dict(part.split("=", 1) for part in line.split(" "))
        assert list(fields) == list(FIELDS)
        assert fields["client"] == "127.0.0.1"  # no trusted proxy configured: the header is ignored
        assert (fields["status"], fields["model"], fields["key_id"], fields["client_hung_up"]) == (
            "200",
            "fast",
            "",
            "false",
        )

        rotated = tmp_path / "access.log.1"
        os.rename(log_file, rotated)
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGHUP)  # the main process passes it to both workers

        def text(path: Path) -> str:
            return path.read_text() if path.exists() else ""

        # The signal reaches each worker in its own time (on two loaded cores, that can be
        # seconds): rounds of six requests, until a whole round lands in the new file.
        deadline = time.monotonic() + 60
        for round_ in range(1000):
            ids = [f"after-rotation-{round_}-{i}" for i in range(6)]
            for request_id in ids:  # both workers serve some of them
                r = httpx.post(
                    gw.url + "/v1/chat/completions", json=body, headers={"x-request-id": request_id}, timeout=30
                )
                assert r.status_code == 200
            written = eventually(
                lambda: (text(log_file), text(rotated)),
                lambda files, ids=ids: all(f"request_id={x} " in files[0] + files[1] for x in ids),
                what="every line written to one of the two files",
            )
            if all(f"request_id={x} " in written[0] for x in ids):
                break
            assert time.monotonic() < deadline, "the lines after SIGHUP did not reach the new file"
        assert f"after-rotation-{round_}-" not in text(rotated)  # no line is written twice
        assert gw.proc.poll() is None  # SIGHUP stopped nothing
    finally:
        gw.stop()
