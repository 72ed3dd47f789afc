"""A replica dies mid-batch: two gateway replicas share a PostgreSQL store and a Redis; the one
holding the batch's lease is SIGKILLed half-way; the other takes the batch over and finishes it.

Every custom_id ends up exactly once in the output. The fake engine counts how often it ran each
line (the line's `user` is its custom_id): only lines the dead replica had in flight or had
finished without recording yet run twice. The key is charged once per line all the same, exactly
the usage of the results in the output (a rerun replaces the charge of the run before it), and
no batch lease is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import psutil

from testkit.batch import (
    assert_each_once,
    client,
    jsonl,
    results,
    store_url,
    wait_final,
)
from testkit.keyed import admin, create_key, start_gateway, usage
from testkit.procs import Proc, fake_upstream
from testkit.redis_server import RedisServer

log = logging.getLogger(__name__)
LINES = 500
CONCURRENCY = 8


def replica_pids(replica: Proc) -> set[int]:
    """The replica's main process and its worker processes (they run the batches)."""
    assert replica.proc is not None
    main = psutil.Process(replica.proc.pid)
    return {main.pid, *(child.pid for child in main.children(recursive=True))}


def test_a_replica_killed_mid_batch(logs_dir: Path, tmp_path: Path, redis_server: RedisServer) -> None:
    fake = fake_upstream(logs_dir, "--model", "fake", "--chunks", "4", "--delay-ms", "40", "--count", name="fake-crash")
    fake.start().wait_healthy()
    replicas = []
    try:
        with store_url("postgresql", tmp_path) as store:
            config = {
                "health": {"interval": 0.3},
                "redis": {"url": redis_server.url, "timeout": 1.0},
                "auth": {"enabled": True},
                "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
                "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
                "store": store,
                "batch": {
                    "concurrency": CONCURRENCY,
                    "claim_size": 8,
                    "poll_interval": 0.2,
                    "lease_ttl": 2,
                    "claim_ttl": 3,
                },
            }
            replicas = [start_gateway(logs_dir, config, f"gw-crash-{name}") for name in ("a", "b")]
            run_and_kill(replicas, fake.url, redis_server)
    finally:
        for proc in replicas:
            proc.stop()
        fake.stop()


def run_and_kill(replicas: list[Proc], fake_url: str, redis_server: RedisServer) -> None:
    key_id, secret = create_key(replicas[0], daily_tokens=10_000_000)
    c = client(replicas[0], secret)
    ids = [f"line-{i:03d}" for i in range(LINES)]
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "user": cid},
        }
        for cid in ids
    ]
    f = c.files.create(file=("crash.jsonl", jsonl(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    # Wait until it is well under way, then kill whichever replica runs it.
    deadline = time.monotonic() + 120
    while True:
        view = admin(replicas[0], "GET", f"/admin/batches/{batch.id}").json()
        if view["request_counts"]["completed"] >= LINES // 4 and view["lease_holder"]:
            break
        assert view["status"] == "in_progress" and time.monotonic() < deadline, view
        time.sleep(0.05)
    holder_pid = int(view["lease_holder"].split(":")[1])  # a worker process of one replica
    [victim] = [p for p in replicas if holder_pid in replica_pids(p)]
    [survivor] = [p for p in replicas if p is not victim]
    for pid in replica_pids(victim):  # the whole replica dies at once, as a machine would
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.kill()
    at_kill = view["request_counts"]["completed"]
    survivor_client = client(survivor, secret)
    done = wait_final(survivor_client, batch.id, timeout=180)
    assert done.status == "completed" and done.request_counts.completed == LINES, done
    output, errors = results(survivor_client, done)
    assert_each_once(ids, output, errors)
    assert not errors
    taken_over = admin(survivor, "GET", f"/admin/batches/{batch.id}").json()
    assert taken_over["lease_holder"] is None  # finalized; the survivor's log shows it ran it

    counts: dict[str, int] = httpx.get(fake_url + "/counts").json()
    assert sorted(counts) == ids and all(n >= 1 for n in counts.values())
    twice = sorted(cid for cid, n in counts.items() if n > 1)
    assert all(counts[cid] == 2 for cid in twice)
    # Re-run lines are only those in flight or unrecorded when the replica died.
    assert len(twice) <= 4 * CONCURRENCY
    # Charged once per line, exactly what the recorded results used, whatever ran twice.
    day = usage(survivor, key_id)["day"]
    seen = {
        f: sum(line["response"]["body"]["usage"][f] for line in output) for f in ("prompt_tokens", "completion_tokens")
    }
    assert day["requests"] == LINES, day
    assert (day["prompt_tokens"], day["completion_tokens"]) == (seen["prompt_tokens"], seen["completion_tokens"]), day
    assert day["tokens"] == seen["prompt_tokens"] + seen["completion_tokens"], day
    with redis_server.client() as r:
        assert r.zcard(f"gw:{{{key_id}}}:bleases") == 0  # the dead replica's leases went with its lines
    print(  # the figures the report quotes (pytest -s)
        f"\ncrash: killed at {at_kill}/{LINES} done; engine ran {len(twice)} lines twice {twice}; "
        f"charged {day['requests']} requests, {day['tokens']} tokens: one run of each line"
    )
