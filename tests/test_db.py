"""The SQLite index: schema creation and migration of an older index in place."""

from __future__ import annotations

import sqlite3

import pytest

from otelproxy import db

# The schema otelproxy 0.1 wrote (user_version 1), as it was.
V1_SCHEMA = """
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
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0
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
    length INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_fingerprints_session ON fingerprints(session_id);
CREATE INDEX IF NOT EXISTS idx_sessions_provider ON sessions(provider);
CREATE INDEX IF NOT EXISTS idx_sessions_client ON sessions(client_session_id);
CREATE INDEX IF NOT EXISTS idx_exchanges_session ON exchanges(session_id, seq);
CREATE INDEX IF NOT EXISTS idx_exchanges_ts ON exchanges(ts);
"""


def test_a_version_1_index_is_migrated_and_keeps_its_rows(tmp_path):
    """An index written by the previous version gains the agent/kind columns; rows survive and
    branches become kind 'branch'."""
    path = tmp_path / "sessions.db"
    old = sqlite3.connect(path)
    old.executescript(V1_SCHEMA)
    old.executescript(
        "INSERT INTO sessions (id, provider, upstream, created_at, last_activity, last_seq,"
        " last_fingerprint, file_path, parent_id, fork_from_seq) VALUES"
        " ('s1', 'anthropic', 'u', 't', 't', 3, 'f', 'anthropic/s1.jsonl', NULL, NULL),"
        " ('s1_b1', 'anthropic', 'u', 't', 't', 2, 'f', 'anthropic/s1_b1.jsonl', 's1', 1);"
        "PRAGMA user_version = 1;")
    old.close()
    conn = db.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.DB_VERSION
    rows = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM sessions")}
    assert (rows["s1"]["kind"], rows["s1_b1"]["kind"]) == ("conversation", "branch")
    assert rows["s1"]["agent_id"] is None and rows["s1"]["compactions"] == 0
    conn.execute("INSERT INTO exchanges (id, ts, provider, upstream, method, path, outcome,"
                 " file_path, offset, length, agent_id, compaction)"
                 " VALUES ('e', 't', 'p', 'u', 'POST', '/', 'complete', 'f', 0, 1, 'a', 'request')")
    conn.close()
    again = db.connect(path)  # reopening a migrated index changes nothing
    assert again.execute("SELECT count(*) FROM sessions").fetchone()[0] == 2
    assert db.connect(path, readonly=True).execute("SELECT agent_id FROM exchanges"
                                                  ).fetchone()[0] == "a"


def test_an_index_of_an_unknown_version_is_refused(tmp_path):
    """A newer (or unknown) index is not touched: SchemaMismatch names the versions."""
    path = tmp_path / "sessions.db"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {db.DB_VERSION + 1}")
    newer.close()
    with pytest.raises(db.SchemaMismatch, match=f"schema version {db.DB_VERSION + 1}"):
        db.connect(path)
