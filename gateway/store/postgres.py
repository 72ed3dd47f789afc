"""The PostgreSQL backend, for several gateway replicas sharing one store.

Driver: asyncpg, chosen over psycopg 3 (async) for speed and for what the store leans on. It
speaks the binary protocol natively (bytea parts and floats travel without text conversion),
prepares and caches every statement, and its `copy_records_to_table` feeds COPY from Python
tuples: the 50,000 lines of a batch and the inference log's rows go in at COPY speed, several
times faster than executemany. Its pool is built in and mature (MagicStack, years of production
use). The one caveat: behind PgBouncer in transaction mode its statement cache must be off;
connect to PostgreSQL directly (or in session mode).

Transactions run at READ COMMITTED; every claim and compare-and-set is one statement whose WHERE
is re-checked on the row's newest version, and claims skip rows other transactions hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from gateway.core.errors import invalid
from gateway.settings.store import redact_url
from gateway.store.db import Conn, Database, Migration, Row, UniqueViolation
from gateway.store.records import StoreError
from gateway.store.schema import apply_migrations

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_SECONDS = 10.0
STATEMENT_TIMEOUT_SECONDS = 120.0
# One advisory lock id for "migrating the gateway's schema", the same in every replica.
MIGRATION_LOCK_ID = int.from_bytes(hashlib.sha256(b"llm-gateway store migrations").digest()[:8], "big", signed=True)


def _no_nul(args: Sequence[Any]) -> None:
    """PostgreSQL's text refuses NUL: a 400 here rather than the driver's error (a 500). The
    routes check what clients send before it gets here; this is the last line."""
    for arg in args:
        if isinstance(arg, str) and "\x00" in arg:
            raise invalid("A value holds a NUL character, which the store cannot keep.")
        if isinstance(arg, (list, tuple)):
            _no_nul(arg)


class PostgresConn(Conn):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        _no_nul(args)
        try:
            return list(await self._conn.fetch(sql, *args))
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        _no_nul(args)
        try:
            row: Row | None = await self._conn.fetchrow(sql, *args)
            return row
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc

    async def execute(self, sql: str, *args: Any) -> int:
        _no_nul(args)
        try:
            status: str = await self._conn.execute(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc
        # The command tag: "UPDATE 3", "DELETE 0", "INSERT 0 1", "CREATE TABLE".
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        _no_nul(rows)
        try:
            await self._conn.copy_records_to_table(table, records=rows, columns=list(columns))
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc


class PostgresDatabase(Database):
    skip_locked = " FOR UPDATE SKIP LOCKED"
    for_update = " FOR UPDATE"

    def in_subquery(self, subquery: str) -> str:
        # Not `IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)`: as a semi-join the planner may
        # re-run the subquery per outer row and lock (and update) more than n rows. An ARRAY()
        # subquery is an init plan, run once.
        return f"= ANY(ARRAY({subquery}))"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str) -> PostgresDatabase:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=POOL_MIN_SIZE,
                max_size=POOL_MAX_SIZE,
                timeout=CONNECT_TIMEOUT_SECONDS,
                command_timeout=STATEMENT_TIMEOUT_SECONDS,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"cannot connect to the PostgreSQL store {redact_url(dsn)}: {exc}") from exc
        return cls(pool)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn:
            yield PostgresConn(conn)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresConn(conn)

    async def analyze(self, table: str) -> None:
        # Takes only a ShareUpdateExclusiveLock: reads and writes go on meanwhile.
        async with self._pool.acquire() as conn:
            await conn.execute(f"ANALYZE {table}")

    async def migrate(self, migrations: Sequence[Migration]) -> int:
        async with self.write() as conn:
            # Held until this transaction ends: replicas starting together migrate one at a
            # time, and the later ones find schema_version already up to date.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            return await apply_migrations(conn, list(migrations))

    async def close(self) -> None:
        await self._pool.close()
