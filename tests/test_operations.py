"""Operations on real processes: HTTPS with a self-signed certificate (the openai SDK in front, a
verified https:// engine behind), the admin listener split from the public one, readiness per
model, and a second gateway with the same config refused instead of hijacking the first one's
engines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from testkit.ci import require
from testkit.keyed import ADMIN_KEY
from testkit.poll import eventually
from testkit.procs import TINY_MODEL, Proc, cpu_engine, free_port, gateway, write_config
from testkit.redis_server import RedisServer
from testkit.tls import self_signed


def fake_config(fake_engine: Proc, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "health": {"interval": 0.3},
        "engines": [{"name": "fake", "kind": "openai", "url": fake_engine.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "auth": {"enabled": False},
    }


def test_tls_through_the_openai_sdk_and_to_an_https_engine(logs_dir: Path, tmp_path: Path, fake_engine: Proc) -> None:
    cert, key = self_signed(tmp_path)
    front = gateway(logs_dir, fake_config(fake_engine, tls={"cert": str(cert), "key": str(key)}), name="tls")
    front.start()
    https = f"https://127.0.0.1:{front.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(https + "/ready", verify=str(cert), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, front.log_tail()
            time.sleep(0.2)
        with httpx.Client(verify=str(cert)) as http:
            client = openai.OpenAI(base_url=https + "/v1", api_key="none", http_client=http, max_retries=0)
            reply = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
            chunks = list(client.completions.create(model="fake", prompt="x", max_tokens=4, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(httpx.ConnectError):  # plain HTTP on the TLS port, or an unknown CA
            httpx.get(https + "/health", timeout=5)

        # A gateway whose engine is the TLS gateway: verified against the CA file.
        engine = {"name": "tls", "kind": "openai", "url": https, "ca_file": str(cert)}
        back_config = {
            "health": {"interval": 0.3},
            "engines": [engine],
            "models": [{"name": "chained", "routes": [{"engine": "tls", "model": "fake"}]}],
            "auth": {"enabled": False},
        }
        back = gateway(logs_dir, back_config, name="tls-back").start()
        unverified = gateway(
            logs_dir,
            {**back_config, "engines": [{k: v for k, v in engine.items() if k != "ca_file"}]},
            name="tls-nocafile",
        ).start()
        try:
            back.wait_healthy("/ready", timeout=60)
            r = httpx.post(
                back.url + "/v1/completions", json={"model": "chained", "prompt": "x", "max_tokens": 2}, timeout=30
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            # Without the CA file the certificate is not trusted: the engine never becomes healthy.
            unverified.wait_healthy("/health", timeout=60)
            eventually(
                lambda: "CERTIFICATE_VERIFY_FAILED" in unverified.log_path.read_text(),
                timeout=30,
                what="a refused check",
            )
            assert httpx.get(unverified.url + "/ready", timeout=5).status_code == 503
        finally:
            back.stop()
            unverified.stop()
    finally:
        front.stop()


def test_admin_listener_is_split_from_the_public_one(
    logs_dir: Path, fake_engine: Proc, redis_server: RedisServer
) -> None:
    admin_port = free_port()
    cfg = fake_config(fake_engine, admin_port=admin_port)
    cfg["redis"] = {"url": redis_server.url, "timeout": 1.0}
    cfg["auth"] = {"enabled": True}
    gw = gateway(logs_dir, cfg, name="admin-split", env={"GATEWAY_ADMIN_KEY": ADMIN_KEY}).start()
    admin = f"http://127.0.0.1:{admin_port}"
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        gw.wait_healthy("/ready", timeout=60)
        for path in ("/admin/keys", "/metrics"):
            r = httpx.get(gw.url + path, headers=auth, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
        created = httpx.post(admin + "/admin/keys", json={"name": "k"}, headers=auth, timeout=10)
        assert created.status_code == 201
        assert httpx.post(gw.url + "/admin/keys", json={"name": "k"}, headers=auth, timeout=10).status_code == 404
        assert "gateway_requests_total" in httpx.get(admin + "/metrics", timeout=10).text
        assert (
            httpx.get(admin + "/v1/models", timeout=10).status_code == 401
        )  # /v1 on the admin port too (the console's playground), with the same auth
        for base in (gw.url, admin):
            assert httpx.get(base + "/health", timeout=10).status_code == 200
            assert httpx.get(base + "/ready", timeout=10).status_code == 200
        secret = created.json()["key"]
        r = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}, timeout=10)
        assert r.status_code == 200
    finally:
        gw.stop()


def test_readiness_per_model(logs_dir: Path, fake_engine: Proc) -> None:
    dead = free_port()  # nothing listens there
    cfg = fake_config(fake_engine)
    cfg["engines"].append({"name": "dead", "kind": "openai", "url": f"http://127.0.0.1:{dead}"})
    cfg["models"].append({"name": "down", "routes": [{"engine": "dead"}]})
    gw = gateway(logs_dir, cfg, name="ready-models").start()
    try:
        gw.wait_healthy("/ready", timeout=60)
        body = httpx.get(gw.url + "/ready", timeout=10).json()
        assert body["models"] == {"fake": True, "down": False}
        assert body["model_states"] == {"fake": "ready", "down": "unavailable"}  # not cold: no engine is coming
        assert httpx.get(gw.url + "/ready?model=fake", timeout=10).status_code == 200
        down = httpx.get(gw.url + "/ready?model=down", timeout=10)
        assert down.status_code == 503 and down.json()["engine_states"]["dead"] == "unhealthy"
        assert httpx.get(gw.url + "/ready?model=nope", timeout=10).status_code == 404
    finally:
        gw.stop()


def test_a_second_gateway_with_the_same_config_fails_clearly(logs_dir: Path) -> None:
    require((TINY_MODEL / "config.json").exists(), "tiny model missing")
    engine_port = free_port()
    cfg = {
        "health": {"interval": 0.3},
        "engines": [cpu_engine("a", engine_port)],
        "models": [{"name": "tiny", "routes": [{"engine": "a"}]}],
        "auth": {"enabled": False},
    }
    first = gateway(logs_dir, cfg, name="first").start()
    try:
        first.wait_healthy("/ready", timeout=120)
        path = write_config(logs_dir, "second", cfg)
        second = subprocess.run(
            [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(path), "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert f"engine a: port {engine_port}" in second.stderr and "another gateway" in second.stderr
        body = {"model": "tiny", "prompt": "The", "max_tokens": 2}
        assert httpx.post(first.url + "/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        first.stop()
