-- The SQLite index as otelproxy 0.1 wrote it (PRAGMA user_version 1), kept to test migration.
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
