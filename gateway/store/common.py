"""What the parts of the SQL store share: the database seam, the clock, ids and small SQL helpers."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from gateway.store.db import Database
from gateway.store.records import ALL_OWNERS, OwnerScope

T = TypeVar("T")
Clock = Callable[[], float]
MAX_PAGE = 10000


class SqlBase:
    """The state every part of the store works on. Time comes from `clock` (Unix seconds), so
    tests can move it; replicas rely on their clocks agreeing to well within a lease's TTL."""

    def __init__(self, db: Database, clock: Clock = time.time) -> None:
        self.db = db
        self.clock = clock


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def owner_clause(owner: OwnerScope, args: list[Any]) -> str:
    """` AND owner ...` for the owner's rows; empty for the admin (ALL_OWNERS). Appends to args."""
    if owner is ALL_OWNERS:
        return ""
    if owner is None:
        return " AND owner IS NULL"
    args.append(owner)
    return f" AND owner = ${len(args)}"


_NAME = re.compile(r"^[a-z_]+$")


def sql_list(values: Iterable[str]) -> str:
    """A literal list of the store's own constants (statuses, states), never of caller input."""
    items = list(values)
    if not items or not all(_NAME.match(v) for v in items):
        raise ValueError(f"not a list of plain names: {items!r}")
    return "(" + ", ".join(f"'{v}'" for v in items) + ")"


async def newest_first(
    db: Database,
    table: str,
    columns: Iterable[str],
    limit: int,
    equal: Iterable[tuple[str, object]],
    *,
    since: float | None = None,
    until: float | None = None,
    after: int | None = None,
) -> tuple[list[Any], bool]:
    """One page of a log table (`seq`, `time` and `columns`), newest first: the rows whose
    `equal` columns match (a None value matches all), in [since, until), older than the `seq`
    `after`. Returns the rows and whether more follow."""
    n = page_size(limit)
    args: list[object] = []
    clauses = []
    for column, value in equal:
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    for clause, value in (("time >=", since), ("time <", until)):
        if value is not None:
            args.append(float(value))
            clauses.append(f"{clause} ${len(args)}")
    if after is not None:
        args.append(int(after))
        clauses.append(f"seq < ${len(args)}")
    args.append(n + 1)
    sql = (
        f"SELECT seq, {', '.join(columns)} FROM {table} WHERE {' AND '.join(clauses) or 'TRUE'}"
        f" ORDER BY seq DESC LIMIT ${len(args)}"
    )
    async with db.read() as conn:
        rows = await conn.fetch(sql, *args)
    return rows[:n], len(rows) > n


def page_size(limit: int) -> int:
    return max(1, min(int(limit), MAX_PAGE))


async def aiter_any(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
