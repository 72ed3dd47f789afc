"""Stored Responses API answers in both store backends: saved, read back by their owner only,
deleted, trimmed by retention; and the inference log's `api` column (migration 2)."""

from __future__ import annotations

import asyncio

from gateway.store import ALL_OWNERS, InferenceRecord, RequestFilter
from testkit.stores import FakeClock, StoreEnv


def test_responses_are_kept_per_owner_and_trimmed(store_env: StoreEnv) -> None:
    async def main() -> None:
        clock = FakeClock()
        async with store_env.open(clock) as store:
            response = {"id": "resp_1", "object": "response", "output": [{"type": "message", "content": "é"}]}
            items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
            await store.save_response("resp_1", "key_a", response, items)
            got = await store.get_response("resp_1", "key_a")
            assert got is not None and got.response == response and got.input_items == items
            assert got.owner == "key_a" and got.created_at == clock.now
            assert await store.get_response("resp_1", "key_b") is None
            assert await store.get_response("resp_1", None) is None
            assert (await store.get_response("resp_1", ALL_OWNERS)) is not None
            assert not await store.delete_response("resp_1", "key_b")
            clock.advance(100)
            await store.save_response("resp_2", None, {"id": "resp_2"}, [])
            assert await store.delete_responses_before(clock.now - 50) == 1
            assert await store.get_response("resp_1", "key_a") is None
            assert await store.delete_response("resp_2", None)
            assert not await store.delete_response("resp_2", None)

            await store.append_requests(
                [InferenceRecord(time=clock.now, request_id="r1", model="m", status=200, duration=0.1, api="messages")]
            )
            rows = (await store.query_requests(RequestFilter())).items
            assert [r.api for r in rows] == ["messages"]
            assert (await store.query_requests(RequestFilter(api="chat"))).items == []

    asyncio.run(main())
