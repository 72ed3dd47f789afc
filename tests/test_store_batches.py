"""Batches in the store, on SQLite and PostgreSQL: creation with 50,000 lines, ownership, status
compare-and-set, leases and takeover, concurrent claims, exactly-once results, cancel, expiry,
and result files that name every custom_id exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest

from gateway.store import (
    ALL_OWNERS,
    Batch,
    BatchError,
    BatchSpec,
    DuplicateCustomIdError,
    LineOutcome,
    NewLine,
    RequestCounts,
    Store,
    UnfinishedLinesError,
    open_store,
)
from testkit.stores import FakeClock, StoreEnv

ENDPOINT = "/v1/chat/completions"
DAY = 86400


def spec(owner: str | None = "key-a", window: int = DAY, **metadata: str) -> BatchSpec:
    return BatchSpec(owner, ENDPOINT, "file-input", window, metadata or None)


def lines(n: int, prefix: str = "req") -> list[NewLine]:
    return [
        NewLine(f"{prefix}-{i}", orjson.dumps({"model": "tiny", "messages": [], "i": i}).decode()) for i in range(n)
    ]


def ok(line: int) -> LineOutcome:
    return LineOutcome.success(200, f"rid-{line}", orjson.dumps({"choices": [], "line": line}).decode())


async def result_lines(store: Store, file_id: str | None, owner: str | None) -> list[dict[str, object]]:
    if file_id is None:
        return []
    content = await store.file_content(file_id, owner)
    assert content is not None
    data = b"".join([part async for part in content])
    return [orjson.loads(line) for line in data.splitlines()]


def test_create_batch_with_50000_lines(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            source = lines(50_000)

            async def stream() -> AsyncIterator[NewLine]:  # lines may come as they are parsed
                for line in source:
                    yield line

            started = time.perf_counter()
            batch = await store.create_batch(spec(purpose="eval"), stream())
            elapsed = time.perf_counter() - started
            print(f"\n{store_env.backend}: batch create {50_000 / elapsed:,.0f} lines/s (50,000 lines)")
            assert batch.id.startswith("batch_")
            assert batch.status == "in_progress" and batch.in_progress_at == int(clock.now)
            assert batch.request_counts == RequestCounts(50_000, 0, 0)
            assert batch.metadata == {"purpose": "eval"}
            assert batch.expires_at == batch.created_at + DAY
            assert (batch.endpoint, batch.input_file_id, batch.completion_window) == (ENDPOINT, "file-input", DAY)
            assert batch.errors == () and batch.output_file_id is None and batch.error_file_id is None
            assert await store.get_batch(batch.id, "key-a") == batch
            claimed = await store.claim_lines(batch.id, "h", 3, 60)
            assert [(c.line, c.custom_id, c.body) for c in claimed] == [
                (i + 1, source[i].custom_id, source[i].body) for i in range(3)
            ]
            assert 50_000 / elapsed > 5000  # measured far above; the floor tolerates a loaded machine

    asyncio.run(main())


def test_batch_lines_read_from_a_stored_file(store_env: StoreEnv) -> None:
    """The real flow: the lines are parsed from the input file's content while the batch's
    transaction is open (on SQLite, the reader connection serves the file meanwhile)."""

    async def main() -> None:
        async with store_env.open() as store:
            source = lines(3000)
            jsonl = b"".join(
                orjson.dumps(
                    {"custom_id": x.custom_id, "method": "POST", "url": ENDPOINT, "body": orjson.loads(x.body)}
                )
                + b"\n"
                for x in source
            )
            upload = await store.create_file("key-a", "batch", "input.jsonl", jsonl)

            async def parsed() -> AsyncIterator[NewLine]:
                content = await store.file_content(upload.id, "key-a")
                assert content is not None
                rest = b""
                async for part in content:
                    *complete, rest = (rest + part).split(b"\n")
                    for raw in complete:
                        item = orjson.loads(raw)
                        yield NewLine(item["custom_id"], orjson.dumps(item["body"]).decode())

            batch = await asyncio.wait_for(store.create_batch(spec(), parsed()), timeout=60)
            assert batch.request_counts.total == 3000
            claimed = await store.claim_lines(batch.id, "h", 3000, 60)
            assert [(c.custom_id, orjson.loads(c.body)) for c in claimed] == [
                (x.custom_id, orjson.loads(x.body)) for x in source
            ]

    asyncio.run(main())


def test_batch_creation_rules(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            with pytest.raises(DuplicateCustomIdError):
                await store.create_batch(spec(), [*lines(10), NewLine("req-3", "{}")])
            assert (await store.list_batches(ALL_OWNERS)).items == []  # nothing half-created
            validating = await store.create_batch(spec(), lines(2), status="validating")
            assert validating.status == "validating" and validating.in_progress_at is None
            empty = await store.create_batch(spec(), [])
            assert empty.request_counts.total == 0
            errors = [BatchError("invalid_url", "url must be /v1/chat/completions", "url", 3), BatchError("x", "y")]
            failed = await store.create_failed_batch(spec(), errors)
            assert failed.status == "failed" and failed.failed_at == failed.created_at
            assert failed.errors == tuple(errors) and failed.request_counts.total == 0
            assert await store.get_batch(failed.id, "key-a") == failed
            with pytest.raises(ValueError):
                await store.create_batch(spec(), [], status="completed")  # type: ignore[arg-type]

    asyncio.run(main())


def test_batch_ownership_and_listing(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            mine = [await store.create_batch(spec("key-a"), lines(1)) for _ in range(5)]
            theirs = await store.create_batch(spec("key-b"), lines(1))
            anonymous = await store.create_batch(spec(None), lines(1))
            assert await store.get_batch(theirs.id, "key-a") is None
            assert await store.get_batch(anonymous.id, "key-a") is None
            assert await store.get_batch(anonymous.id, None) == anonymous
            assert await store.get_batch(theirs.id, ALL_OWNERS) == theirs
            assert await store.cancel_batch(theirs.id, "key-a") is None
            assert (await store.get_batch(theirs.id, "key-b")).status == "in_progress"  # type: ignore[union-attr]

            seen: list[str] = []
            after = None
            while True:
                page = await store.list_batches("key-a", limit=2, after=after)
                seen += [b.id for b in page.items]
                if not page.has_more:
                    break
                after = page.items[-1].id
            assert seen == [b.id for b in reversed(mine)]  # newest first
            assert len((await store.list_batches(ALL_OWNERS, limit=100)).items) == 7
            assert [b.id for b in (await store.list_batches(None)).items] == [anonymous.id]
            assert (await store.list_batches("key-a", after="batch_unknown")).items == []

    asyncio.run(main())


def test_status_compare_and_set(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            batch = await store.create_batch(spec(), lines(3), status="validating")
            clock.advance(5)
            moved = await store.set_batch_status(batch.id, expect=["validating"], status="in_progress")
            assert moved is not None and moved.status == "in_progress" and moved.in_progress_at == int(clock.now)
            assert await store.set_batch_status(batch.id, expect=["validating"], status="in_progress") is None
            clock.advance(5)
            fin = await store.set_batch_status(batch.id, expect=["in_progress"], status="finalizing")
            assert fin is not None and fin.finalizing_at == int(clock.now)
            # Racing callers: exactly one wins.
            tries = await asyncio.gather(
                *(store.set_batch_status(batch.id, expect=["finalizing"], status="failed") for _ in range(5))
            )
            assert sum(t is not None for t in tries) == 1
            with pytest.raises(ValueError):
                await store.set_batch_status(batch.id, expect=["in_progress"], status="completed")
            with pytest.raises(ValueError):
                await store.set_batch_status(batch.id, expect=["bogus"], status="failed")
            assert await store.set_batch_status("batch_nope", expect=["in_progress"], status="failed") is None
            errs = [BatchError("bad", "broken", line=2)]
            other = await store.create_batch(spec(), lines(1), status="validating")
            failed = await store.set_batch_status(other.id, expect=["validating"], status="failed", errors=errs)
            assert failed is not None and failed.errors == tuple(errs) and failed.failed_at == int(clock.now)

    asyncio.run(main())


def test_leases_and_takeover_after_expiry(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as a, store_env.open(clock) as b:
            first = await a.create_batch(spec(), lines(2))
            clock.advance(1)
            second = await a.create_batch(spec(), lines(2))
            await a.create_failed_batch(spec(), [BatchError("x", "y")])  # never leased
            held = await a.acquire_batch_lease("replica-a", ttl=30)
            assert held is not None and held.id == first.id  # earliest expiry first
            assert held.lease_holder == "replica-a" and held.lease_expires == clock.now + 30
            other = await b.acquire_batch_lease("replica-b", ttl=30)
            assert other is not None and other.id == second.id
            assert await b.acquire_batch_lease("replica-b", ttl=30) is None  # nothing free
            assert await a.acquire_batch_lease("replica-c", ttl=30, batch_id=first.id) is None
            clock.advance(20)
            assert await a.renew_lease(first.id, "replica-a", ttl=30) is True
            assert await b.renew_lease(first.id, "replica-b", ttl=30) is False
            assert await b.renew_lease(second.id, "replica-b", ttl=30) is True
            # replica-a dies: it stops renewing, and once the lease runs out b takes the batch over.
            clock.advance(29)
            assert await b.acquire_batch_lease("replica-b", ttl=30) is None
            clock.advance(2)
            taken = await b.acquire_batch_lease("replica-b", ttl=30)
            assert taken is not None and taken.id == first.id and taken.lease_holder == "replica-b"
            assert await a.renew_lease(first.id, "replica-a", ttl=30) is False
            assert await a.release_lease(first.id, "replica-a") is False
            assert await b.release_lease(first.id, "replica-b") is True
            again = await a.acquire_batch_lease("replica-a", ttl=30, batch_id=first.id)
            assert again is not None and again.id == first.id
            # A finished batch needs no runner: its lease goes with the final status.
            await a.fail_pending(first.id, "batch_cancelled", "cancelled")
            done = await a.finalize_batch(first.id, expect=["in_progress"], status="cancelled")
            assert done is not None and done.lease_holder is None
            clock.advance(100)
            assert (await a.acquire_batch_lease("replica-a", ttl=30)).id == second.id  # type: ignore[union-attr]
            assert await a.acquire_batch_lease("replica-a", ttl=30) is None
            assert await a.renew_lease("batch_nope", "replica-a", 30) is False

    asyncio.run(main())


def test_replicas_racing_for_leases_get_distinct_batches(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        stores = [await open_store(store_env.url, store_env.data_dir, clock=clock) for _ in range(3)]
        try:
            ids = {(await stores[0].create_batch(spec(), lines(1))).id for _ in range(4)}
            taken = await asyncio.gather(*(stores[i % 3].acquire_batch_lease(f"r{i}", 30) for i in range(9)))
            got = [t.id for t in taken if t is not None]
            assert sorted(got) == sorted(ids)  # each batch leased exactly once
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


def test_concurrent_claims_never_share_a_line(store_env: StoreEnv) -> None:
    total = 1500

    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as a, store_env.open(clock) as b:
            batch = await a.create_batch(spec(), lines(total))
            claims: list[tuple[str, int]] = []

            async def runner(store: Store, name: str) -> None:
                while True:
                    claimed = await store.claim_lines(batch.id, name, 5, claim_ttl=600)
                    if not claimed:
                        return
                    for c in claimed:
                        claims.append((name, c.line))
                        assert await store.record_result(batch.id, c.line, c.claim_token, ok(c.line))
                    await asyncio.sleep(0.001)  # the other runners get their turn (one store may be much faster)

            await asyncio.gather(*(runner(s, f"{name}{i}") for i in range(4) for name, s in (("a", a), ("b", b))))
            counts = Counter(line for _, line in claims)
            assert sorted(counts) == list(range(1, total + 1))
            assert max(counts.values()) == 1
            assert len({name[0] for name, _ in claims}) == 2  # both replicas took part
            final = await b.get_batch(batch.id, "key-a")
            assert final is not None and final.request_counts == RequestCounts(total, total, 0)

    asyncio.run(main())


def test_result_written_once_when_an_expired_claim_was_taken_over(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as old, store_env.open(clock) as new:
            batch = await old.create_batch(spec(), lines(3))
            [first, second] = await old.claim_lines(batch.id, "old", 2, claim_ttl=10)
            assert (first.line, first.attempts) == (1, 1)
            # Claimed and not expired: nobody else gets them.
            assert [c.line for c in await new.claim_lines(batch.id, "new", 5, claim_ttl=10)] == [3]
            assert await new.count_claimed(batch.id) == 3
            clock.advance(11)  # "old" hangs; its claims expire
            retaken = await new.claim_lines(batch.id, "new", 5, claim_ttl=10)
            assert [(c.line, c.attempts) for c in retaken] == [(1, 2), (2, 2), (3, 2)]
            by_line = {c.line: c for c in retaken}
            # The old runner comes back with a result: refused, the line belongs to the new claim.
            assert await old.record_result(batch.id, 1, first.claim_token, ok(1)) is False
            assert await new.record_result(batch.id, 1, by_line[1].claim_token, ok(1)) is True
            assert await new.record_result(batch.id, 1, by_line[1].claim_token, ok(1)) is False
            # An expired claim nobody took over may still deliver its result.
            clock.advance(11)
            assert await new.record_result(batch.id, 2, by_line[2].claim_token, LineOutcome.failure("e", "m")) is True
            assert await old.record_result(batch.id, 2, second.claim_token, ok(2)) is False
            assert await new.record_result(batch.id, 3, "not-a-token", ok(3)) is False
            state = await old.get_batch(batch.id, "key-a")
            assert state is not None and state.request_counts == RequestCounts(3, 1, 1)
            assert await new.count_claimed(batch.id) == 1
            with pytest.raises(ValueError):
                await new.record_result(
                    batch.id, 3, by_line[3].claim_token, LineOutcome.success(200, None, "{not json")
                )
            # Many results in one transaction: each is written or refused on its own.
            more = await old.create_batch(spec(), lines(4))
            claimed = await old.claim_lines(more.id, "old", 4, claim_ttl=10)
            clock.advance(11)
            [line_1] = await new.claim_lines(more.id, "new", 1, claim_ttl=10)
            written = await old.record_results(
                [
                    (claimed[0], ok(1)),
                    (claimed[1], ok(2)),
                    (by_line[3], LineOutcome.failure("e", "m")),
                    (claimed[3], ok(4)),
                ]
            )
            assert written == [False, True, True, True]  # line 1 was taken over by "new"
            assert await new.record_results([(line_1, ok(1)), (line_1, ok(1))]) == [True, False]
            assert (await old.get_batch(more.id, "key-a")).request_counts == RequestCounts(4, 3, 0)  # type: ignore[union-attr]
            assert (await old.get_batch(batch.id, "key-a")).request_counts == RequestCounts(3, 1, 2)  # type: ignore[union-attr]
            assert await old.count_claimed(batch.id) == 0

    asyncio.run(main())


async def check_result_files(store: Store, batch: Batch, source: list[NewLine]) -> tuple[list[dict], list[dict]]:
    output = await result_lines(store, batch.output_file_id, batch.owner)
    errors = await result_lines(store, batch.error_file_id, batch.owner)
    ids = [r["custom_id"] for r in output] + [r["custom_id"] for r in errors]
    assert sorted(ids) == sorted(line.custom_id for line in source)  # each exactly once, in one file
    order = {line.custom_id: i for i, line in enumerate(source)}
    for rows in (output, errors):
        assert [order[r["custom_id"]] for r in rows] == sorted(order[r["custom_id"]] for r in rows)  # type: ignore[index]
    assert all(r["error"] is None for r in output)
    assert all(r["error"] is not None for r in errors)
    return output, errors


def test_finalize_writes_each_custom_id_once(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as a, store_env.open(clock) as b:
            source = lines(2500)
            batch = await a.create_batch(spec("key-a"), source)
            with pytest.raises(UnfinishedLinesError):
                await a.finalize_batch(batch.id, expect=["in_progress"], status="completed")
            while claimed := await a.claim_lines(batch.id, "h", 100, 60):
                for c in claimed:
                    if c.line % 10 == 0:
                        outcome = LineOutcome.failure(
                            "invalid_request_error",
                            "bad request",
                            status_code=400,
                            request_id=f"rid-{c.line}",
                            body='{"error": {"message": "bad request"}}',
                        )
                    elif c.line % 10 == 5:
                        outcome = LineOutcome.failure("engine_unavailable", "no engine")
                    else:
                        outcome = ok(c.line)
                    assert await a.record_result(batch.id, c.line, c.claim_token, outcome)
            assert await a.set_batch_status(batch.id, expect=["in_progress"], status="finalizing")
            clock.advance(3)
            # Two replicas finalize at once: one writes the files, the other finds it done.
            results = await asyncio.gather(
                a.finalize_batch(batch.id, expect=["finalizing"], status="completed"),
                b.finalize_batch(batch.id, expect=["finalizing"], status="completed"),
            )
            [done] = [r for r in results if r is not None]
            assert done.status == "completed" and done.completed_at == int(clock.now)
            assert done.request_counts == RequestCounts(2500, 2000, 500)
            output, errors = await check_result_files(a, done, source)
            assert len(output) == 2000 and len(errors) == 500
            assert output[0] == {
                "id": output[0]["id"],
                "custom_id": "req-0",
                "response": {"status_code": 200, "request_id": "rid-1", "body": {"choices": [], "line": 1}},
                "error": None,
            }
            assert str(output[0]["id"]).startswith("batch_req_")
            assert len({r["id"] for r in output + errors}) == 2500
            assert errors[0] == {
                "id": errors[0]["id"],
                "custom_id": "req-4",
                "response": None,
                "error": {"code": "engine_unavailable", "message": "no engine"},
            }
            assert errors[1]["response"] == {
                "status_code": 400,
                "request_id": "rid-10",
                "body": {"error": {"message": "bad request"}},
            }
            assert errors[1]["error"] == {"code": "invalid_request_error", "message": "bad request"}
            # The files belong to the batch's owner, purpose batch_output.
            out_file = await a.get_file(done.output_file_id, "key-a")  # type: ignore[arg-type]
            assert out_file is not None and out_file.purpose == "batch_output"
            assert out_file.filename == f"{batch.id}_output.jsonl"
            assert await a.get_file(done.output_file_id, "key-b") is None  # type: ignore[arg-type]
            assert len((await a.list_files("key-a", purpose="batch_output")).items) == 2
            assert await a.finalize_batch(batch.id, expect=["finalizing"], status="completed") is None

    asyncio.run(main())


def test_all_success_has_no_error_file(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            batch = await store.create_batch(spec(None), lines(4))
            for c in await store.claim_lines(batch.id, "h", 10, 60):
                await store.record_result(batch.id, c.line, c.claim_token, ok(c.line))
            done = await store.finalize_batch(batch.id, expect=["in_progress"], status="completed")
            assert done is not None and done.error_file_id is None and done.output_file_id is not None
            assert len(await result_lines(store, done.output_file_id, None)) == 4
            empty = await store.create_batch(spec(None), [])
            nothing = await store.finalize_batch(empty.id, expect=["in_progress"], status="completed")
            assert nothing is not None and nothing.output_file_id is None and nothing.error_file_id is None

    asyncio.run(main())


def test_cancel_stops_new_lines_and_keeps_the_done_ones(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            source = lines(20)
            batch = await store.create_batch(spec(), source)
            [done_line] = await store.claim_lines(batch.id, "h", 1, 60)
            assert await store.record_result(batch.id, done_line.line, done_line.claim_token, ok(done_line.line))
            in_flight = await store.claim_lines(batch.id, "h", 2, 60)
            clock.advance(2)
            cancelling = await store.cancel_batch(batch.id, "key-a")
            assert cancelling is not None and cancelling.status == "cancelling"
            assert cancelling.cancelling_at == int(clock.now)
            assert await store.claim_lines(batch.id, "h", 10, 60) == []  # no new line starts
            # The lines already running finish; the runner waits for them, then fails the rest.
            assert await store.count_claimed(batch.id) == 2
            assert await store.record_result(batch.id, in_flight[0].line, in_flight[0].claim_token, ok(0))
            assert await store.fail_pending(batch.id, "batch_cancelled", "The batch was cancelled.") == 18
            # The other in-flight line comes back too late: already failed, refused.
            assert not await store.record_result(batch.id, in_flight[1].line, in_flight[1].claim_token, ok(0))
            assert await store.fail_pending(batch.id, "batch_cancelled", "again") == 0
            again = await store.cancel_batch(batch.id, "key-a")
            assert again is not None and again.status == "cancelling"  # unchanged, not an error
            cancelled = await store.finalize_batch(batch.id, expect=["cancelling"], status="cancelled")
            assert cancelled is not None and cancelled.status == "cancelled"
            assert cancelled.request_counts == RequestCounts(20, 2, 18)
            output, errors = await check_result_files(store, cancelled, source)
            assert len(output) == 2
            assert {r["error"]["code"] for r in errors} == {"batch_cancelled"}  # type: ignore[index]
            late = await store.cancel_batch(batch.id, "key-a")
            assert late is not None and late.status == "cancelled"

    asyncio.run(main())


def test_expired_batches_keep_their_done_lines(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            source = lines(6)
            short = await store.create_batch(spec(window=60), source)
            long = await store.create_batch(spec(window=DAY), lines(1))
            for c in await store.claim_lines(short.id, "h", 2, 600):
                await store.record_result(short.id, c.line, c.claim_token, ok(c.line))
            await store.claim_lines(short.id, "h", 1, 600)  # in flight when it expires
            assert await store.list_expired_batches() == []
            clock.advance(61)
            assert [b.id for b in await store.list_expired_batches()] == [short.id]
            assert await store.fail_pending(short.id, "batch_expired", "The batch expired.") == 4
            expired = await store.finalize_batch(short.id, expect=["in_progress"], status="expired")
            assert expired is not None and expired.expired_at == int(clock.now)
            output, errors = await check_result_files(store, expired, source)
            assert (len(output), len(errors)) == (2, 4)
            assert await store.list_expired_batches() == []
            assert (await store.get_batch(long.id, "key-a")).status == "in_progress"  # type: ignore[union-attr]

    asyncio.run(main())


def test_unknown_ids_give_nothing_not_errors(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            assert await store.get_batch("batch_nope", ALL_OWNERS) is None
            assert await store.cancel_batch("batch_nope", "k") is None
            assert await store.claim_lines("batch_nope", "h", 5, 60) == []
            assert await store.record_result("batch_nope", 1, "t", ok(1)) is False
            assert await store.fail_pending("batch_nope", "c", "m") == 0
            assert await store.count_claimed("batch_nope") == 0
            assert await store.finalize_batch("batch_nope", expect=["in_progress"], status="completed") is None
            assert await store.acquire_batch_lease("h", 30, batch_id="batch_nope") is None
            assert await store.release_lease("batch_nope", "h") is False
            assert await store.get_file("file-nope", ALL_OWNERS) is None
            assert await store.file_content("file-nope", None) is None
            assert await store.delete_file("file-nope", None) is False
            assert await store.claim_lines("batch_nope", "h", 0, 60) == []
            with pytest.raises(ValueError):
                await store.finalize_batch("batch_nope", expect=["in_progress"], status="finalizing")

    asyncio.run(main())
