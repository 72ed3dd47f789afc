"""The store's config, schema migrations, files and inference log, on SQLite and PostgreSQL.

Batches, leases, claims and finalize are in test_store_batches.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import gateway.store.inference_log
from gateway.store import (
    ALL_OWNERS,
    FileTooLargeError,
    InferenceRecord,
    OwnerScope,
    RequestFilter,
    Store,
    StoreConfigError,
    StoreError,
    open_store,
    parse_store_settings,
)
from gateway.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from gateway.store.sql_store import SqlStore
from testkit.poll import eventually
from testkit.procs import free_port
from testkit.stores import FakeClock, StoreEnv

MiB = 1 << 20


async def read_all(store: Store, file_id: str, owner: OwnerScope) -> bytes | None:
    content = await store.file_content(file_id, owner)
    return None if content is None else b"".join([part async for part in content])


# Config -----------------------------------------------------------------------------------


def test_settings_defaults_and_paths(tmp_path: Path) -> None:
    settings = parse_store_settings(None, base_dir=tmp_path)
    assert settings.url == "sqlite:///gateway.db"
    assert settings.data_dir == tmp_path / "data"
    assert settings.sqlite_path == tmp_path / "data" / "gateway.db"
    assert settings.backend == "sqlite"
    absolute = parse_store_settings({"url": "sqlite:////var/lib/gw/x.db", "data_dir": "/srv"}, base_dir=tmp_path)
    assert absolute.sqlite_path == Path("/var/lib/gw/x.db")
    assert absolute.data_dir == Path("/srv")
    pg = parse_store_settings({"url": "sqlite:///a.db"}, env={"GATEWAY_STORE_URL": "postgresql://gw:secret@db:5432/gw"})
    assert pg.url == "postgresql://gw:secret@db:5432/gw" and pg.backend == "postgresql"


@pytest.mark.parametrize(
    ("raw", "key", "problem"),
    [
        ([], "store", "must be a mapping"),
        ({"path": "x"}, "store.path", "unknown key"),
        ({"url": 5}, "store.url", "non-empty string"),
        ({"url": "mysql://h/db"}, "store.url", "must start with sqlite:/// or postgresql://"),
        ({"url": "sqlite:///"}, "store.url", "needs a file path"),
        ({"url": "sqlite://relative.db"}, "store.url", "must start with"),
        ({"url": "postgresql://"}, "store.url", "needs a host"),
        ({"data_dir": ""}, "store.data_dir", "non-empty string"),
    ],
)
def test_settings_errors_name_the_key(raw: object, key: str, problem: str) -> None:
    with pytest.raises(StoreConfigError) as err:
        parse_store_settings(raw)
    assert err.value.key == key
    assert problem in err.value.problem
    assert str(err.value).startswith(f"{key}: ")


def test_bad_url_error_hides_the_password() -> None:
    with pytest.raises(StoreConfigError) as err:
        parse_store_settings({"url": "mysql://u:hunter2@h/db"})
    assert "hunter2" not in str(err.value)


def test_relative_sqlite_path_lies_under_data_dir(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store("sqlite:///nested/dir/gw.db", tmp_path / "data")
        await store.close()

    asyncio.run(main())
    assert (tmp_path / "data" / "nested" / "dir" / "gw.db").is_file()


def test_unreachable_store_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(
            StoreError, match=r"cannot connect to the PostgreSQL store postgresql://gw:\*\*\*@127\.0\.0\.1"
        ):
            await open_store(f"postgresql://gw:hunter2@127.0.0.1:{free_port()}/gw", tmp_path)
        (tmp_path / "taken").write_text("a file, not a directory")
        with pytest.raises(StoreError, match="cannot open the SQLite store"):
            await open_store("sqlite:///taken/gw.db", tmp_path)

    asyncio.run(main())


# Migrations -------------------------------------------------------------------------------


async def schema_versions(env: StoreEnv) -> list[int]:
    async with env.open() as store:
        assert isinstance(store, SqlStore)
        async with store.db.read() as conn:
            return [int(r["version"]) for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]


def test_migrations_are_idempotent_and_data_survives(store_env: StoreEnv) -> None:
    expected = [m.version for m in (SQLITE_MIGRATIONS if store_env.backend == "sqlite" else POSTGRES_MIGRATIONS)]

    async def main() -> None:
        async with store_env.open() as store:
            record = await store.create_file("k", "batch", "a.jsonl", b"kept\n")
        assert await schema_versions(store_env) == expected
        assert await schema_versions(store_env) == expected  # a third start changes nothing
        async with store_env.open() as store:
            assert await read_all(store, record.id, "k") == b"kept\n"

    asyncio.run(main())


def test_replicas_starting_together_migrate_once(store_env: StoreEnv) -> None:
    expected = [m.version for m in (SQLITE_MIGRATIONS if store_env.backend == "sqlite" else POSTGRES_MIGRATIONS)]

    async def main() -> None:
        opened = await asyncio.gather(
            *(open_store(store_env.url, store_env.data_dir) for _ in range(6)), return_exceptions=True
        )
        stores = [s for s in opened if not isinstance(s, BaseException)]
        try:
            assert len(stores) == len(opened), opened
            # Every replica works on the one schema: a file written by one is read by another.
            record = await stores[0].create_file(None, "batch", "x", b"shared")
            assert await read_all(stores[-1], record.id, None) == b"shared"
        finally:
            await asyncio.gather(*(s.close() for s in stores))
        assert await schema_versions(store_env) == expected

    asyncio.run(main())


def test_workers_opening_a_new_sqlite_file_together_all_get_it(tmp_path: Path) -> None:
    """Switching a new file to WAL is where SQLite refuses at once ("database is locked")
    rather than wait: every opener must still get the store, and a refused connection must not
    leave its thread behind (it would hold the process open at exit)."""

    async def main() -> None:
        for round_ in range(30):
            url = f"sqlite:///new-{round_}.db"
            opened = await asyncio.gather(*(open_store(url, tmp_path) for _ in range(6)), return_exceptions=True)
            stores = [s for s in opened if not isinstance(s, BaseException)]
            await asyncio.gather(*(s.close() for s in stores))
            assert len(stores) == len(opened), (round_, opened)

    threads = threading.active_count()
    asyncio.run(main())
    # aiosqlite's close() asks its thread to stop and returns without joining it: a thread that
    # is ending goes within moments, a leaked one never does.
    eventually(threading.active_count, lambda n: n == threads, timeout=10, what="the connection threads ended")


# Files ------------------------------------------------------------------------------------


def test_file_round_trip_and_ownership(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:

            async def pieces() -> AsyncIterator[bytes]:
                for i in range(5):
                    yield f"line {i}\n".encode() * 100_000  # 700 KB each: parts cut mid-piece

            record = await store.create_file("key-a", "batch", "in.jsonl", pieces())
            expected = b"".join(f"line {i}\n".encode() * 100_000 for i in range(5))
            assert record.bytes == len(expected)
            assert record.id.startswith("file-") and record.status == "processed"
            assert record.created_at == int(clock.now)
            assert await store.get_file(record.id, "key-a") == record
            assert await read_all(store, record.id, "key-a") == expected
            # Another owner sees nothing; the admin sees everything; auth-off (None) is its own owner.
            assert await store.get_file(record.id, "key-b") is None
            assert await store.get_file(record.id, None) is None
            assert await store.file_content(record.id, "key-b") is None
            assert await store.delete_file(record.id, "key-b") is False
            assert await store.get_file(record.id, ALL_OWNERS) == record
            anonymous = await store.create_file(None, "batch", "anon.jsonl", b"{}\n")
            assert await store.get_file(anonymous.id, None) == anonymous
            assert await store.get_file(anonymous.id, "key-a") is None
            assert (await store.create_file("key-a", "batch", "empty", b"")).bytes == 0
            # Delete removes the content too.
            assert await store.delete_file(record.id, "key-a") is True
            assert await store.get_file(record.id, ALL_OWNERS) is None
            assert await store.file_content(record.id, "key-a") is None
            assert await store.delete_file(record.id, "key-a") is False
            assert isinstance(store, SqlStore)
            async with store.db.read() as conn:
                parts = await conn.fetch("SELECT part FROM file_parts WHERE file_id = $1", record.id)
            assert parts == []

    asyncio.run(main())


def test_file_listing_pages_like_openai(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            ids = []
            for i in range(7):
                purpose = "batch" if i % 2 == 0 else "batch_output"
                ids.append((await store.create_file("k", purpose, f"f{i}", b"x")).id)
                clock.advance(1)
            await store.create_file("other", "batch", "theirs", b"x")

            async def walk(limit: int, **kw: object) -> list[str]:
                seen: list[str] = []
                after = None
                while True:
                    page = await store.list_files("k", limit=limit, after=after, **kw)  # type: ignore[arg-type]
                    seen += [f.id for f in page.items]
                    if not page.has_more:
                        return seen
                    after = page.items[-1].id

            assert await walk(3) == ids[::-1]  # newest first by default
            assert await walk(2, order="asc") == ids
            assert await walk(10, purpose="batch") == [ids[6], ids[4], ids[2], ids[0]]
            assert await walk(1, purpose="batch_output", order="asc") == [ids[1], ids[3], ids[5]]
            everyone = await store.list_files(ALL_OWNERS)
            assert len(everyone.items) == 8 and not everyone.has_more
            assert (await store.list_files("nobody")).items == []
            assert (await store.list_files("k", after="file-unknown")).items == []
            with pytest.raises(ValueError):
                await store.list_files("k", order="sideways")  # type: ignore[arg-type]

    asyncio.run(main())


def test_upload_over_the_limit_or_broken_leaves_nothing(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:

            async def endless() -> AsyncIterator[bytes]:
                while True:
                    yield b"x" * 300_000

            with pytest.raises(FileTooLargeError):
                await store.create_file("k", "batch", "big", endless(), max_bytes=2 * MiB)

            async def broken() -> AsyncIterator[bytes]:
                yield b"y" * (3 * MiB)
                raise ConnectionResetError("client went away")

            with pytest.raises(ConnectionResetError):
                await store.create_file("k", "batch", "cut", broken())
            exact = await store.create_file("k", "batch", "exact", b"z" * MiB, max_bytes=MiB)
            assert exact.bytes == MiB
            assert [f.id for f in (await store.list_files(ALL_OWNERS)).items] == [exact.id]
            assert isinstance(store, SqlStore)
            async with store.db.read() as conn:
                files = await conn.fetch("SELECT id FROM files")
                parts = await conn.fetch("SELECT file_id FROM file_parts WHERE file_id <> $1", exact.id)
            assert [r["id"] for r in files] == [exact.id] and parts == []

    asyncio.run(main())


def test_half_written_upload_is_invisible_then_purged(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            started = asyncio.Event()
            finish = asyncio.Event()

            async def slow() -> AsyncIterator[bytes]:
                yield b"a" * (2 * MiB)
                started.set()
                await finish.wait()
                yield b"b"

            upload = asyncio.create_task(store.create_file("k", "batch", "slow", slow()))
            await started.wait()
            assert (await store.list_files(ALL_OWNERS)).items == []
            # A crash would leave this upload behind; it is purged once old enough.
            clock.advance(3600)
            assert await store.purge_incomplete_uploads(older_than=60) == 1
            finish.set()
            with pytest.raises(StoreError, match="purged"):
                await upload
            assert (await store.list_files(ALL_OWNERS)).items == []
            assert isinstance(store, SqlStore)
            async with store.db.read() as conn:
                assert await conn.fetch("SELECT file_id FROM file_parts") == []

    asyncio.run(main())


def test_200_mb_upload_and_download_in_bounded_memory(store_env: StoreEnv) -> None:
    total = 200 * MiB
    piece = 64 * 1024
    block = os.urandom(piece)

    async def main() -> None:
        async with store_env.open() as store:

            async def upload() -> AsyncIterator[bytes]:
                for i in range(total // piece):
                    yield i.to_bytes(8, "big") + block[8:]

            expected = hashlib.sha256()
            for i in range(total // piece):
                expected.update(i.to_bytes(8, "big") + block[8:])
            tracemalloc.start()
            try:
                started = time.perf_counter()
                record = await store.create_file("k", "batch", "big.jsonl", upload())
                upload_s = time.perf_counter() - started
                upload_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                started = time.perf_counter()
                digest = hashlib.sha256()
                content = await store.file_content(record.id, "k")
                assert content is not None
                async for part in content:
                    digest.update(part)
                download_s = time.perf_counter() - started
                download_peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert record.bytes == total
            assert digest.hexdigest() == expected.hexdigest()
            print(
                f"\n{store_env.backend}: 200 MB upload {upload_s:.1f}s (peak {upload_peak / MiB:.1f} MiB traced),"
                f" download {download_s:.1f}s (peak {download_peak / MiB:.1f} MiB traced)"
            )
            # Two parts in flight at most, plus the drivers' buffers: far below the file's size.
            assert upload_peak < 16 * MiB, upload_peak
            assert download_peak < 16 * MiB, download_peak
            assert await store.delete_file(record.id, "k")

    asyncio.run(main())


# Inference log ----------------------------------------------------------------------------


def log_row(i: int, t: float, **kw: object) -> InferenceRecord:
    fields: dict[str, object] = {
        "time": t,
        "request_id": f"req-{i}",
        "model": "tiny" if i % 2 == 0 else "big",
        "status": 200 if i % 5 else 429,
        "duration": 0.5 + i / 1000,
        "key_id": f"key_{i % 3}",
        "route": "v1" if i % 4 else "v2-canary",
        "engine": "cpu-0",
        "error_code": None if i % 5 else "rate_limit_exceeded",
        "stream": i % 2 == 1,
        "prompt_tokens": 10 + i,
        "completion_tokens": i,
        "ttft": None if i % 5 == 0 else 0.01 * i,
        "finish_reason": "stop" if i % 3 else "length",
        "client_disconnect": i % 7 == 0,
        "batch_id": "batch_x" if i % 10 == 0 else None,
        "payload": '{"messages": []}' if i == 3 else None,
    }
    fields.update(kw)
    return InferenceRecord(**fields)  # type: ignore[arg-type]


def test_inference_log_append_query_paginate_retain(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            t0 = 1_800_000_000.0
            rows = [log_row(i, t0 + i) for i in range(100)]
            await store.append_requests(rows[:60])
            await store.append_requests(rows[60:])
            await store.append_requests([])

            newest = await store.query_requests(RequestFilter(), limit=1)
            assert newest.has_more and len(newest.items) == 1
            got = newest.items[0]
            assert got.id is not None
            assert got.__class__(**{**got.__dict__, "id": None}) == rows[99]  # every column round-trips
            payload = await store.query_requests(RequestFilter(key_id="key_0", status=200, since=t0 + 3, until=t0 + 4))
            assert [r.payload for r in payload.items] == ['{"messages": []}']

            async def ids(where: RequestFilter) -> list[str]:
                return [r.request_id for r in (await store.query_requests(where, limit=1000)).items]

            def expect(pred: object) -> list[str]:
                return [r.request_id for r in reversed(rows) if pred(r)]  # type: ignore[operator]

            assert await ids(RequestFilter(key_id="key_1")) == expect(lambda r: r.key_id == "key_1")
            assert await ids(RequestFilter(model="big", route="v1")) == expect(
                lambda r: r.model == "big" and r.route == "v1"
            )
            assert await ids(RequestFilter(status=429)) == expect(lambda r: r.status == 429)
            assert await ids(RequestFilter(since=t0 + 10, until=t0 + 20)) == expect(
                lambda r: t0 + 10 <= r.time < t0 + 20
            )
            assert await ids(RequestFilter(model="none")) == []

            # Pages are stable while new rows arrive: they show up before page one, never inside.
            seen: list[str] = []
            after = None
            while True:
                page = await store.query_requests(RequestFilter(model="tiny"), limit=7, after=after)
                seen += [r.request_id for r in page.items]
                await store.append_requests([log_row(1000 + len(seen), t0 + 5000, model="tiny")])
                if not page.has_more:
                    break
                after = page.items[-1].id
            assert seen == expect(lambda r: r.model == "tiny")

            # Retention: rows before the cutoff go, the rest stay.
            assert await store.delete_requests_before(t0 + 50) == 50
            left = await store.query_requests(RequestFilter(until=t0 + 100), limit=1000)
            assert sorted(r.request_id for r in left.items) == sorted(f"req-{i}" for i in range(50, 100))
            assert await store.delete_requests_before(t0 + 50) == 0

    asyncio.run(main())


def test_report_rows_in_pages(store_env: StoreEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.store.inference_log, "REPORT_PAGE", 7)
    monkeypatch.setattr(gateway.store.inference_log, "DELETE_CHUNK", 9)

    async def main() -> None:
        async with store_env.open() as store:
            t0 = 1_800_000_000.0
            # Several rows share one timestamp: paging must not lose or repeat them.
            rows = [log_row(i, t0 + i // 4) for i in range(120)]
            await store.append_requests(rows)
            got = [r async for r in store.report_rows("tiny", t0 + 2, t0 + 20)]
            want = [r for r in rows if r.model == "tiny" and t0 + 2 <= r.time < t0 + 20]
            assert len(got) == len(want) == 36
            assert [
                (g.time, g.route, g.status, g.ttft, g.duration, g.prompt_tokens, g.completion_tokens, g.finish_reason)
                for g in got
            ] == [
                (w.time, w.route, w.status, w.ttft, w.duration, w.prompt_tokens, w.completion_tokens, w.finish_reason)
                for w in want
            ]
            assert [r async for r in store.report_rows("tiny", t0 + 500, t0 + 600)] == []
            assert await store.delete_requests_before(t0 + 25) == 100  # in chunks of 9

    asyncio.run(main())


def test_inference_log_appends_batches_whole_and_in_order(store_env: StoreEnv) -> None:
    """40 batches of 500 rows, as the background writer sends them: every row lands, newest
    first. (How fast is bench/inference_log.py's question: 3,000 rows/s kept up on both stores.)"""

    async def main() -> None:
        async with store_env.open() as store:
            t0 = 1_800_000_000.0
            batches = [[log_row(b * 500 + i, t0 + b) for i in range(500)] for b in range(40)]
            for batch in batches:
                await store.append_requests(batch)
            ids, after = [], None
            while True:
                page = await store.query_requests(RequestFilter(), limit=5000, after=after)
                ids += [r.request_id for r in page.items]
                if not page.has_more:
                    break
                after = page.items[-1].id
            assert ids == [f"req-{i}" for i in reversed(range(20_000))]

    asyncio.run(main())
