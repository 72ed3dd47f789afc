"""The seam between the store's logic and a database driver.

The store's SQL is written once, in PostgreSQL's `$1` placeholder style, which SQLite also reads
once `$n` becomes `?n`. What differs between the backends sits behind this small interface: how
a connection and a transaction are had, row locking (`FOR UPDATE SKIP LOCKED` on PostgreSQL;
SQLite has one writer at a time, so it needs none), bulk inserts (COPY or executemany) and how
concurrent migrations are kept apart. So both backends run the very same logic and cannot drift.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


class Conn(ABC):
    """One connection, either in autocommit (from Database.read) or in a transaction (write)."""

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the number of rows it changed."""

    @abstractmethod
    async def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Bulk insert, the fastest way the backend has. Raises UniqueViolation on a duplicate key."""


class UniqueViolation(Exception):
    """A unique constraint refused a row (the driver's own exception, translated)."""


class Database(ABC):
    # Appended to a SELECT whose rows the statement goes on to update: the rows another
    # transaction holds are skipped, so concurrent claimers never block on, nor share, a row.
    skip_locked: str = ""
    # Appended to a SELECT of a row the transaction will update: later writers wait for it.
    for_update: str = ""

    def in_subquery(self, subquery: str) -> str:
        """`column <this>` matches the rows `subquery` selects, the subquery run exactly once."""
        return f"IN ({subquery})"

    @abstractmethod
    def read(self) -> AbstractAsyncContextManager[Conn]:
        """A connection for reads outside any transaction of ours (each statement sees the latest
        committed data)."""

    @abstractmethod
    def write(self) -> AbstractAsyncContextManager[Conn]:
        """A transaction: committed when the block ends, rolled back when it raises."""

    async def analyze(self, table: str) -> None:
        """Refresh the planner's statistics of `table` after a bulk insert (where it has any)."""
        return None

    @abstractmethod
    async def migrate(self, migrations: Sequence[Migration]) -> int:
        """Apply the migrations not yet applied, under a lock that keeps replicas starting at the
        same time apart; returns the schema version now in force."""

    @abstractmethod
    async def close(self) -> None: ...
