"""The store's own defence against a NUL (PostgreSQL's text refuses it; the driver's error was a
500): on PostgreSQL a value holding one is a 400 before any query runs, on SQLite it is kept
like any other text. The routes check identifiers before they get here (tests/test_fuzz_ids.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.errors import GatewayError
from testkit.stores import StoreEnv


def test_a_nul_never_reaches_postgresql(store_env: StoreEnv) -> None:
    async def main() -> None:
        async with store_env.open() as store:
            record = await store.create_file("key_a", "batch", "in.jsonl", b'{"a": 1}\n')
            calls = [
                store.get_file("file-\x00", "key_a"),
                store.get_file(record.id + "\x00", "key_a"),
                store.list_files("key_a", after="\x00"),
                store.get_batch("batch_\x00", "key_a"),
                store.list_batches("key_a", after="\x00"),
                store.create_file("key_a", "batch", "in\x00.jsonl", b"x\n"),
            ]
            for call in calls:
                if store_env.backend == "postgresql":
                    with pytest.raises(GatewayError) as err:
                        await call
                    assert err.value.status == 400 and "NUL" in err.value.message
                else:
                    await call  # SQLite keeps any text; the routes refuse it before it comes here
            assert await store.get_file(record.id, "key_a") == record  # the store is unharmed

    asyncio.run(main())
