"""The chaos suite: two gateway replicas under steady load while processes die and stall at random.

Two replicas share a private Redis (append-only, fsync always: a SIGKILL loses nothing) and a
PostgreSQL database of their own, reached through a TCP proxy (tests/tcp_proxy.py) so the
machine's server itself is never touched. Fake engines (testkit/fake_upstream.py) keep it fast.
Several keys send chats and streams to either replica while a batch runs; meanwhile, at seeded
random moments, one at a time: an engine is SIGKILLed (then restarted) or SIGSTOPped (then
continued), a replica's worker is SIGKILLed (its main process starts another) or SIGSTOPped,
a replica's main process is SIGKILLed (then the replica is started again), Redis is SIGKILLed
(then restarted) and PostgreSQL is cut (the proxy drops every connection and refuses new ones).

Afterwards the invariants: no key charged more than the usage its clients saw, the batch's key
exactly the usage of its recorded lines; no concurrency lease left; every batch line done exactly once; no answer >= 500 but the documented 503s while
Redis was down; every stream complete, or ended with an error event and [DONE] (or cut with its
replica's process); no process left over.

    CHAOS_SEED=1234 pytest -m chaos tests/test_chaos.py    # replay a run (the seed is printed)
    CHAOS_SECONDS=40                                       # how long the faults go on (default 45)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import pytest

from testkit.batch import assert_each_once, client, jsonl, results, wait_final
from testkit.ci import IN_CI
from testkit.keyed import ADMIN_KEY, admin, create_key
from testkit.procs import Proc, fake_upstream, free_port, gateway
from testkit.redis_server import RedisServer
from testkit.stores import fresh_database
from testkit.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]
BATCH_CONCURRENCY = 2  # batch lines in flight per replica

SEED = int(os.environ.get("CHAOS_SEED") or secrets.randbits(32))
CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", "45"))
KEYS = 3  # interactive keys, two clients each
BATCH_LINES = 450  # about 35 s of work for the two replicas: it runs through the faults
LEASE_TTL = 5.0
PROMPT_ALLOWANCE = 64  # tokens a request the client saw no usage for may have been charged for its prompt
REDIS_GRACE = 3.0  # seconds after Redis is back in which its outage may still be answered
_TOKENS = ("prompt_tokens", "completion_tokens")


class DurableRedis(RedisServer):
    """Redis that keeps every write across a SIGKILL: the keys must outlive its restart."""

    def server_args(self) -> list[str]:
        return ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]


@dataclass
class Outcome:
    key: int
    kind: str  # chat or stream
    replica: int
    began: float
    ended: float = 0.0
    status: int | None = None
    code: str | None = None
    broken: str | None = None  # a transport error: the connection went (its replica died)
    usage: dict[str, int] | None = None
    events: int = 0  # content events of a stream
    error_events: int = 0
    done: bool = False
    finish: str | None = None


@dataclass
class Chaos:
    """What happened when: the faults' windows, to judge the outcomes against."""

    start: float = field(default_factory=time.monotonic)
    windows: list[tuple[str, int | None, float, float]] = field(default_factory=list)  # kind, replica, from, to
    pids: set[int] = field(default_factory=set)  # every gateway process seen: none may be left

    def say(self, text: str) -> None:
        print(f"[chaos {time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    def during(self, outcome: Outcome, kinds: tuple[str, ...], grace: float = 0.0) -> bool:
        return any(
            kind in kinds
            and (replica is None or replica == outcome.replica)
            and outcome.began <= end + grace
            and outcome.ended >= begin
            for kind, replica, begin, end in self.windows
        )


def usage(gw: Proc, key_id: str) -> dict[str, Any]:
    r = admin(gw, "GET", f"/admin/keys/{key_id}/usage")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _descendants(pid: int) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return set()


def _worker_pid(main: Proc) -> int:
    """The replica's worker: the child of its main process that listens on its port."""
    assert main.proc is not None
    for child in psutil.Process(main.proc.pid).children():
        with contextlib.suppress(psutil.Error):
            if any(c.laddr.port == main.port and c.status == "LISTEN" for c in child.net_connections("tcp")):
                return child.pid
    raise AssertionError(f"no worker of {main.name} listens on {main.port}")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def _chat(c: httpx.AsyncClient, url: str, secret: str, o: Outcome, i: int) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 32}
    r = await c.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"})
    o.status = r.status_code
    data = r.json()
    if r.status_code == 200:
        o.usage = data["usage"]
    else:
        o.code = data.get("error", {}).get("code")


