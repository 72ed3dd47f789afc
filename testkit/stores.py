"""Fixtures for store tests: every test that takes `store_env` runs on both backends.

SQLite: a fresh file under the test's tmp_path. PostgreSQL: the server on 127.0.0.1:5432 (user
postgres, trust auth); the session creates a database of its own with a unique name and drops
it at the end, and each test starts from an empty schema. Without that server the PostgreSQL
half is skipped locally and fails under CI=true.

The only place outside gateway/store/ that touches a driver (asyncpg): creating and dropping
the test database is administration the store itself has no business offering.

Registered as a plugin in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from gateway.store import Store, open_store
from testkit.ci import require

PG_SERVER = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")


class FakeClock:
    """The store's clock, moved by hand: leases and claims expire without sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class StoreEnv:
    backend: str
    url: str
    data_dir: Path

    @asynccontextmanager
    async def open(self, clock: FakeClock | None = None) -> AsyncIterator[Store]:
        store = await open_store(self.url, self.data_dir, clock=clock or FakeClock())
        try:
            yield store
        finally:
            await store.close()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres", timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _reset_schema(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@contextmanager
def fresh_database(prefix: str = "gateway_test") -> Iterator[str]:
    """A PostgreSQL database of its own (for gateways started by a test), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        require(False, f"PostgreSQL at {PG_SERVER} (user postgres) is not usable: {exc}")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> StoreEnv:
    if request.param == "sqlite":
        return StoreEnv("sqlite", "sqlite:///store.db", tmp_path)
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(_reset_schema(url))
    return StoreEnv("postgresql", url, tmp_path)


@contextmanager
def sqlite_locked(env: StoreEnv) -> Iterator[None]:
    """Another client holds the SQLite store's write lock for the block: every write waits, as
    on a slow store."""
    conn = sqlite3.connect(env.data_dir / "store.db", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("COMMIT")
        conn.close()
