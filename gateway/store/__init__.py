"""Durable storage shared by the gateway's replicas: files, batches and their lines, the
inference log. SQLite (embedded, the default) or PostgreSQL (several replicas), chosen by URL.

    store = await open_store(settings.store.url, settings.store.data_dir)
    ...
    await store.close()

Only this package imports the database drivers.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway.settings.store import (
    SQLITE_PREFIX,
    StoreConfigError,
    StoreSettings,
    check_store_url,
    parse_store_settings,
    redact_url,
    sqlite_path,
)
from gateway.store.base import Store
from gateway.store.common import Clock
from gateway.store.db import Database
from gateway.store.postgres import PostgresDatabase
from gateway.store.records import (
    ALL_OWNERS,
    BATCH_STATUSES,
    FINAL_STATUSES,
    SPEND_GROUPS,
    AuditEntry,
    Batch,
    BatchError,
    BatchSpec,
    ClaimedLine,
    DuplicateCustomIdError,
    FileRecord,
    FileTooLargeError,
    InferenceRecord,
    LineOutcome,
    NewLine,
    Owner,
    OwnerScope,
    Page,
    ReportRow,
    RequestCounts,
    RequestFilter,
    SpendQuery,
    SpendRow,
    StoredResponse,
    StoreError,
    UnfinishedLinesError,
)
from gateway.store.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from gateway.store.sql_store import SqlStore
from gateway.store.sqlite import SqliteDatabase

__all__ = [
    "ALL_OWNERS",
    "BATCH_STATUSES",
    "FINAL_STATUSES",
    "SPEND_GROUPS",
    "AuditEntry",
    "Batch",
    "BatchError",
    "BatchSpec",
    "ClaimedLine",
    "DuplicateCustomIdError",
    "FileRecord",
    "FileTooLargeError",
    "InferenceRecord",
    "LineOutcome",
    "NewLine",
    "Owner",
    "OwnerScope",
    "Page",
    "ReportRow",
    "RequestCounts",
    "RequestFilter",
    "SpendQuery",
    "SpendRow",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreSettings",
    "StoredResponse",
    "UnfinishedLinesError",
    "open_store",
    "parse_store_settings",
    "redact_url",
]


async def open_store(url: str, data_dir: str | Path = "./data", *, clock: Clock = time.time) -> Store:
    """Connect, create or migrate the schema (safe when replicas start together), and return the
    store. A relative `sqlite:///` path lies under `data_dir`, created if missing."""
    check_store_url(url)
    db: Database
    if url.startswith(SQLITE_PREFIX):
        db, migrations = await SqliteDatabase.open(sqlite_path(url, Path(data_dir))), SQLITE_MIGRATIONS
    else:
        db, migrations = await PostgresDatabase.open(url), POSTGRES_MIGRATIONS
    try:
        await db.migrate(migrations)
    except BaseException:
        await db.close()
        raise
    return SqlStore(db, clock)
