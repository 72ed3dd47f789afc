"""A store that cannot be opened does not stop the gateway: interactive requests are served, the
Files and Batches endpoints answer 503 `store_unavailable`, and the log says why."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.procs import fake_upstream, free_port, gateway


def test_the_gateway_serves_without_its_store(logs_dir: Path, tmp_path: Path) -> None:
    fake = fake_upstream(logs_dir, "--model", "fake", "--chunks", "2", name="fake-nostore").start()
    nothing = free_port()  # nothing listens here
    config = {
        "auth": {"enabled": False},
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "store": {"url": f"postgresql://postgres@127.0.0.1:{nothing}/gateway"},
    }
    gw = gateway(logs_dir, config, name="gw-nostore")
    try:
        fake.wait_healthy()
        gw.start().wait_healthy("/ready", timeout=60)
        chat = httpx.post(
            gw.url + "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 200
        create = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        for method, path in (("GET", "/v1/files"), ("GET", "/v1/batches"), ("POST", "/v1/batches")):
            r = httpx.request(method, gw.url + path, json=create if method == "POST" else None)
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", (path, r.text)
        assert "cannot be opened" in gw.log_tail(200) and f":{nothing}" in gw.log_tail(200)
    finally:
        gw.stop()
        fake.stop()
