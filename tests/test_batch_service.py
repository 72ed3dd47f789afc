"""The store in the gateway's life: a store that cannot be opened does not stop the gateway
(interactive requests are served, the Files and Batches endpoints answer 503 `store_unavailable`,
the log says why), and uploads left incomplete by a crash are purged."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import httpx

from gateway.store import FileRecord, open_store
from gateway.store.files import insert_file, insert_part
from testkit.procs import fake_upstream, free_port, gateway


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


def test_uploads_left_incomplete_are_purged(logs_dir: Path, tmp_path: Path) -> None:
    """An upload cut short by a crash (its file row still `uploading`) is removed by the runner."""

    async def leave_an_upload_behind() -> None:
        store = await open_store("sqlite:///gw.db", tmp_path)
        try:
            async with store.db.write() as conn:  # type: ignore[attr-defined]
                record = FileRecord("file-crashed", None, "batch", "x.jsonl", 0, int(time.time()) - 3600, "uploading")
                await insert_file(conn, record)
                await insert_part(conn, record.id, 0, b"half a file")
        finally:
            await store.close()

    asyncio.run(leave_an_upload_behind())
    fake = fake_upstream(logs_dir, "--model", "fake", name="fake-purge").start()
    config = {
        "auth": {"enabled": False},
        "engines": [{"name": "fake", "kind": "openai", "url": fake.url}],
        "models": [{"name": "fake", "routes": [{"engine": "fake"}]}],
        "store": {"url": "sqlite:///gw.db", "data_dir": str(tmp_path)},
        "files": {"purge_after": 60},
    }
    gw = gateway(logs_dir, config, name="gw-purge")
    try:
        fake.wait_healthy()
        gw.start().wait_healthy("/ready", timeout=60)
        deadline = time.monotonic() + 30
        while True:
            with sqlite3.connect(tmp_path / "gw.db") as db:
                left = db.execute("SELECT COUNT(*) FROM file_parts WHERE file_id = 'file-crashed'").fetchone()[0]
            if left == 0:
                break
            assert time.monotonic() < deadline, "the incomplete upload is still there"
            time.sleep(0.2)
    finally:
        gw.stop()
        fake.stop()
