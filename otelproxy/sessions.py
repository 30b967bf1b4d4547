"""Session tracking (provisional: every tracked call starts its own session)."""

from __future__ import annotations

import secrets
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from otelproxy import db
from otelproxy.record import Record, SessionInfo


def new_session_id(ts: float) -> str:
    """``{YYYYMMDD-HHMMSS}-{4 hex}`` as in the seed."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class SessionTracker:
    name = "session"

    def __init__(self, db_path: Path) -> None:
        self._db: sqlite3.Connection = db.connect(db_path)

    def close(self) -> None:
        self._db.close()

    def __call__(self, record: Record) -> None:
        exchange = record.exchange
        if not record.parsed.tracked:
            return
        session_id = new_session_id(exchange.started_wall)
        record.session = SessionInfo(
            id=session_id, seq=1, file=f"{exchange.provider}/{session_id}.jsonl", new_session=True
        )
