"""Experiments and monitoring end to end, on both stores: a gateway (real process) in front of a
real tiny engine worker, a model split 50/50 between two routes (versions) by sticky assignment,
the inference log, `GET /admin/requests`, the model report and its drift, `llm-gateway report`,
the log across a restart, and serving on while the store is away."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from testkit.keyed import ADMIN_KEY
from testkit.metrics import metric
from testkit.poll import eventually
from testkit.procs import Proc, gateway, running
from testkit.redis_server import RedisServer
from testkit.stores import StoreEnv, sqlite_locked
from testkit.tcp_proxy import TcpProxy

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
MODEL = "ab"
UPSTREAM = "tiny-llama"  # the tiny worker's served name
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
]


def config(worker: Proc, store_url: str, data_dir: str, **log: Any) -> dict[str, Any]:
    return {
        "health": {"interval": 0.3},
        "engines": [
            {"name": "engine-a", "kind": "openai", "url": worker.url},
            {"name": "engine-b", "kind": "openai", "url": worker.url},
        ],
        "models": [
            {
                "name": MODEL,
                "assignment": "sticky",
                "routes": [
                    {"engine": "engine-a", "model": UPSTREAM, "weight": 50, "name": "v1"},
                    {"engine": "engine-b", "model": UPSTREAM, "weight": 50, "name": "v2-canary"},
                ],
            }
        ],
        "auth": {"enabled": False},
        "store": {"url": store_url, "data_dir": data_dir},
        "inference_log": {"flush_interval": 0.1, **log},
    }


def gateway_up(logs: Any, cfg: dict[str, Any], name: str = "gw-monitor") -> AbstractContextManager[Proc]:
    return running(gateway(logs, cfg, name=name, env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}), "/ready", timeout=90)


@dataclass
class Sent:
    user: str | None
    status: int
    route: str | None
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


async def _one(client: httpx.AsyncClient, url: str, job: dict[str, Any], headers: dict[str, str]) -> Sent:
    stream = job.get("stream", False)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": job.get("max_tokens", 3), "temperature": 0}
    if job.get("user"):
        body["user"] = job["user"]
    if job.get("chat"):
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": job["prompt"]}]
    else:
        path, body["prompt"] = "/v1/completions", job["prompt"]
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    r = await client.post(url + path, json=body, headers=headers)
    usage: dict[str, Any] = {}
    finish = None
    if r.status_code == 200 and stream:
        for line in r.text.splitlines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
    elif r.status_code == 200:
        answer = r.json()
        usage, finish = answer["usage"], answer["choices"][0]["finish_reason"]
    return Sent(
        job.get("user"),
        r.status_code,
        r.headers.get("x-gateway-route"),
        r.headers["x-request-id"],
        usage.get("prompt_tokens", 0),
        usage.get("completion_tokens", 0),
        finish,
    )


def send(
    url: str, jobs: list[dict[str, Any]], concurrency: int = 6, headers: dict[str, str] | None = None
) -> list[Sent]:
    async def main() -> list[Sent]:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=120) as client:

            async def bounded(job: dict[str, Any]) -> Sent:
                async with gate:
                    return await _one(client, url, job, headers or {})

            return await asyncio.gather(*(bounded(j) for j in jobs))

    return asyncio.run(main())


def log_rows(gw: Proc, **filters: Any) -> list[dict[str, Any]]:
    """Every row of /admin/requests matching `filters`, page by page (pages of 25)."""
    rows: list[dict[str, Any]] = []
    after = None
    while True:
        params = {**filters, "limit": 25, **({"after": after} if after else {})}
        r = httpx.get(gw.url + "/admin/requests", params=params, headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
        page = r.json()
        rows += page["data"]
        if not page["has_more"]:
            return rows
        after = page["last_id"]


def wait_logged(gw: Proc, count: int, timeout: float = 30.0, **filters: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = log_rows(gw, **filters)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def report(gw: Proc, **params: float) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/admin/models/{MODEL}/report", params=params, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def prompt(words: int, seed: int) -> str:
    return " ".join(WORDS[(seed + i) % len(WORDS)] for i in range(words))


def test_sticky_split_the_log_and_the_report_agree_with_what_clients_saw(
    tiny_worker: Proc, store_env: StoreEnv, tmp_path: Any
) -> None:
    users = [f"user-{i}" for i in range(40)]
    jobs = [
        {"user": u, "prompt": prompt(2 + (i + k) % 9, i), "stream": k == 1, "chat": k == 2}
        for k in range(3)
        for i, u in enumerate(users)
    ]
    with gateway_up(tmp_path, config(tiny_worker, store_env.url, str(store_env.data_dir))) as gw:
        started = time.time()
        sent = send(gw.url, jobs)
        until = time.time() + 1
        assert all(s.status == 200 for s in sent), [s for s in sent if s.status != 200][:3]

        # Sticky: one version per user across all their requests, about half the users on each.
        routes_of: dict[str | None, set[str | None]] = defaultdict(set)
        for s in sent:
            routes_of[s.user].add(s.route)
        assert all(len(r) == 1 for r in routes_of.values()), routes_of
        per_user = Counter(next(iter(r)) for r in routes_of.values())
        assert set(per_user) == {"v1", "v2-canary"} and 10 <= per_user["v1"] <= 30, per_user

        # The log: one row per request, every field as the client saw it.
        rows = wait_logged(gw, len(sent), model=MODEL)
        assert sorted(r["request_id"] for r in rows) == sorted(s.request_id for s in sent)
        assert len({r["id"] for r in rows}) == len(rows)  # pages neither repeat nor skip
        by_id = {r["request_id"]: r for r in rows}
        for s in sent:
            row = by_id[s.request_id]
            assert (row["route"], row["status"], row["finish_reason"]) == (s.route, 200, s.finish_reason)
            assert (row["prompt_tokens"], row["completion_tokens"]) == (s.prompt_tokens, s.completion_tokens)
            assert row["engine"] == ("engine-a" if s.route == "v1" else "engine-b")
        assert {r["stream"] for r in rows} == {True, False}
        assert all((r["ttft"] is not None) == r["stream"] for r in rows)
        v1 = [s for s in sent if s.route == "v1"]
        assert len(log_rows(gw, route="v1", since=started, until=until)) == len(v1)
        assert log_rows(gw, status=500) == []

        # The report: counts and token sums per version equal what the clients got.
        rep = report(gw, since=started - 1, until=until)
        assert [r["route"] for r in rep["routes"]] == ["v1", "v2-canary"]
        for r in rep["routes"]:
            mine = [s for s in sent if s.route == r["route"]]
            assert r["requests"] == len(mine) and r["errors"] == 0 and r["error_rate"] == 0
            assert r["prompt_tokens"] == sum(s.prompt_tokens for s in mine)
            assert r["completion_tokens"] == sum(s.completion_tokens for s in mine)
            assert r["finish_reasons"] == dict(Counter(s.finish_reason for s in mine))
            assert 0 < r["latency_p50"] <= r["latency_p95"] and 0 < r["ttft_p50"] <= r["ttft_p95"]
            assert r["output_tokens_per_second"] > 0
        metrics = httpx.get(gw.url + "/metrics").text
        assert metric(metrics, "gateway_requests_total", model=MODEL, route="v1", status="200") == len(v1)
        assert metric(metrics, "gateway_time_to_first_token_seconds_count", route="v1") == sum(
            1 for j, s in zip(jobs, sent, strict=True) if s.route == "v1" and j["stream"]
        )

        # The same report as a table from the command line.
        cli = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "report", MODEL, "--url", gw.url, "--since", str(started - 1)],
            env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        table = cli.stdout.splitlines()
        v1_line = next(line for line in table if line.startswith("v1 "))
        assert v1_line.split()[1] == str(len(v1))
        assert any(line.startswith("v2-canary ") for line in table) and "drift" in cli.stdout


def test_drift_flags_a_shifted_prompt_length_and_not_an_unchanged_one(
    tiny_worker: Proc, store_env: StoreEnv, tmp_path: Any
) -> None:
    mix = [prompt(2 + i % 6, i) for i in range(30)]  # 2 to 7 words
    longer = [prompt(14 + i % 6, i) for i in range(30)]  # 14 to 19 words
    with gateway_up(tmp_path, config(tiny_worker, store_env.url, str(store_env.data_dir))) as gw:
        marks = [time.time()]
        for prompts in (mix, mix, longer):  # baseline, the same traffic again, longer prompts
            sent = send(gw.url, [{"user": f"u{i}", "prompt": p, "max_tokens": 2} for i, p in enumerate(prompts)])
            assert all(s.status == 200 for s in sent)
            marks.append(time.time())
        wait_logged(gw, 90, model=MODEL)
        baseline = {"baseline_since": marks[0], "baseline_until": marks[1]}
        same = report(gw, since=marks[1], until=marks[2], **baseline)
        shifted = report(gw, since=marks[2], until=marks[3], **baseline)
        default = report(gw, since=marks[2], until=marks[3])  # baseline: as long, just before
    assert same["drift"]["prompt_tokens"]["baseline_count"] == 30
    assert same["drift"]["prompt_tokens"]["current_count"] == 30
    assert not same["drifted"] and same["drift"]["prompt_tokens"]["psi"] < 0.2
    assert shifted["drift"]["prompt_tokens"]["drifted"] and shifted["drift"]["prompt_tokens"]["psi"] > 0.2
    assert shifted["drifted"]
    assert default["baseline"]["until"] == default["window"]["since"] == shifted["window"]["since"]
    assert default["drift"]["prompt_tokens"]["current_count"] == 30


def test_the_log_survives_a_restart(tiny_worker: Proc, store_env: StoreEnv, tmp_path: Any) -> None:
    cfg = config(tiny_worker, store_env.url, str(store_env.data_dir))
    # The first gateway would write only after a minute: its rows are still held when it stops.
    lazy = config(tiny_worker, store_env.url, str(store_env.data_dir), flush_interval=60)
    with gateway_up(tmp_path, lazy, "gw-first") as gw:
        first = send(gw.url, [{"user": f"u{i}", "prompt": "hello there"} for i in range(5)])
        assert log_rows(gw) == []
    # SIGTERM: the gateway writes what it holds before it exits; a new one reads it back.
    with gateway_up(tmp_path, cfg, "gw-second") as gw:
        assert sorted(r["request_id"] for r in log_rows(gw)) == sorted(s.request_id for s in first)
        second = send(gw.url, [{"user": f"u{i}", "prompt": "hello again"} for i in range(3)])
        rows = wait_logged(gw, 8)
        assert sorted(r["request_id"] for r in rows) == sorted(s.request_id for s in first + second)


@contextmanager
def store_away(store_env: StoreEnv, proxy: TcpProxy | None) -> Iterator[None]:
    """SQLite: another process holds the database's write lock (every write waits); PostgreSQL:
    the proxy the gateway reaches it through is stopped (connections cut, new ones refused)."""
    if proxy is not None:
        proxy.stop()
        try:
            yield
        finally:
            proxy.start()
        return
    with sqlite_locked(store_env):
        yield


def settled(gw: Proc, total: int, timeout: float = 40.0) -> tuple[list[str], float]:
    """The logged request ids and the drop count, once they account for `total` requests."""
    deadline = time.monotonic() + timeout
    while True:
        ids = [r["request_id"] for r in log_rows(gw)]
        dropped = metric(httpx.get(gw.url + "/metrics").text, "gateway_inference_log_dropped_total")
        if len(ids) + dropped >= total or time.monotonic() > deadline:
            return ids, dropped
        time.sleep(0.2)


def test_serving_goes_on_while_the_store_is_away_and_drops_are_counted(
    tiny_worker: Proc, store_env: StoreEnv, tmp_path: Any
) -> None:
    proxy = None
    url = store_env.url
    if store_env.backend == "postgresql":
        parts = urlsplit(url)
        proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
        url = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    cfg = config(tiny_worker, url, str(store_env.data_dir), buffer_size=8, flush_rows=4, flush_interval=0.05)
    try:
        with gateway_up(tmp_path, cfg) as gw:
            before = send(gw.url, [{"user": f"u{i}", "prompt": "hi"} for i in range(3)])
            assert len(wait_logged(gw, 3)) == 3
            with store_away(store_env, proxy):
                started = time.monotonic()
                during = send(gw.url, [{"user": f"u{i}", "prompt": "hi", "max_tokens": 1} for i in range(30)])
                assert all(s.status == 200 for s in during)
                assert time.monotonic() - started < 60

                def dropped_and_errors() -> tuple[float, float]:
                    text = httpx.get(gw.url + "/metrics").text
                    return metric(text, "gateway_inference_log_dropped_total"), metric(
                        text, "gateway_inference_log_write_errors_total"
                    )

                # at most buffer_size rows held (the last may still come); PostgreSQL's writes
                # fail meanwhile, SQLite's wait for the lock
                eventually(
                    dropped_and_errors,
                    lambda seen: seen[0] >= 30 - 8 - 1 and (proxy is None or seen[1] >= 1),
                    timeout=30,
                    what="rows dropped (and write errors) while the store is away",
                )
            # The store is back: what was held is written (once the writer's backoff ends), then
            # new rows follow. Every request is in the log or counted as dropped, never both.
            sent = {s.request_id for s in before + during}
            ids, dropped = settled(gw, len(sent))
            assert len(ids) == len(set(ids)) and set(ids) <= sent
            assert 22 <= dropped <= 30 and len(ids) + dropped == 33
            after = send(gw.url, [{"user": "late", "prompt": "hi"}])
            ids, dropped = settled(gw, 34)
            assert after[0].request_id in ids and len(ids) + dropped == 34
    finally:
        if proxy is not None:
            proxy.close()


def test_admin_requests_refuses_bad_parameters(tiny_worker: Proc, tmp_path: Any) -> None:
    cfg = config(tiny_worker, "sqlite:///log.db", str(tmp_path))
    with gateway_up(tmp_path, cfg) as gw:
        for params, param in (
            ({"limit": "0"}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"status": "42"}, "status"),
            ({"since": "yesterday"}, "since"),
            ({"until": "-5"}, "until"),
            ({"after": "1.5"}, "after"),
            ({"after": "9" * 5000}, "after"),  # past int()'s 4,300 digits: was a 500 (fuzz)
            ({"limit": "²"}, "limit"),
            ({"colour": "red"}, "colour"),
        ):
            r = httpx.get(gw.url + "/admin/requests", params=params, headers=ADMIN)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (params, r.text)
        r = httpx.get(gw.url + "/admin/requests?route=v1&route=v2", headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "route"
        bad_window = {"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}
        r = httpx.get(f"{gw.url}/admin/models/{MODEL}/report", params=bad_window, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"
        assert httpx.get(f"{gw.url}/admin/models/nope/report", headers=ADMIN).status_code == 404
        assert httpx.get(gw.url + "/admin/requests").status_code == 401
        r = httpx.get(gw.url + "/admin/requests", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
        ok = httpx.get(gw.url + "/admin/requests", params={"since": "1800000000", "limit": "5"}, headers=ADMIN)
        assert ok.status_code == 200 and ok.json()["data"] == []


def test_without_a_user_the_api_key_is_the_sticky_subject(
    tiny_worker: Proc, redis_server: RedisServer, tmp_path: Any
) -> None:
    cfg = config(tiny_worker, "sqlite:///log.db", str(tmp_path))
    cfg |= {"redis": {"url": redis_server.url}, "auth": {"enabled": True}}
    with gateway_up(tmp_path, cfg) as gw:
        keys = []
        for i in range(12):
            r = httpx.post(gw.url + "/admin/keys", json={"name": f"team-{i}"}, headers=ADMIN)
            assert r.status_code == 201, r.text
            keys.append((r.json()["id"], r.json()["key"]))
        jobs = [(key_id, {"prompt": "hi", "max_tokens": 1}) for _ in range(3) for key_id, _ in keys]
        secrets = dict(keys)
        seen: dict[str, set[str | None]] = defaultdict(set)
        for key_id, job in jobs:
            (s,) = send(gw.url, [job], headers={"authorization": f"Bearer {secrets[key_id]}"})
            assert s.status == 200
            seen[key_id].add(s.route)
        assert all(len(r) == 1 for r in seen.values()), seen
        key_id = keys[0][0]
        rows = wait_logged(gw, 3, key_id=key_id)
        assert len(rows) == 3 and {r["key_id"] for r in rows} == {key_id}
        assert {r["route"] for r in rows} == seen[key_id]
