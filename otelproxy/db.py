"""The SQLite index beside the JSONL files: ``{log_dir}/sessions.db``.

Tables (``PRAGMA user_version`` holds ``DB_VERSION``):

- ``sessions``: one row per conversation or branch (the seed's table plus parent/fork point,
  client session id, model, system prompt hash and token totals). ``last_seq`` numbers the
  session's exchanges; ``state_seq`` is the last turn that succeeded, whose state
  (``last_fingerprint``) a continuation must match. Owned by the session processor.
- ``fingerprints``: ``(fingerprint, session_id, seq)`` — the conversation state after turn
  ``seq``. The seed made ``fingerprint`` the primary key; here it is ``(fingerprint, session_id)``
  because a branch shares its parent's history and two clients may send the same first turn.
- ``exchanges``: one row per forwarded request (tracked or not) with where its entries sit in
  which JSONL file, so listing never scans files. Owned by the local store sink.
- ``record_journal``: the JSONL bytes of the last batch, committed with its rows and written to
  the files after the commit; a crash or a failed write leaves them here and the store writes
  them before anything else (so JSONL and index agree after any crash). Empty most of the time.

WAL mode: the proxy's writer threads and ``otelproxy sessions``/``show`` readers run at once.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

DB_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    upstream TEXT NOT NULL,
    created_at TEXT NOT NULL,
    last_activity TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    last_fingerprint TEXT NOT NULL,
    state_seq INTEGER NOT NULL DEFAULT 0,
    file_path TEXT NOT NULL,
    parent_id TEXT,
    fork_from_seq INTEGER,
    branch_count INTEGER NOT NULL DEFAULT 0,
    client_session_id TEXT,
    model TEXT,
    system_sha256 TEXT,
    last_response_id TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'conversation',
    agent_id TEXT,
    parent_agent_id TEXT,
    compactions INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS fingerprints (
    fingerprint TEXT NOT NULL,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,
    PRIMARY KEY (fingerprint, session_id)
);
CREATE TABLE IF NOT EXISTS exchanges (
    id TEXT PRIMARY KEY,
    session_id TEXT,
    seq INTEGER,
    ts TEXT NOT NULL,
    provider TEXT NOT NULL,
    upstream TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER,
    outcome TEXT NOT NULL,
    model TEXT,
    stop_reason TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cache_read_input_tokens INTEGER,
    cache_creation_input_tokens INTEGER,
    ttfb_ms REAL,
    total_ms REAL,
    user_preview TEXT,
    assistant_preview TEXT,
    file_path TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    agent_id TEXT,
    compaction TEXT
);
CREATE TABLE IF NOT EXISTS record_journal (
    file_path TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_fingerprints_session ON fingerprints(session_id);
CREATE INDEX IF NOT EXISTS idx_sessions_provider ON sessions(provider);
CREATE INDEX IF NOT EXISTS idx_sessions_client ON sessions(client_session_id, agent_id);
CREATE INDEX IF NOT EXISTS idx_exchanges_session ON exchanges(session_id, seq);
CREATE INDEX IF NOT EXISTS idx_exchanges_ts ON exchanges(ts);
"""


MIGRATIONS = {
    1: """
ALTER TABLE sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'conversation';
UPDATE sessions SET kind = 'branch' WHERE parent_id IS NOT NULL;
ALTER TABLE sessions ADD COLUMN agent_id TEXT;
ALTER TABLE sessions ADD COLUMN parent_agent_id TEXT;
ALTER TABLE sessions ADD COLUMN compactions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE exchanges ADD COLUMN agent_id TEXT;
ALTER TABLE exchanges ADD COLUMN compaction TEXT;
DROP INDEX IF EXISTS idx_sessions_client;
""",
}
"""``{version: script}`` bringing an index of that version to the next one."""


class SchemaMismatch(Exception):
    pass


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the index, creating or checking the schema."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10,
                               check_same_thread=False)
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # SQLite gives the -wal and -shm files the database file's mode: create it owner-only.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False,
                               isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if readonly:
        if version != DB_VERSION:
            raise SchemaMismatch(f"{path}: schema version {version}, expected {DB_VERSION}")
        return conn
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    if version not in (0, DB_VERSION) and version not in MIGRATIONS:
        raise SchemaMismatch(f"{path}: schema version {version}, this otelproxy writes "
                             f"{DB_VERSION}; move the old log dir aside")
    while version in MIGRATIONS:
        conn.executescript(f"BEGIN; {MIGRATIONS[version]} PRAGMA user_version = {version + 1};"
                           " COMMIT;")
        version += 1
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version = {DB_VERSION}")
    return conn
