"""The SQLite index: schema creation and migration of an older index in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from otelproxy import db

V1_SCHEMA = (Path(__file__).parent / "data" / "index_v1.sql").read_text()
"""The schema otelproxy 0.1 wrote (user_version 1), as it was."""


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
