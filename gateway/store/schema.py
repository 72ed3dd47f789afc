"""The store's schema, as numbered migrations for each backend, and the code that applies them.

A migration is applied once, in the same transaction that records its number in
`schema_version`; the backend holds a lock around the whole run (PostgreSQL: an advisory
transaction lock; SQLite: BEGIN IMMEDIATE), so replicas starting together apply each migration
exactly once. Add a change as a new version in both lists; never edit an applied one.

Layout notes: every listing pages on a `seq` column that only grows (a stable cursor);
`file_parts` holds file content in 1 MiB parts; the partial index on unfinished batch lines
keeps claiming cheap when most of a 50,000-line batch is done.
"""

from __future__ import annotations

import time

from gateway.store.db import Conn, Migration

_BATCH_COLUMNS = """
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window BIGINT NOT NULL,
    metadata TEXT,
    status TEXT NOT NULL,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    in_progress_at BIGINT,
    finalizing_at BIGINT,
    completed_at BIGINT,
    failed_at BIGINT,
    expired_at BIGINT,
    cancelling_at BIGINT,
    cancelled_at BIGINT,
    total_count INTEGER NOT NULL DEFAULT 0,
    completed_count INTEGER NOT NULL DEFAULT 0,
    failed_count INTEGER NOT NULL DEFAULT 0,
    lease_holder TEXT,
    lease_expires {float}
"""

_LINE_COLUMNS = """
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    claim_holder TEXT,
    claim_token TEXT,
    claim_expires {float},
    status_code INTEGER,
    request_id TEXT,
    response TEXT,
    error_code TEXT,
    error_message TEXT,
    finished_at {float},
    PRIMARY KEY (batch_id, line)
"""

_REQUEST_COLUMNS = """
    time {float} NOT NULL,
    request_id TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    route TEXT,
    engine TEXT,
    status INTEGER NOT NULL,
    error_code TEXT,
    stream {bool} NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    ttft {float},
    duration {float} NOT NULL,
    finish_reason TEXT,
    client_disconnect {bool} NOT NULL,
    batch_id TEXT,
    payload TEXT
"""

_FILE_COLUMNS = """
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL
"""

_INDEXES = (
    "CREATE INDEX files_owner ON files (owner, seq)",
    "CREATE INDEX batches_owner ON batches (owner, seq)",
    "CREATE INDEX batches_runnable ON batches (status, expires_at)",
    "CREATE UNIQUE INDEX batch_lines_custom_id ON batch_lines (batch_id, custom_id)",
    # Only unfinished lines: a claim finds work without walking past thousands of done lines.
    "CREATE INDEX batch_lines_unfinished ON batch_lines (batch_id, line) WHERE state IN ('pending', 'claimed')",
    "CREATE INDEX requests_time ON requests (time)",
    "CREATE INDEX requests_model_time ON requests (model, time, seq)",
    "CREATE INDEX requests_key ON requests (key_id, seq)",
)


def _v1(serial: str, float_type: str, bool_type: str, blob: str) -> tuple[str, ...]:
    types = {"float": float_type, "bool": bool_type}
    return (
        f"CREATE TABLE files (seq {serial}, {_FILE_COLUMNS})",
        f"CREATE TABLE file_parts (file_id TEXT NOT NULL, part INTEGER NOT NULL, data {blob} NOT NULL,"
        " PRIMARY KEY (file_id, part))",
        f"CREATE TABLE batches (seq {serial}, id TEXT NOT NULL UNIQUE, owner TEXT, {_BATCH_COLUMNS.format(**types)})",
        f"CREATE TABLE batch_lines ({_LINE_COLUMNS.format(**types)})",
        f"CREATE TABLE requests (seq {serial}, {_REQUEST_COLUMNS.format(**types)})",
        *_INDEXES,
    )


def _v2(serial: str, float_type: str) -> tuple[str, ...]:
    return (
        # hour: Unix seconds at its start; "" where a request had no team, organization or route
        "CREATE TABLE spend_hourly (hour BIGINT NOT NULL, key_id TEXT NOT NULL, team_id TEXT NOT NULL,"
        " org_id TEXT NOT NULL, model TEXT NOT NULL, route TEXT NOT NULL, requests BIGINT NOT NULL,"
        " prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,"
        " spend BIGINT NOT NULL, PRIMARY KEY (hour, key_id, team_id, org_id, model, route))",
        "CREATE INDEX spend_team ON spend_hourly (team_id, hour)",
        f"CREATE TABLE audit_log (seq {serial}, time {float_type} NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL,"
        " via TEXT NOT NULL, address TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, team TEXT,"
        " before_json TEXT, after_json TEXT)",
        "CREATE INDEX audit_time ON audit_log (time)",
        "CREATE INDEX audit_team ON audit_log (team, seq)",
    )


def _v3(serial: str, float_type: str) -> tuple[str, ...]:
    # Stored Responses API answers (`store: true`): the response object and the input it
    # answered, as JSON text; read back whole by id, deleted by retention on created_at.
    return (
        f"CREATE TABLE responses (seq {serial}, id TEXT NOT NULL UNIQUE, owner TEXT,"
        f" created_at {float_type} NOT NULL, response TEXT NOT NULL, input_items TEXT NOT NULL)",
        "CREATE INDEX responses_created ON responses (created_at)",
        "ALTER TABLE requests ADD COLUMN api TEXT",  # chat, completions, embeddings, responses, messages, ...
    )


_V3 = "stored responses; the inference log's api"

SQLITE_MIGRATIONS = (
    Migration(1, "files, batches, batch lines, inference log", _v1("INTEGER PRIMARY KEY", "REAL", "INTEGER", "BLOB")),
    Migration(2, "spend rollups, audit log", _v2("INTEGER PRIMARY KEY", "REAL")),
    Migration(3, _V3, _v3("INTEGER PRIMARY KEY", "REAL")),
)

POSTGRES_MIGRATIONS = (
    Migration(
        1,
        "files, batches, batch lines, inference log",
        (
            *_v1("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION", "BOOLEAN", "BYTEA"),
            # File parts compress well (JSONL, 2-3x), but the default pglz makes writing them 2-4x
            # slower; lz4 (PostgreSQL 14+, where the server was built with it) compresses as
            # well at almost no cost. Measured on 1 MiB parts of batch JSONL.
            "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
            " AND 'lz4' = ANY(enumvals)) THEN ALTER TABLE file_parts ALTER COLUMN data SET COMPRESSION lz4;"
            " END IF; END $$",
        ),
    ),
    Migration(
        2, "spend rollups, audit log", _v2("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION")
    ),
    Migration(3, _V3, _v3("BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION")),
)

SCHEMA_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"


async def apply_migrations(conn: Conn, migrations: tuple[Migration, ...] | list[Migration]) -> int:
    """Inside the caller's locked transaction: apply what is missing; returns the version now."""
    await conn.execute(SCHEMA_VERSION_TABLE)
    row = await conn.fetchrow("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version")
    current = int(row["version"]) if row else 0
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version <= current:
            continue
        for statement in migration.statements:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            int(time.time()),
        )
        current = migration.version
    return current
