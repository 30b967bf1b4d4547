"""Retention: the local record kept within an age and a size.

``sweep`` deletes whole *session trees* — a session with every session linked to it by
``parent_id`` (its branches, forks and subagents), because a branch's first entries are copies
of its parent's and a body delta may name a base in the parent's file — and the daily files of
untracked and rejected calls, with their rows in the index:

- by age: a tree whose latest activity, or a daily file whose day, is older than ``max_age_s``;
- by size: while the record (JSONL files) is larger than ``max_bytes``, the least recently
  active tree or oldest daily file goes first.

A tree active in the last ``QUIET_S`` seconds is never deleted (a size cap smaller than the
conversations running now is reported, not enforced on them). The sweep runs in the recorder
process between batches, so no write is under way; the store then forgets the deleted files
and the bodies it kept as delta bases (``LocalStore.retire``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

QUIET_S = 600.0
"""Trees with activity more recent than this are kept whatever the caps say."""
SWEEP_EVERY = 600.0
"""The recorder sweeps at start and then at most this often (seconds)."""
_DAILY = re.compile(r"(?:^|/)(?:untracked|rejected)-(\d{8})\.jsonl$")


@dataclass(frozen=True)
class Retention:
    """The caps (``--retention-days``, ``--retention-max-bytes``); None means no cap."""

    max_age_s: float | None
    max_bytes: int | None

    @classmethod
    def of(cls, days: float | None, max_bytes: int | None) -> Retention | None:
        if days is None and max_bytes is None:
            return None
        return cls(days * 86400.0 if days is not None else None, max_bytes)


@dataclass
class Sweep:
    """What one sweep deleted."""

    sessions: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    """Record files deleted, relative to the log dir."""
    bytes_freed: int = 0
    over_cap: int = 0
    """Bytes still above ``max_bytes`` after the sweep (only recent trees were left)."""


@dataclass
class _Unit:
    """Something deleted as a whole: a session tree or one daily file."""

    last: float
    sessions: list[str]
    files: list[str]
    size: int = 0


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _size(log_dir: Path, relative: str) -> int:
    try:
        return os.stat(log_dir / relative).st_size
    except FileNotFoundError:
        return 0


def _units(conn: sqlite3.Connection, log_dir: Path) -> list[_Unit]:
    rows = conn.execute("SELECT id, parent_id, last_activity, file_path FROM sessions").fetchall()
    parent = {row["id"]: row["parent_id"] for row in rows}

    def root(session: str) -> str:
        seen = set()
        while parent.get(session) is not None and session not in seen:
            seen.add(session)
            session = parent[session]
        return session

    trees: dict[str, _Unit] = {}
    for row in rows:
        unit = trees.setdefault(root(row["id"]), _Unit(0.0, [], []))
        unit.last = max(unit.last, _epoch(row["last_activity"]))
        unit.sessions.append(row["id"])
        unit.files.append(row["file_path"])
    units = list(trees.values())
    for path in log_dir.rglob("*.jsonl"):
        relative = path.relative_to(log_dir).as_posix()
        match = _DAILY.search(relative)
        if match:
            day = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
            units.append(_Unit(day.timestamp() + 86400, [], [relative]))
    for unit in units:
        unit.size = sum(_size(log_dir, relative) for relative in unit.files)
    return sorted(units, key=lambda unit: unit.last)


def sweep(conn: sqlite3.Connection, log_dir: Path, *, max_age_s: float | None,
          max_bytes: int | None, now: float | None = None) -> Sweep:
    """Delete what the caps leave no room for (see the module docstring); one transaction for
    the index, files removed after it commits."""
    now = time.time() if now is None else now
    result = Sweep()
    if max_age_s is None and max_bytes is None:
        return result
    units = _units(conn, log_dir)
    total = sum(unit.size for unit in units)
    doomed: list[_Unit] = []
    for unit in units:  # oldest first
        if unit.last > now - QUIET_S:
            break
        too_old = max_age_s is not None and unit.last < now - max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        doomed.append(unit)
        total -= unit.size
    if max_bytes is not None and total > max_bytes:
        result.over_cap = total - max_bytes
    if not doomed:
        return result
    sessions = [s for unit in doomed for s in unit.sessions]
    files = [f for unit in doomed for f in unit.files]
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, values in (("fingerprints", "session_id", sessions),
                                      ("sessions", "id", sessions),
                                      ("exchanges", "session_id", sessions),
                                      ("exchanges", "file_path", files)):
            for at in range(0, len(values), 500):  # SQLite caps the parameters of a statement
                part = values[at:at + 500]
                conn.execute(f"DELETE FROM {table} WHERE {column} IN"
                             f" ({','.join('?' * len(part))})", part)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    for unit in doomed:
        for relative in unit.files:
            try:
                os.unlink(log_dir / relative)
            except FileNotFoundError:
                continue
            result.files.append(relative)
        result.bytes_freed += unit.size
    result.sessions = sessions
    return result
