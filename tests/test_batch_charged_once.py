"""A batch line that runs twice is charged once: the usage of the result that was recorded.

Two gateway replicas, one after the other, on one Redis and one PostgreSQL database (reached
through a TCP proxy the test can cut). Each scenario puts replica A in one of the windows where a
line runs again on replica B, made certain by what the test watches in Redis rather than by time:
the fake engine is SIGSTOPped before the batch starts, so every line is admitted (its lease is in
Redis) and waits there; then

- charged, not recorded: the store is cut, the engine let go; A settles every line (Redis shows
  their usage) and cannot record them; A is SIGKILLed;
- admitted, not answered: A is SIGKILLed holding its reservations and leases;
- stalled and taken over: A is SIGSTOPped; B runs and records the lines; A is let go, settles
  late, and its results are refused.

B takes the batch over once A's lease and claims expire and runs every line again. Afterwards the
key's counters in Redis (requests, tokens, prompt and completion tokens, money) and the spend
rollups in the store hold exactly the usage of the recorded results, once per line, and no batch
lease is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

from testkit.batch import assert_each_once, client, jsonl, results, wait_final
from testkit.keyed import admin, create_key, start_gateway
from testkit.metrics import scrape
from testkit.poll import eventually
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer
from testkit.stores import fresh_database
from testkit.tcp_proxy import TcpProxy

LINES = 4
TOKENS = 4  # each answer's completion tokens (the fake engine's --chunks); its prompt is 8
PRICE = {"input": 1.0, "output": 2.0}  # per million tokens: 1,000 and 2,000 nano-units a token


@contextlib.contextmanager
def world(logs: Path, redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    """A stopped engine, the store behind a proxy, and the config the replicas share."""
    engine = fake_upstream(logs, "--chunks", str(TOKENS), "--count", name="once-engine").start().wait_healthy()
    with contextlib.ExitStack() as stack:
        stack.callback(engine.stop)
        stack.callback(_continue, [engine.proc.pid] if engine.proc else [])
        db = urlsplit(stack.enter_context(fresh_database("gateway_once")))
        proxy = TcpProxy(db.hostname or "127.0.0.1", db.port or 5432).start()
        stack.callback(proxy.close)
        config = {
            "health": {"interval": 60},  # a stopped engine stays in: its requests wait there
            "redis": {"url": redis_server.url},
            "auth": {"enabled": True},
            "store": {"url": urlunsplit(db._replace(netloc=f"{db.username}@127.0.0.1:{proxy.port}"))},
            "batch": {"concurrency": LINES, "claim_size": LINES, "poll_interval": 0.2, "lease_ttl": 2, "claim_ttl": 3},
            "engines": [{"name": "fake", "kind": "openai", "url": engine.url}],
            "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
            "pricing": {"models": {"fake": PRICE}},
        }
        yield {"engine": engine, "proxy": proxy, "redis": redis_server, "config": config, "stack": stack}


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _continue(pids: list[int]) -> None:
    for pid in pids:
        _signal(pid, signal.SIGCONT)


def family(replica: Proc) -> list[int]:
    """The replica's main process and its workers (a worker runs the batches)."""
    assert replica.proc is not None
    main = psutil.Process(replica.proc.pid)
    return [main.pid, *(child.pid for child in main.children(recursive=True))]


def replica(w: dict[str, Any], logs: Path, name: str) -> Proc:
    """A replica, stopped (and continued first, if the test stopped it) when the test ends."""
    proc = start_gateway(logs, w["config"], name)
    pids = family(proc)
    w["stack"].callback(proc.stop)
    w["stack"].callback(_continue, pids)
    return proc


def kill(replica: Proc) -> None:
    """The whole replica at once, as a machine dies."""
    for pid in family(replica):
        _signal(pid, signal.SIGKILL)
    replica.kill()