async def _stream(c: httpx.AsyncClient, url: str, secret: str, o: Outcome, i: int) -> None:
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": f"story {i}"}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": f"Bearer {secret}"}
    async with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        o.status = r.status_code
        if r.status_code != 200:
            o.code = json.loads(await r.aread()).get("error", {}).get("code")
            return
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                o.done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    o.error_events += 1
                    continue
                o.usage = event.get("usage") or o.usage
                for choice in event.get("choices", []):
                    o.events += 1
                    o.finish = choice.get("finish_reason") or o.finish


async def _client(
    key: int, secret: str, urls: list[str], stop_at: float, outcomes: list[Outcome], rng: random.Random
) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=3)) as c:
        i = 0
        while time.monotonic() < stop_at:
            replica = rng.randrange(len(urls))
            kind = rng.choice(("chat", "stream"))
            o = Outcome(key, kind, replica, time.monotonic())
            outcomes.append(o)
            try:
                await (_chat if kind == "chat" else _stream)(c, urls[replica], secret, o, i)
            except httpx.TransportError as exc:
                o.broken = f"{type(exc).__name__}: {exc}"
            o.ended = time.monotonic()
            i += 1
            await asyncio.sleep(rng.uniform(0.02, 0.15) if o.broken is None else 0.3)


@pytest.fixture
def chaos_world(tmp_path: Path, logs_dir: Path) -> Iterator[dict[str, Any]]:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("redis-server is not on PATH (required under CI)")
        pytest.skip("redis-server is not on PATH")
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = DurableRedis(binary, free_port(), redis_dir).start()
    with contextlib.ExitStack() as stack:
        stack.callback(redis.stop)
        db_url = stack.enter_context(fresh_database("gateway_chaos"))
        db = urlsplit(db_url)
        proxy = TcpProxy(db.hostname or "127.0.0.1", db.port or 5432).start()
        stack.callback(proxy.close)
        proxied = urlunsplit(db._replace(netloc=f"{db.username}@127.0.0.1:{proxy.port}"))
        paced = ("--chunks", "24", "--pace-ms", "40")  # a stream lasts about a second
        engines = {
            "e1": fake_upstream(logs_dir, *paced, name="chaos-e1"),
            "e2": fake_upstream(logs_dir, *paced, name="chaos-e2"),
            "bulk": fake_upstream(logs_dir, "--delay-ms", "300", "--count", name="chaos-bulk"),
        }
        for e in engines.values():
            e.start()
            stack.callback(e.stop)
            stack.callback(lambda e=e: e.proc and _signal(e.proc.pid, signal.SIGCONT))
        for e in engines.values():
            e.wait_healthy()
        config = {
            "server": {"workers": 1},
            "health": {"interval": 0.3, "timeout": 0.5, "failures_to_eject": 2, "breaker_cooldown": 2.0},
            "redis": {"url": redis.url},
            "auth": {"enabled": True, "lease_ttl": LEASE_TTL},
            "store": {"url": proxied},
            "batch": {"concurrency": BATCH_CONCURRENCY, "poll_interval": 0.5, "lease_ttl": 4.0, "claim_ttl": 8.0},
            "engines": [{"name": n, "kind": "openai", "url": p.url} for n, p in engines.items()],
            "models": [
                {"name": "fake", "routes": [{"engines": ["e1", "e2"]}]},
                {"name": "bulk", "routes": [{"engine": "bulk"}]},
            ],
        }
        replicas = [gateway(logs_dir, config, name=f"chaos-r{i}", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}) for i in (0, 1)]
        for r in replicas:
            r.start()
            stack.callback(r.stop)
        for r in replicas:
            r.wait_healthy("/ready", timeout=90)
        yield {"redis": redis, "proxy": proxy, "engines": engines, "replicas": replicas}


