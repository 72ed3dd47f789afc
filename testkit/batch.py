"""What the batch end-to-end tests share: a gateway over a chosen store, keys, JSONL lines, and
reading a finished batch's result files."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from testkit.procs import Proc
from testkit.stores import fresh_database

FINAL = ("completed", "failed", "expired", "cancelled")


@contextmanager
def store_url(backend: str, tmp: Path) -> Iterator[dict[str, str]]:
    """The `store` section of a gateway config: a SQLite file under tmp, or a fresh database."""
    if backend == "sqlite":
        yield {"url": "sqlite:///batches.db", "data_dir": str(tmp)}
        return
    with fresh_database("gateway_batch") as url:
        yield {"url": url}


def client(gw: Proc, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=120)


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def chat_line(custom_id: str, content: str, model: str = "tiny-llama", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def wait_final(c: openai.OpenAI, batch_id: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = c.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.25)


def results(c: openai.OpenAI, batch: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output and error files' lines."""

    def read(file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        return [json.loads(line) for line in c.files.content(file_id).text.splitlines()]

    return read(batch.output_file_id), read(batch.error_file_id)


def assert_each_once(ids: list[str], output: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
    """Every custom_id exactly once, in exactly one of the two files."""
    seen = [line["custom_id"] for line in output] + [line["custom_id"] for line in errors]
    assert sorted(seen) == sorted(ids), (len(seen), len(ids))
    assert all(line["error"] is None and line["response"]["status_code"] == 200 for line in output)
    assert all(line["error"] is not None for line in errors)