def start_batch(gw: Proc, w: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    """The key, its secret, the batch and its custom_ids, with every line admitted and waiting in
    the stopped engine."""
    key_id, secret = create_key(gw)
    ids = [f"line-{i}" for i in range(LINES)]
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS}
    lines = [
        {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": {**body, "user": cid}}
        for cid in ids
    ]
    engine = w["engine"]
    _signal(engine.proc.pid, signal.SIGSTOP)
    c = client(gw, secret)
    upload = c.files.create(file=("once.jsonl", jsonl(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    eventually(lambda: leases(w, key_id), lambda n: n == LINES, what="every line admitted")
    return key_id, secret, batch.id, ids


def leases(w: dict[str, Any], key_id: str) -> int:
    with w["redis"].client() as r:
        return int(r.zcard(f"gw:{{{key_id}}}:bleases"))


def charged(w: dict[str, Any], key_id: str) -> dict[str, int]:
    """The key's day counters in Redis (every day hash: a test across midnight stays exact)."""
    sums: dict[str, int] = {}
    with w["redis"].client() as r:
        for name in r.scan_iter(f"gw:{{{key_id}}}:day:*"):
            for field, value in r.hgetall(name).items():
                sums[field.decode()] = sums.get(field.decode(), 0) + int(value)
    return sums


def finish(survivor: Proc, secret: str, batch_id: str, ids: list[str]) -> list[dict[str, Any]]:
    c = client(survivor, secret)
    done = wait_final(c, batch_id, timeout=120)
    assert done.status == "completed" and done.request_counts.completed == LINES, done
    output, errors = results(c, done)
    assert_each_once(ids, output, errors)
    assert not errors
    return output


def assert_charged_once(w: dict[str, Any], gw: Proc, key_id: str, output: list[dict[str, Any]]) -> None:
    """Redis and the store hold the recorded results' usage and money, once per line."""
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    money = round((prompt * PRICE["input"] + completion * PRICE["output"]) * 1000)
    assert (prompt, completion) == (8 * LINES, TOKENS * LINES)
    day = charged(w, key_id)
    assert day["requests"] == LINES, day
    assert (day["prompt_tokens"], day["completion_tokens"], day["tokens"]) == (prompt, completion, prompt + completion)
    assert day["spend"] == money, day
    assert leases(w, key_id) == 0  # none left, not even one waiting to expire
    r = admin(gw, "GET", f"/admin/spend?key={key_id}")
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    stored = [sum(row[f] for row in rows) for f in ("requests", "prompt_tokens", "completion_tokens", "spend_nanos")]
    assert stored == [LINES, prompt, completion, money], rows


def runs(w: dict[str, Any]) -> dict[str, int]:
    return dict(httpx.get(w["engine"].url + "/counts", timeout=10).json())


def test_a_line_charged_then_killed_before_its_record(logs_dir: Path, redis_server: RedisServer) -> None:
    with world(logs_dir, redis_server) as w:
        a = replica(w, logs_dir, "once-a1")
        key_id, secret, batch_id, ids = start_batch(a, w)
        w["proxy"].stop()  # the store is gone: A's results cannot be recorded
        _signal(w["engine"].proc.pid, signal.SIGCONT)
        eventually(
            lambda: (leases(w, key_id), charged(w, key_id).get("completion_tokens")),
            lambda seen: seen == (0, TOKENS * LINES),
            what="every line settled in Redis",
        )
        kill(a)
        w["proxy"].start()
        b = replica(w, logs_dir, "once-b1")
        output = finish(b, secret, batch_id, ids)
        assert runs(w) == {cid: 2 for cid in ids}  # every line ran on both: the window was hit
        assert_charged_once(w, b, key_id, output)


def test_a_line_admitted_then_killed_before_its_answer(logs_dir: Path, redis_server: RedisServer) -> None:
    with world(logs_dir, redis_server) as w:
        a = replica(w, logs_dir, "once-a2")
        key_id, secret, batch_id, ids = start_batch(a, w)
        reserved = charged(w, key_id)
        assert reserved["requests"] == LINES and reserved["tokens"] > 0 and reserved["spend"] > 0
        kill(a)
        _signal(w["engine"].proc.pid, signal.SIGCONT)
        b = replica(w, logs_dir, "once-b2")
        output = finish(b, secret, batch_id, ids)
        assert_charged_once(w, b, key_id, output)


def test_a_line_stalled_and_taken_over(logs_dir: Path, redis_server: RedisServer) -> None:
    with world(logs_dir, redis_server) as w:
        a = replica(w, logs_dir, "once-a3")
        key_id, secret, batch_id, ids = start_batch(a, w)
        stalled = family(a)
        for pid in stalled:
            _signal(pid, signal.SIGSTOP)
        _signal(w["engine"].proc.pid, signal.SIGCONT)  # A's answers wait in its sockets
        b = replica(w, logs_dir, "once-b3")
        output = finish(b, secret, batch_id, ids)
        assert_charged_once(w, b, key_id, output)
        for pid in stalled:
            _signal(pid, signal.SIGCONT)
        # A wakes up: its lines finish, settle (too late: their leases are gone) and are refused.
        eventually(
            lambda: scrape(a.url, "gateway_batch_lines_total", outcome="discarded"),
            lambda n: n == LINES,
            what="A's late results refused",
        )
        assert runs(w) == {cid: 2 for cid in ids}
        assert_charged_once(w, b, key_id, output)


def test_a_line_aborted_by_a_cancel_counts_alike_in_redis_and_the_store(
    logs_dir: Path, redis_server: RedisServer
) -> None:
    """Lines in flight when a cancel's grace ends are aborted: each is recorded `batch_cancelled`
    here with what it was charged until then, so the store's spend rows say what Redis says."""
    with world(logs_dir, redis_server) as w:
        w["config"]["batch"]["cancel_grace"] = 0.5
        a = replica(w, logs_dir, "once-a4")
        key_id, secret, batch_id, ids = start_batch(a, w)
        c = client(a, secret)
        c.batches.cancel(batch_id)
        done = wait_final(c, batch_id, timeout=60)
        output, errors = results(c, done)
        assert done.status == "cancelled" and not output
        assert sorted(e["custom_id"] for e in errors) == ids
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        day = charged(w, key_id)
        r = admin(a, "GET", f"/admin/spend?key={key_id}")
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        stored = [sum(row[f] for row in rows) for f in ("requests", "prompt_tokens", "completion_tokens")]
        assert stored == [day["requests"], day["prompt_tokens"], day["completion_tokens"]] == [LINES, 0, 0], day
        assert day["tokens"] == 0 and day.get("spend", 0) == 0 and leases(w, key_id) == 0
        assert scrape(a.url, "gateway_batch_lines_total", outcome="cancelled") == LINES
