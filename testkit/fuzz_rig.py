"""The setup the fuzz suite (tests/test_fuzz.py) and the soak (bench/soak.py) attack: two gateway
replicas with keys on, one private redis-server, one store (SQLite, or PostgreSQL), a fast fake engine; and the
world on it (client keys, keys to patch and revoke, a file and a batch) that the strategies of
testkit/hostile.py aim at. `after_checks` is what must hold once the attack is over."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from gateway.observe.access_log import FIELDS
from testkit.hostile_http import BATCH_LINE, World
from testkit.keyed import ADMIN_KEY
from testkit.procs import TINY_MODEL, Proc, fake_upstream, gateway
from testkit.redis_server import RedisServer

MODELS = ["fake", "counted", "canary", "lora-a"]


def config(redis_url: str, engine_url: str, data_dir: Path, store_url: str = "sqlite:///fuzz.db") -> dict[str, Any]:
    return {
        "server": {"drain_grace": 0, "drain_timeout": 2},
        "health": {"interval": 0.5},
        "redis": {"url": redis_url, "timeout": 1.0},  # a loaded 2-core machine: no false outages
        "auth": {"enabled": True, "default_max_tokens": 16},
        "store": {"url": store_url, "data_dir": str(data_dir)},
        "batch": {"min_completion_window": 60, "poll_interval": 0.5},
        "inference_log": {"flush_interval": 0.2},
        "routing": {"strategy": "prefix_affinity"},
        "cache": {"max_memory": 200_000},  # on for `fake` only (its model entry)
        "adapters": {
            "directories": [str(data_dir / "adapters")],
            "uris": ["s3://fuzz/"],
            "models": [{"name": "lora-a", "base": "fake", "path": str(data_dir / "adapters" / "a")}],
        },
        "engines": [
            {"name": "fake", "kind": "openai", "url": engine_url},
            {"name": "fake-b", "kind": "openai", "url": engine_url},
        ],
        "models": [
            {"name": "fake", "routes": [{"engine": "fake"}], "cache": True},
            {
                "name": "counted",
                "routes": [{"engine": "fake-b", "model": "fake"}],
                "tokenizer": str(TINY_MODEL),
                "max_prompt_bytes": 100_000,
            },
            {
                "name": "canary",
                "assignment": "sticky",
                "routes": [{"engine": "fake", "weight": 90}, {"engines": ["fake", "fake-b"], "weight": 10}],
                "log_payloads": {"sample": 1.0, "redact": ["user", "re:\\d{4,}"], "max_bytes": 4096},
            },
        ],
    }


def _call(client: httpx.Client, method: str, url: str, key: str, **kwargs: Any) -> Any:
    r = client.request(method, url, headers={"authorization": f"Bearer {key}"}, **kwargs)
    assert r.status_code < 300, (method, url, r.status_code, r.text)
    return r.json()


def seed(client: httpx.Client, base: str) -> World:
    """Keys, a file and a batch on the gateway at `base`."""

    def key(**fields: Any) -> dict[str, Any]:
        return dict(_call(client, "POST", base + "/admin/keys", ADMIN_KEY, json={"name": "fuzz", **fields}))

    open_key = key()
    limited = key(tpm=10**9, daily_tokens=10**12, monthly_tokens=10**13)  # counted, never exhausted
    narrow = key(models=["fake", "counted"], rpm=10**6)
    revoked = key()
    _call(client, "DELETE", f"{base}/admin/keys/{revoked['id']}", ADMIN_KEY)
    victims = [key(rpm=5)["id"] for _ in range(3)]
    secret = open_key["key"]
    lines = "\n".join(json.dumps({**BATCH_LINE, "custom_id": f"l{i}"}) for i in range(3)).encode()

    def upload() -> str:
        files = {"file": ("in.jsonl", lines)}
        return str(_call(client, "POST", base + "/v1/files", secret, data={"purpose": "batch"}, files=files)["id"])

    file_id, victim_file = upload(), upload()
    spec = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch_id = _call(client, "POST", base + "/v1/batches", secret, json=spec)["id"]
    response_id = _call(client, "POST", base + "/v1/responses", secret, json={"model": "fake", "input": "hi"})["id"]
    return World(
        admin_key=ADMIN_KEY,
        client_secrets=[secret, limited["key"], narrow["key"]],
        other_secrets=[revoked["key"]],
        key_ids=[open_key["id"], limited["id"], narrow["id"]],
        victim_ids=victims,
        file_ids=[file_id],
        victim_file_ids=[victim_file],
        batch_ids=[batch_id],
        models=list(MODELS),
        response_ids=[response_id],
    )


@contextmanager
def rig(
    logs: Path, redis: RedisServer, name: str = "fuzz", store_url: str = "sqlite:///fuzz.db"
) -> Iterator[tuple[World, list[Proc]]]:
    """The engine and both replicas started on one store (SQLite by default, or a PostgreSQL URL),
    the world seeded; everything stopped at the end."""
    redis.fresh()
    with ExitStack() as stack:
        engine = fake_upstream(logs, "--model", "fake", "--chunks", "3", name=f"{name}-engine").start()
        stack.callback(engine.stop)
        engine.wait_healthy()
        data_dir = logs / f"{name}-store"
        data_dir.mkdir(exist_ok=True)
        cfg = config(redis.url, engine.url, data_dir, store_url)
        replicas = []
        for i in range(2):
            proc = gateway(logs, cfg, name=f"{name}-gw{i}", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
            stack.callback(proc.stop)
            replicas.append(proc)
        for proc in replicas:
            proc.wait_healthy("/ready", timeout=90)
        with httpx.Client(timeout=30) as client:
            world = seed(client, replicas[0].url)
        world.replicas = [p.url for p in replicas]
        yield world, replicas


def after_checks(world: World, replicas: list[Proc]) -> list[str]:
    """What must hold after any attack: every replica alive and ready, the key list and the model
    routes readable everywhere, the seeded client key still served, no traceback in any log."""
    problems = []
    headers = {"authorization": f"Bearer {world.admin_key}"}
    body = {"model": "fake", "messages": [{"role": "user", "content": "still there?"}]}
    with httpx.Client(timeout=30) as client:
        for proc in replicas:
            for path in ("/health", "/ready", "/admin/keys", "/admin/models", "/admin/engines", "/v1/models"):
                auth = headers if path.startswith("/admin") else {"authorization": f"Bearer {world.client_secrets[0]}"}
                r = client.get(proc.url + path, headers=auth)
                if r.status_code != 200:
                    problems.append(f"{proc.name} {path}: {r.status_code} {r.text[:300]}")
            auth = {"authorization": f"Bearer {world.client_secrets[0]}"}
            r = client.post(proc.url + "/v1/chat/completions", json=body, headers=auth)
            if r.status_code != 200:
                problems.append(f"{proc.name} chat: {r.status_code} {r.text[:300]}")
    time.sleep(0.5)  # the inference log's last writes (and the access log's)
    secrets = [world.admin_key, *world.client_secrets, *world.other_secrets]
    for proc in replicas:
        log = proc.log_path.read_text(errors="replace")
        # The access log's lines hold the clients' own text (a hostile path may read "CRITICAL"),
        # escaped inside one JSON object: only the other lines are the gateway's own records.
        records = "\n".join(line for line in log.splitlines() if not line.startswith('{"time":'))
        for marker in ("Traceback", " ERROR ", " CRITICAL "):
            if marker in records:
                at = records.index(marker)
                problems.append(f"{proc.name} log has {marker.strip()}: {records[max(0, at - 300) : at + 2500]}")
        problems += [f"{proc.name} log has a secret key" for secret in secrets if secret in log]
        access = [json.loads(line) for line in log.splitlines() if line.startswith('{"time":')]
        if not access:
            problems.append(f"{proc.name} wrote no access log line")
        problems += [
            f"{proc.name} access log line lacks fields: {line}" for line in access if list(line) != list(FIELDS)
        ]
    return problems
