"""Extending and handing back claims (the batch runner's keeper), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from gateway.store.batches import ANALYZE_AFTER_LINES
from testkit.stores import FakeClock, StoreEnv, fresh_database
from tests.test_store_batches import lines, ok, spec


def test_extended_claims_are_not_taken_over(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            batch = await store.create_batch(spec(), lines(6))
            slow = await store.claim_lines(batch.id, "a", 2, claim_ttl=10)
            other = await store.claim_lines(batch.id, "a", 2, claim_ttl=10)
            assert await store.record_results([(slow[0], ok(slow[0].line))]) == [True]
            clock.advance(8)
            # Only lines still claimed under the given claims move: one of `slow`, none of `other`.
            assert await store.extend_claims(batch.id, [slow[0].claim_token], 10) == 1
            assert await store.extend_claims(batch.id, [], 10) == 0
            clock.advance(5)  # `other` expired, the rest of `slow` did not
            retaken = await store.claim_lines(batch.id, "b", 10, claim_ttl=10)
            assert sorted(c.line for c in retaken) == sorted([*(c.line for c in other), 5, 6])
            assert await store.record_results([(slow[1], ok(slow[1].line))]) == [True]

    asyncio.run(main())


def test_a_zero_ttl_hands_claims_back_at_once(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            batch = await store.create_batch(spec(), lines(3))
            claimed = await store.claim_lines(batch.id, "a", 3, claim_ttl=600)
            assert await store.claim_lines(batch.id, "b", 3, claim_ttl=600) == []
            assert await store.extend_claims(batch.id, [claimed[0].claim_token], 0) == 3
            clock.advance(0.001)
            again = await store.claim_lines(batch.id, "b", 3, claim_ttl=600)
            assert [c.line for c in again] == [1, 2, 3]
            # the old claim's late results are refused; the new ones count
            assert await store.record_results([(claimed[0], ok(1))]) == [False]
            assert await store.record_results([(again[0], ok(1))]) == [True]

    asyncio.run(main())


def test_a_big_batch_leaves_fresh_planner_statistics(tmp_path: Path) -> None:
    """On PostgreSQL, claims walk the unfinished-lines index in order only when the planner knows
    the batch's lines are many: create_batch refreshes the statistics after a big insert."""

    async def main(url: str) -> None:
        async with StoreEnv("postgresql", url, tmp_path).open() as store:
            await store.create_batch(spec(), lines(ANALYZE_AFTER_LINES))
        conn = await asyncpg.connect(url)
        try:
            tuples = await conn.fetchval("SELECT reltuples FROM pg_class WHERE relname = 'batch_lines'")
        finally:
            await conn.close()
        assert tuples >= ANALYZE_AFTER_LINES

    with fresh_database() as url:
        asyncio.run(main(url))