def test_nothing_a_client_sees_breaks_under_chaos(chaos_world: dict[str, Any]) -> None:
    print(f"chaos seed {SEED} (replay: CHAOS_SEED={SEED})", flush=True)
    rng = random.Random(SEED)
    redis: DurableRedis = chaos_world["redis"]
    proxy: TcpProxy = chaos_world["proxy"]
    engines: dict[str, Proc] = chaos_world["engines"]
    replicas: list[Proc] = chaos_world["replicas"]
    chaos = Chaos()
    for r in replicas:
        assert r.proc is not None
        chaos.pids |= {r.proc.pid, *_descendants(r.proc.pid)}

    keys = [create_key(replicas[0], max_concurrent=16) for _ in range(KEYS)]
    batch_key_id, batch_secret = create_key(replicas[0])
    lines = [
        {
            "custom_id": f"line-{n}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "bulk",
                "messages": [{"role": "user", "content": f"line {n}"}],
                "max_tokens": 32,
                "user": f"line-{n}",  # the engine counts its runs of each line
            },
        }
        for n in range(BATCH_LINES)
    ]
    batches = client(replicas[0], batch_secret)
    upload = batches.files.create(file=("chaos.jsonl", jsonl(lines)), purpose="batch")
    batch = batches.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")

    # The faults, one at a time, each at least once, in a seeded order.
    kinds = ["engine_kill", "engine_stop", "worker_kill", "worker_stop", "main_kill", "redis_kill", "pg_cut"]
    rng.shuffle(kinds)
    plan = [(kind, rng.randrange(2), rng.uniform(1.0, 3.0)) for kind in kinds]

    def window(kind: str, replica: int | None, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        chaos.windows.append((kind, replica, began, time.monotonic()))

    def engine_kill(which: int) -> None:
        e = engines[("e1", "e2")[which]]
        assert e.proc is not None
        chaos.say(f"SIGKILL engine {e.name}")
        e.kill()
        time.sleep(rng.uniform(0.5, 2.0))
        e.start().wait_healthy()
        chaos.say(f"engine {e.name} restarted")

    def engine_stop(which: int) -> None:
        e = engines[("e1", "e2")[which]]
        assert e.proc is not None
        chaos.say(f"SIGSTOP engine {e.name}")
        _signal(e.proc.pid, signal.SIGSTOP)
        time.sleep(rng.uniform(2.0, 4.0))
        _signal(e.proc.pid, signal.SIGCONT)
        chaos.say(f"SIGCONT engine {e.name}")

    def worker_kill(which: int) -> None:
        r = replicas[which]
        pid = _worker_pid(r)
        chaos.say(f"SIGKILL worker {pid} of {r.name}")
        _signal(pid, signal.SIGKILL)
        r.wait_healthy("/ready", timeout=60)
        assert r.proc is not None
        chaos.pids |= _descendants(r.proc.pid)
        chaos.say(f"{r.name} serves again")

    def worker_stop(which: int) -> None:
        r = replicas[which]
        pid = _worker_pid(r)
        chaos.say(f"SIGSTOP worker {pid} of {r.name}")
        _signal(pid, signal.SIGSTOP)
        time.sleep(rng.uniform(1.0, 3.0))
        _signal(pid, signal.SIGCONT)
        chaos.say(f"SIGCONT worker {pid} of {r.name}")

    def main_kill(which: int) -> None:
        r = replicas[which]
        assert r.proc is not None
        family = {r.proc.pid, *_descendants(r.proc.pid)}
        chaos.pids |= family
        chaos.say(f"SIGKILL main process {r.proc.pid} of {r.name}")
        _signal(r.proc.pid, signal.SIGKILL)
        r.proc.wait(10)
        left = _wait_gone(family, 10)
        assert not left, f"processes of {r.name} left 10 s after its main process was killed: {sorted(left)}"
        r.start().wait_healthy("/ready", timeout=90)
        chaos.pids |= {r.proc.pid, *_descendants(r.proc.pid)}
        chaos.say(f"{r.name} started again")

    def redis_kill(_: int) -> None:
        chaos.say("SIGKILL Redis")
        redis.kill()
        time.sleep(rng.uniform(0.5, 2.0))
        redis.start()
        chaos.say("Redis restarted")

    def pg_cut(_: int) -> None:
        chaos.say("PostgreSQL cut")
        proxy.stop()
        time.sleep(rng.uniform(2.0, 4.0))
        proxy.start()
        chaos.say("PostgreSQL back")

    actions = {
        f.__name__: f for f in (engine_kill, engine_stop, worker_kill, worker_stop, main_kill, redis_kill, pg_cut)
    }
    replica_kinds = ("worker_kill", "worker_stop", "main_kill")

    def run_chaos() -> None:
        deadline = chaos.start + CHAOS_SECONDS
        for kind, which, pause in plan:
            time.sleep(pause)
            if time.monotonic() > deadline and kind != plan[-1][0]:
                chaos.say(f"out of time: {kind} skipped")
                continue
            window(kind, which if kind in replica_kinds else None, functools.partial(actions[kind], which))
        while time.monotonic() < deadline:  # the load goes on to the end
            time.sleep(0.2)

    outcomes: list[Outcome] = []
    urls = [r.url for r in replicas]

    async def load() -> None:
        stop_at = chaos.start + CHAOS_SECONDS + 2
        clients = [
            asyncio.create_task(_client(k, secret, urls, stop_at, outcomes, random.Random(SEED + 1 + 2 * k + j)))
            for k, (_, secret) in enumerate(keys)
            for j in range(2)
        ]
        await asyncio.to_thread(run_chaos)
        await asyncio.gather(*clients)

    asyncio.run(load())
    statuses: dict[str, int] = {}
    for o in outcomes:
        label = "broken" if o.broken else str(o.status)
        statuses[label] = statuses.get(label, 0) + 1
    chaos.say(f"load done: {len(outcomes)} requests: {statuses}")

    # -- the invariants ---------------------------------------------------------------------------
    problems: list[str] = []

    def bad(o: Outcome, why: str) -> None:
        problems.append(f"{why}: {o}")

    for o in outcomes:
        if o.broken is not None:
            if not chaos.during(o, replica_kinds):  # only a replica's own death cuts its connections
                bad(o, "connection broken with no replica fault")
            continue
        assert o.status is not None
        if o.status >= 500 and not (
            o.status == 503 and o.code == "quota_unavailable" and chaos.during(o, ("redis_kill",), REDIS_GRACE)
        ):
            bad(o, "an answer >= 500")
        if (
            o.kind == "stream"
            and o.status == 200
            and not ((o.done and o.error_events == 0 and o.finish is not None) or (o.done and o.error_events))
        ):
            bad(o, "a stream neither complete nor ended with an error event and [DONE]")
    served = [o for o in outcomes if o.status == 200]
    assert len(served) > len(outcomes) / 2, f"only {len(served)} of {len(outcomes)} requests served"

    # Every batch line exactly once (its engine is never touched; replicas, Redis and the store are).
    final = wait_final(batches, batch.id, timeout=120)
    output, errors = results(batches, final)
    assert_each_once([line["custom_id"] for line in lines], output, errors)
    runs = httpx.get(engines["bulk"].url + "/counts", timeout=10).json()
    rerun = sum(1 for n in runs.values() if n > 1)
    chaos.say(f"batch {final.status}: {len(output)} done, {len(errors)} failed; {rerun} lines ran more than once")

    # Charged no more than the clients saw (a request cut before its usage may have been charged
    # its prompt and the chunks it was sent).
    for k, (key_id, _) in enumerate(keys):
        mine = [o for o in outcomes if o.key == k]
        seen_prompt = sum(o.usage["prompt_tokens"] for o in mine if o.usage)
        seen_completion = sum(o.usage["completion_tokens"] if o.usage else o.events for o in mine)
        unseen = sum(1 for o in mine if o.usage is None and (o.events or o.broken))
        day = usage(replicas[0], key_id)["day"]
        if day["completion_tokens"] > seen_completion or day["prompt_tokens"] > seen_prompt + PROMPT_ALLOWANCE * unseen:
            problems.append(f"key {k} charged {day}, clients saw {seen_prompt} + {seen_completion} ({unseen} unseen)")
    # The batch's key: exactly the usage of the recorded results, each line once, though a line a
    # killed replica had run (and charged) but not yet recorded ran again on the other replica.
    day = usage(replicas[0], batch_key_id)["day"]
    prompt, completion = (sum(line["response"]["body"]["usage"][f] for line in output) for f in _TOKENS)
    charged = (day["requests"], day["prompt_tokens"], day["completion_tokens"], day["tokens"])
    if charged != (len(output) + len(errors), prompt, completion, prompt + completion):
        problems.append(
            f"the batch key charged {day}, its {len(output)} recorded lines used {prompt} + {completion} tokens"
        )

    # No concurrency lease outlives its ttl.
    time.sleep(LEASE_TTL + 1)
    with redis.client() as r:
        now_ms = int(time.time() * 1000)
        for key_id, _ in [*keys, (batch_key_id, "")]:
            for zset in ("leases", "bleases"):
                live = r.zcount(f"gw:{{{key_id}}}:{zset}", now_ms, "+inf")
                if live:
                    problems.append(f"key {key_id}: {live} {zset} left")

    # No process left over once the replicas stop.
    for r in replicas:
        assert r.proc is not None
        chaos.pids |= {r.proc.pid, *_descendants(r.proc.pid)}
        r.stop()
    left = _wait_gone(chaos.pids, 15)
    if left:
        problems.append(f"gateway processes left over: {sorted(left)}")
    if problems:  # what the replicas logged as errors: a failed run's logs may not outlive the run
        for r in replicas:
            lines = r.log_path.read_text(errors="replace").splitlines()
            errors = [i for i, line in enumerate(lines) if " ERROR " in line or line.startswith("  Traceback")]
            problems += [f"{r.name}: {line}" for i in errors[:5] for line in lines[i : i + 25]]
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems[:400])
