"""The Files and Batches API end to end with the official `openai` SDK: a gateway with keys and
quotas in a private Redis, real engine workers (the tiny chat model, the embedding model), and
the store on SQLite and on a PostgreSQL database made for the run (every test runs on both)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from testkit.batch import (
    assert_each_once,
    chat_line,
    client,
    jsonl,
    results,
    store_url,
    wait_final,
)
from testkit.keyed import ADMIN_KEY, admin, create_key, keyed_gateway, usage
from testkit.procs import TINY_MODEL, Proc, running, worker
from testkit.redis_server import RedisServer

TINY = "tiny-llama"
MINILM = "all-MiniLM-L6-v2"
MAX_BYTES = 300_000
MAX_LINES = 300
CONCURRENCY = 4


@pytest.fixture(scope="module")
def embed_worker(logs_dir: Path) -> Iterator[Proc]:
    with running(worker(logs_dir, "--model", MINILM, name="embed-batch")) as proc:
        yield proc


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gw(
    request: pytest.FixtureRequest,
    logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    redis_session: RedisServer,
    tiny_worker: Proc,
    embed_worker: Proc,
) -> Iterator[Proc]:
    with store_url(request.param, tmp_path_factory.mktemp(f"store-{request.param}")) as store:
        config = {
            "health": {"interval": 0.3},
            "redis": {"url": redis_session.up().url, "timeout": 1.0},
            "auth": {"enabled": True, "default_max_tokens": 16},
            "engines": [
                {"name": "tiny", "kind": "openai", "url": tiny_worker.url},
                {"name": "embed", "kind": "openai", "url": embed_worker.url},
            ],
            "models": [
                {"name": TINY, "routes": [{"engine": "tiny", "model": TINY}], "tokenizer": str(TINY_MODEL)},
                {"name": MINILM, "routes": [{"engine": "embed", "model": MINILM}]},
            ],
            "store": store,
            "files": {"max_bytes": MAX_BYTES},
            "batch": {
                "concurrency": CONCURRENCY,
                "claim_size": 4,
                "max_lines": MAX_LINES,
                "poll_interval": 0.2,
                "lease_ttl": 3,
                "claim_ttl": 6,
                "cancel_grace": 20,
                "min_completion_window": 1,
            },
        }
        with keyed_gateway(logs_dir, config, f"gw-batch-{request.param}") as proc:
            yield proc


@pytest.fixture
def gws(gw: Proc, redis_server: RedisServer) -> Proc:
    """The gateway, over a running and empty Redis."""
    return gw


def test_chat_batch_completes_with_outputs_and_usage_charged_once(gws: Proc, tiny_worker: Proc) -> None:
    # rpm 1 and max_concurrent 1 do not hold batch lines back (they run 4 at a time).
    key_id, secret = create_key(gws, rpm=1, max_concurrent=1, tpm=1_000_000, daily_tokens=1_000_000)
    c = client(gws, secret)
    prompts = [f"Tell me about item number {i}." for i in range(10)]
    lines = [chat_line(f"req-{i}", p, max_tokens=6, temperature=0) for i, p in enumerate(prompts)]
    uploaded = c.files.create(file=("chat.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines)) and uploaded.status == "processed"
    batch = c.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "t"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 10 and batch.metadata == {"job": "t"}
    assert batch.completion_window == "24h" and batch.expires_at == batch.created_at + 86400
    done = wait_final(c, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == 10 and done.request_counts.failed == 0
    assert done.error_file_id is None and done.in_progress_at and done.finalizing_at and done.completed_at
    output, errors = results(c, done)
    assert_each_once([line["custom_id"] for line in lines], output, errors)
    assert [line["custom_id"] for line in output] == [f"req-{i}" for i in range(10)]  # input order
    direct = openai.OpenAI(base_url=tiny_worker.url + "/v1", api_key="x", max_retries=0)
    for line, prompt in zip(output, prompts, strict=True):
        body = line["response"]["body"]
        assert line["id"].startswith("batch_req_") and len(line["response"]["request_id"]) == 32
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        alone = direct.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0
        )
        assert body["usage"]["prompt_tokens"] == alone.usage.prompt_tokens
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content
    # Charged exactly once per line: the day's usage is the sum of the lines' usage.
    day = usage(gws, key_id)["day"]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    assert (day["requests"], day["prompt_tokens"], day["completion_tokens"]) == (10, prompt, completion)
    assert day["tokens"] == prompt + completion
    # The key's interactive rpm was untouched by the batch.
    assert usage(gws, key_id)["minute"]["requests"] == 0
    r = c.chat.completions.with_raw_response.create(
        model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert done.output_file_id in {f.id for f in c.files.list(purpose="batch_output")}
    assert batch.id in [b.id for b in c.batches.list()]
    metrics = httpx.get(gws.url + "/metrics").text
    assert 'gateway_batch_lines_total{outcome="completed"}' in metrics
    assert 'gateway_batches_total{status="completed"}' in metrics


def test_embeddings_batch(gws: Proc, embed_worker: Proc) -> None:
    _, secret = create_key(gws)
    c = client(gws, secret)
    texts = ["a guitar", "a violin", "tax law", "the stock market"]
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": MINILM, "input": t}}
        for i, t in enumerate(texts)
    ]
    f = c.files.create(file=("embed.jsonl", jsonl(lines)), purpose="batch")
    done = wait_final(c, c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h").id)
    assert done.status == "completed" and done.request_counts.completed == 4
    output, errors = results(c, done)
    assert_each_once([line["custom_id"] for line in lines], output, errors)
    vectors = [line["response"]["body"]["data"][0]["embedding"] for line in output]
    direct = openai.OpenAI(base_url=embed_worker.url + "/v1", api_key="x", max_retries=0)
    for text, vector, line in zip(texts, vectors, output, strict=True):
        alone = direct.embeddings.create(model=MINILM, input=text)
        assert (
            len(vector) == 384 and max(abs(a - b) for a, b in zip(vector, alone.data[0].embedding, strict=True)) < 1e-4
        )
        assert line["response"]["body"]["usage"]["prompt_tokens"] == alone.usage.prompt_tokens

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


def test_validation_failures_are_clear_errors(gws: Proc) -> None:
    _, secret = create_key(gws, models=[TINY])
    c = client(gws, secret)
    good = chat_line("a", "hi", max_tokens=2)
    bad = [
        good,
        "not json at all",
        {**chat_line("b", "hi"), "method": "GET"},
        {**chat_line("c", "hi"), "url": "/v1/completions"},
        chat_line("a", "again"),
        chat_line("d", "hi", stream=True),
        chat_line("e", "hi", model="no-such-model"),
        chat_line("f", "hi", model=MINILM),  # exists, but this key may not use it
        {"custom_id": "g", "method": "POST", "url": "/v1/chat/completions", "body": {"model": TINY}},
        {"method": "POST", "url": "/v1/chat/completions", "body": good["body"]},
    ]
    data = b"".join(x.encode() + b"\n" if isinstance(x, str) else jsonl([x]) for x in bad)
    f = c.files.create(file=("bad.jsonl", data), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at and batch.request_counts.total == 0
    assert batch.errors is not None and batch.errors.data is not None
    found = [(e.code, e.line) for e in batch.errors.data]
    assert found == [
        ("invalid_json", 2),
        ("invalid_method", 3),
        ("invalid_url", 4),
        ("duplicate_custom_id", 5),
        ("stream_not_supported", 6),
        ("model_not_found", 7),
        ("model_not_allowed", 8),
        ("invalid_body", 9),
        ("missing_custom_id", 10),
    ]
    assert c.batches.retrieve(batch.id).status == "failed"
    # Too many lines: a validation error as well.
    many = c.files.create(
        file=("many.jsonl", jsonl([chat_line(f"m{i}", "x") for i in range(MAX_LINES + 1)])), purpose="batch"
    )
    over = c.batches.create(input_file_id=many.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert over.status == "failed" and [e.code for e in over.errors.data or []] == ["too_many_lines"]
    # Request-level mistakes are 4xx at once, never a 500.
    ok_file = c.files.create(file=("ok.jsonl", jsonl([good])), purpose="batch")
    other = c.files.create(file=("other.jsonl", jsonl([good])), purpose="user_data")

    def refused(status: int, param: str | None, **body: Any) -> None:
        fields = {"input_file_id": ok_file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **body}
        r = httpx.post(gws.url + "/v1/batches", json=fields, headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text

    refused(400, "input_file_id", input_file_id=other.id)  # wrong purpose
    refused(404, "input_file_id", input_file_id="file-000000000000000000000000")
    refused(400, "endpoint", endpoint="/v1/moderations")
    refused(400, "endpoint", endpoint=["/v1/chat/completions"])  # not a string (was a 500)
    deep = b"[" * 1000 + b"]" * 1000  # its repr() in the error message was a RecursionError (a 500)
    raw = b'{"input_file_id": "%s", "endpoint": "/v1/chat/completions", "completion_window": %s}' % (
        ok_file.id.encode(),
        deep,
    )
    r = httpx.post(gws.url + "/v1/batches", content=raw, headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"], r.text
    refused(400, "completion_window", completion_window="forever")
    refused(400, "metadata", metadata={"k": 1})
    refused(400, "colour", colour="red")
    mismatch = c.batches.create(input_file_id=ok_file.id, endpoint="/v1/embeddings", completion_window="24h")
    assert mismatch.status == "failed" and [(e.code, e.line) for e in mismatch.errors.data or []] == [
        ("invalid_url", 1)
    ]
    # Uploads: too large (413), not multipart, purpose missing or unknown (400).
    headers = {"authorization": f"Bearer {secret}"}
    big = httpx.post(
        gws.url + "/v1/files",
        headers=headers,
        data={"purpose": "batch"},
        files={"file": ("b.jsonl", b"x" * (MAX_BYTES + 1))},
    )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.post(gws.url + "/v1/files", headers=headers, json={"purpose": "batch"}).status_code == 400
    no_purpose = httpx.post(gws.url + "/v1/files", headers=headers, files={"file": ("a.jsonl", b"{}")})
    assert no_purpose.status_code == 400 and no_purpose.json()["error"]["param"] == "purpose"
    odd = httpx.post(gws.url + "/v1/files", headers=headers, data={"purpose": "x"}, files={"file": ("a", b"{}")})
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "purpose"
    assert httpx.post(gws.url + "/v1/files", data={"purpose": "batch"}, files={"file": ("a", b"{}")}).status_code == 401


def test_files_api(gws: Proc) -> None:
    _, secret = create_key(gws)
    c = client(gws, secret)
    content = jsonl([chat_line(f"r{i}", "word " * 40) for i in range(400)])  # ~150 KB
    first = c.files.create(file=("big.jsonl", content), purpose="batch")
    assert c.files.content(first.id).content == content
    # The file before the purpose (curl -F file=@x -F purpose=batch) works too.
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="late.jsonl"\r\n\r\n'.encode()
        + content
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n--{boundary}--\r\n'.encode()
    )
    r = httpx.post(
        gws.url + "/v1/files",
        content=body,
        headers={"authorization": f"Bearer {secret}", "content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 200 and r.json()["purpose"] == "user_data" and r.json()["bytes"] == len(content), r.text
    second = c.files.retrieve(r.json()["id"])
    assert second.filename == "late.jsonl" and c.files.content(second.id).content == content
    third = c.files.create(file=("dossier/résumé.jsonl", b"{}\n"), purpose="batch")
    assert third.filename == "résumé.jsonl" and c.files.content(third.id).content == b"{}\n"
    assert [f.id for f in c.files.list()] == [third.id, second.id, first.id]
    assert [f.id for f in c.files.list(order="asc")] == [first.id, second.id, third.id]
    assert [f.id for f in c.files.list(purpose="user_data")] == [second.id]
    page = c.files.list(limit=1, after=third.id)
    assert [f.id for f in page.data] == [second.id] and page.has_more
    deleted = c.files.delete(second.id)
    assert deleted.deleted and deleted.id == second.id
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(second.id)
    huge = "9" * 5000  # past int()'s 4,300 digits
    for path in ("/v1/files?limit=0", "/v1/files?limit=%C2%B2", "/v1/batches?limit=%C2%B2", f"/v1/files?limit={huge}"):
        r = httpx.get(gws.url + path, headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text


def test_ownership(gws: Proc) -> None:
    _, secret_a = create_key(gws)
    _, secret_b = create_key(gws)
    a, b = client(gws, secret_a), client(gws, secret_b)
    f = a.files.create(file=("a.jsonl", jsonl([chat_line("x", "hi", max_tokens=2)])), purpose="batch")
    batch = a.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.delete(f.id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in {x.id for x in b.files.list()} and batch.id not in {x.id for x in b.batches.list()}
    done = wait_final(a, batch.id)
    assert done.status == "completed"
    with pytest.raises(openai.NotFoundError):
        b.files.content(done.output_file_id or "")
    # The operators' view sees every owner's batches; a client key may not use it.
    listed = admin(gws, "GET", "/admin/batches?limit=100").json()["data"]
    mine = [x for x in listed if x["id"] == batch.id]
    assert mine and mine[0]["owner"] and mine[0]["status"] == "completed"
    assert admin(gws, "GET", f"/admin/files/{done.output_file_id}/content").status_code == 200
    r = httpx.get(gws.url + "/admin/batches", headers={"authorization": f"Bearer {secret_b}"})
    assert r.status_code == 403
    assert httpx.get(gws.url + "/admin/batches").status_code == 401


def slow_lines(n: int, tokens: int = 48) -> list[dict[str, Any]]:
    return [chat_line(f"s{i}", f"Write a long story number {i}.", max_tokens=tokens, ignore_eos=True) for i in range(n)]


def test_cancel_mid_way(gws: Proc) -> None:
    _, secret = create_key(gws)
    c = client(gws, secret)
    lines = slow_lines(40)
    f = c.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while c.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelling = c.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    at_cancel = cancelling.request_counts.completed
    done = wait_final(c, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    # The lines in flight at the cancel finish; no new line starts.
    assert at_cancel <= counts.completed <= at_cancel + CONCURRENCY + 4 < 40, counts
    assert counts.completed + counts.failed == 40
    output, errors = results(c, done)
    assert_each_once([line["custom_id"] for line in lines], output, errors)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and len(errors) == counts.failed
    assert c.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes
    r = httpx.post(gws.url + f"/v1/batches/{batch.id}/cancel", headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 200


def test_expiry_keeps_done_lines(gws: Proc) -> None:
    _, secret = create_key(gws)
    c = client(gws, secret)
    # Far more than 12 s of work for the tiny engine (the same ratio as 150 lines in 6 s), and 12 s
    # enough for a few lines even on a busy machine (6 s saw none done under load).
    lines = slow_lines(300, tokens=64)  # the gateway's max_lines here
    f = c.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="12s")
    assert batch.completion_window == "12s" and batch.expires_at == batch.created_at + 12
    done = wait_final(c, batch.id, timeout=90)
    assert done.status == "expired" and done.expired_at and done.expired_at >= batch.expires_at, done.errors
    counts = done.request_counts
    assert counts.completed >= 1 and counts.failed >= 1 and counts.completed + counts.failed == 300, counts
    output, errors = results(c, done)
    assert_each_once([line["custom_id"] for line in lines], output, errors)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    cancel = httpx.post(gws.url + f"/v1/batches/{batch.id}/cancel", headers={"authorization": f"Bearer {secret}"})
    assert cancel.status_code == 400 and cancel.json()["error"]["code"] == "batch_not_cancellable"


def test_a_spent_budget_fails_the_remaining_lines(gws: Proc) -> None:
    key_id, secret = create_key(gws, daily_tokens=120)
    c = client(gws, secret)
    lines = [chat_line(f"b{i}", "hi", max_tokens=8) for i in range(12)]
    f = c.files.create(file=("budget.jsonl", jsonl(lines)), purpose="batch")
    done = wait_final(
        c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
    )
    assert done.status == "completed"
    output, errors = results(c, done)
    assert_each_once([line["custom_id"] for line in lines], output, errors)
    assert output and errors and {e["error"]["code"] for e in errors} == {"daily_tokens_exceeded"}
    assert usage(gws, key_id)["day"]["tokens"] <= 120


def test_cli_runs_a_batch_and_downloads_the_results(gws: Proc, tmp_path: Path) -> None:
    _, secret = create_key(gws)
    source = tmp_path / "requests.jsonl"
    lines = [chat_line(f"c{i}", "hello", max_tokens=3) for i in range(5)]
    source.write_bytes(jsonl(lines))
    cmd = [sys.executable, "-m", "gateway.cli.main", "batch", "run", str(source), "--endpoint", "/v1/chat/completions"]
    cmd += ["--wait", "--poll", "0.2", "--url", gws.url, "--key", secret]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "5/5 lines" in done.stdout and "completed" in done.stdout
    output = (tmp_path / "requests.output.jsonl").read_text().splitlines()
    assert len(output) == 5 and not (tmp_path / "requests.errors.jsonl").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    failed = subprocess.run([*cmd[:5], str(bad), "--url", gws.url, "--key", secret], capture_output=True, text=True)
    assert failed.returncode == 1 and "line 1:" in failed.stdout
    assert ADMIN_KEY not in failed.stdout + failed.stderr
