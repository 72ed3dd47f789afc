"""Edges of issue 20 on a real gateway (auth off, SQLite store, a fake engine): no redirect built
from the client's Host header, security headers on every /ui answer, and a batch line naming a
model of another endpoint refused when the batch is created."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from gateway.front.routes.console import SECURITY_HEADERS
from gateway.settings import ConfigError, load_settings
from testkit.procs import Proc, fake_upstream, gateway, write_config


@pytest.fixture(scope="module")
def gw(logs_dir: Path) -> Iterator[Proc]:
    engine = fake_upstream(logs_dir, "--model", "fake", "--chunks", "2", name="edges-engine").start()
    data = logs_dir / "edges-store"
    data.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {
        "auth": {"enabled": False},
        "store": {"url": "sqlite:///edges.db", "data_dir": str(data)},
        "engines": [{"name": "fake", "kind": "openai", "url": engine.url}],
        "models": [
            {"name": "chatty", "routes": [{"engine": "fake", "model": "fake"}], "endpoints": ["chat", "completions"]},
            {"name": "embedder", "routes": [{"engine": "fake", "model": "fake"}], "endpoints": ["embeddings"]},
        ],
    }
    proc = gateway(logs_dir, cfg, name="edges").start()
    try:
        engine.wait_healthy()
        proc.wait_healthy("/ready", timeout=60)
        yield proc
    finally:
        proc.stop()
        engine.stop()


def raw_get(port: int, target: str, host: str) -> tuple[int, dict[str, str]]:
    """GET with the request target byte for byte (HTTP clients normalise `/ui/app.js/..`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


@pytest.mark.parametrize(
    ("target", "location"),
    [("/ui/.", "./"), ("/ui/%2e", "./"), ("/ui/app.js/..", "../"), ("/ui", "ui/")],
)
def test_ui_redirects_are_relative_and_secured(gw: Proc, target: str, location: str) -> None:
    status, headers = raw_get(gw.port, target, "evil.example")
    assert status in (307, 308), (status, headers)
    assert headers["location"] == location
    assert "evil.example" not in json.dumps(headers)
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, name
    # ...and the relative reference, resolved as a browser does, is the console's folder
    resolved = urljoin(gw.url + target.replace("%2e", "."), location)
    assert resolved == gw.url + "/ui/"
    assert httpx.get(resolved, timeout=10).status_code == 200


@pytest.mark.parametrize("target", ["/ui/nope.js", "/ui/%00", "/ui/../../etc/passwd", "/ui/", "/ui/app.js"])
def test_every_ui_answer_has_the_security_headers(gw: Proc, target: str) -> None:
    status, headers = raw_get(gw.port, target, "evil.example")
    assert status in (200, 404), status
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (target, name)
    for path in ("/ui/app.js", "/ui"):
        r = httpx.post(gw.url + path, timeout=10)
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", path
        assert r.headers["content-security-policy"] == SECURITY_HEADERS["content-security-policy"], path


def submit(gw: Proc, endpoint: str, models: list[str]) -> dict[str, Any]:
    url = endpoint
    lines = []
    for i, model in enumerate(models):
        body: dict[str, Any] = {"model": model, "max_tokens": 2}
        if endpoint == "/v1/embeddings":
            body = {"model": model, "input": "hello"}
        elif endpoint == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}))
    files = {"file": ("in.jsonl", "\n".join(lines).encode())}
    up = httpx.post(gw.url + "/v1/files", data={"purpose": "batch"}, files=files, timeout=30)
    assert up.status_code == 200, up.text
    spec = {"input_file_id": up.json()["id"], "endpoint": endpoint, "completion_window": "24h"}
    r = httpx.post(gw.url + "/v1/batches", json=spec, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_batch_line_for_a_model_of_another_endpoint_fails_at_creation(gw: Proc) -> None:
    batch = submit(gw, "/v1/chat/completions", ["chatty", "embedder", "chatty"])
    assert batch["status"] == "failed"
    errors = batch["errors"]["data"]
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [(2, "model_not_supported", "body.model")]
    assert "/v1/chat/completions" in errors[0]["message"] and "embeddings" in errors[0]["message"]
    wrong_way = submit(gw, "/v1/embeddings", ["embedder", "chatty"])
    assert [(e["line"], e["code"]) for e in wrong_way["errors"]["data"]] == [(2, "model_not_supported")]
    assert submit(gw, "/v1/completions", ["chatty"])["status"] in ("validating", "in_progress", "completed")


def test_endpoints_are_inferred_for_the_bundled_engines(tmp_path: Path) -> None:
    cfg = {
        "auth": {"enabled": False},
        "engines": [
            {"name": "lm", "kind": "cpu", "model": "engines/tiny_model/tiny-llama", "port": 18101},
            {"name": "embed", "kind": "cpu", "model": "all-MiniLM-L6-v2", "port": 18102},
            {"name": "ext", "kind": "openai", "url": "http://127.0.0.1:9"},
        ],
        "models": [
            {"name": "tiny", "routes": [{"engine": "lm"}]},
            {"name": "minilm", "routes": [{"engine": "embed"}]},
            {"name": "remote", "routes": [{"engine": "ext"}]},
            {"name": "told", "routes": [{"engine": "ext"}], "endpoints": ["completions"]},
        ],
    }
    models = {m.name: m for m in load_settings(write_config(tmp_path, "inferred", cfg)).models}
    assert models["tiny"].endpoints == ("chat", "completions")
    assert models["minilm"].endpoints == ("embeddings",)
    assert models["remote"].endpoints is None and models["remote"].serves("embeddings")
    assert models["told"].endpoints == ("completions",) and not models["told"].serves("chat")
    bad = {**cfg, "models": [{"name": "x", "routes": [{"engine": "ext"}], "endpoints": ["chat", "images"]}]}
    with pytest.raises(ConfigError, match=r"models\[0\]\.endpoints"):
        load_settings(write_config(tmp_path, "bad", bad))
