"""The SQLite backend (the embedded default), on aiosqlite: one file under the data directory.

Two connections per store, each on its own aiosqlite thread so the event loop never blocks:
a writer, taken by one transaction at a time (an asyncio lock within the process, BEGIN
IMMEDIATE between processes, so a transaction never has to upgrade its lock and fail), and a
reader for everything else. In WAL mode readers never wait for the writer, so a download or a
log query runs while a batch is being written. `synchronous=NORMAL` in WAL mode loses nothing
when the process crashes (only the last transactions on a power cut). `busy_timeout` makes
other processes on the same file (`--workers N`) wait for the write lock instead of failing.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from functools import lru_cache
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.store.db import Conn, Database, Migration, Row, UniqueViolation
from gateway.store.records import StoreError
from gateway.store.schema import apply_migrations

BUSY_TIMEOUT_SECONDS = 30.0


@lru_cache(maxsize=512)
def _sqlite_sql(sql: str) -> str:
    """`$1` (PostgreSQL) -> `?1` (SQLite's numbered parameter: same number, same value)."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


class SqliteConn(Conn):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        try:
            rows: Iterable[Any] = await self._conn.execute_fetchall(_sqlite_sql(sql), args)
            return list(rows)
        except sqlite3.IntegrityError as exc:
            raise _translate(exc) from exc

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            async with self._conn.execute(_sqlite_sql(sql), args) as cursor:
                return max(cursor.rowcount, 0)
        except sqlite3.IntegrityError as exc:
            raise _translate(exc) from exc

    async def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        marks = ", ".join("?" for _ in columns)
        try:
            await self._conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
        except sqlite3.IntegrityError as exc:
            raise _translate(exc) from exc


def _translate(exc: sqlite3.IntegrityError) -> Exception:
    unique = getattr(exc, "sqlite_errorname", "") in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")
    return UniqueViolation(str(exc)) if unique else exc


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: autocommit; transactions are begun explicitly with BEGIN IMMEDIATE.
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)
    try:
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        await _use_wal(conn)
        await conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        await conn.close()  # else its thread outlives us and holds the process open at exit
        raise
    return conn


async def _use_wal(conn: aiosqlite.Connection) -> None:
    """Switching a new file to WAL takes an exclusive lock, and where waiting for it could
    deadlock (replicas or workers opening a new file together) SQLite answers "database is
    locked" at once instead of waiting out busy_timeout; so wait here and try again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_TIMEOUT_SECONDS
    while True:
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or loop.time() > deadline:
                raise
        await asyncio.sleep(0.02)


class SqliteDatabase(Database):
    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await _connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the SQLite store {path}: {exc}") from exc
        try:
            reader = await _connect(path)
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader, path)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Conn]:
        yield SqliteConn(self._reader)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Conn]:
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteConn(self._writer)
                await self._writer.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):  # raised when no transaction is left to roll back
                    await self._writer.execute("ROLLBACK")
                raise

    async def migrate(self, migrations: Sequence[Migration]) -> int:
        # BEGIN IMMEDIATE takes the database's write lock before schema_version is read, so a
        # second process starting at the same moment waits and then finds the work done.
        async with self.write() as conn:
            return await apply_migrations(conn, list(migrations))

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()
