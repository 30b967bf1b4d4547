"""``otelproxy sessions`` and ``otelproxy show``: read the SQLite index (never the JSONL files).

Both open the DB read-only, so they work while the proxy runs.
"""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from otelproxy.compact import DeltaError, decode_body, request_body
from otelproxy.errors import ConfigError

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> str:
    """``2h``/``3d``/``30m`` ago, or an ISO date/time → the ISO UTC timestamp to compare with."""
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        moment = now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"--since: expected e.g. 2h, 3d or 2026-01-13T10:00, got {text!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_INHERITING = ("branch", "session_fork")
"""Kinds whose turns up to the fork point are the parent's (their file starts with a copy)."""


def list_sessions(
    conn: sqlite3.Connection, provider: str | None = None, since: str | None = None,
    client_session: str | None = None,
) -> list[dict[str, Any]]:
    """Sessions newest first: id, kind, provider, model, turns, forks, links, activity, tokens."""
    where, args = [], []
    if provider:
        where.append("provider = ?")
        args.append(provider)
    if since:
        where.append("last_activity >= ?")
        args.append(since)
    if client_session:
        where.append("client_session_id = ?")
        args.append(client_session)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = conn.execute(
        "SELECT id, kind, provider, model, last_seq AS turns, branch_count AS forks, parent_id,"
        " fork_from_seq, client_session_id, agent_id, parent_agent_id, compactions,"
        " created_at AS first_activity,"
        " last_activity, input_tokens, output_tokens, cache_read_input_tokens,"
        f" cache_creation_input_tokens, file_path FROM sessions {clause}"
        " ORDER BY last_activity DESC", args,
    ).fetchall()
    return [dict(row) for row in rows]


def _lineage(conn: sqlite3.Connection, session_id: str, *, inherited_only: bool = True
             ) -> list[tuple[str, int | None]]:
    """``[(session, last inherited seq or None)]`` from the session up to its root: through
    branches and session forks only (whose early turns are the parent's), or through every
    link (subagents too) with ``inherited_only=False``."""
    chain: list[tuple[str, int | None]] = [(session_id, None)]
    current = session_id
    while True:
        row = conn.execute("SELECT parent_id, fork_from_seq, kind FROM sessions WHERE id = ?",
                           (current,)).fetchone()
        if row is None or row["parent_id"] is None or (
                inherited_only and row["kind"] not in _INHERITING):
            return chain
        current = row["parent_id"]
        chain.append((current, row["fork_from_seq"]))


def _turn_rows(conn: sqlite3.Connection, session_id: str) -> list[dict[str, Any]]:
    """The session's turns including those inherited from its ancestors up to each fork point."""
    turns: dict[int, dict[str, Any]] = {}
    limit: int | None = None
    for sid, fork_point in _lineage(conn, session_id):
        if fork_point is not None:
            limit = fork_point if limit is None else min(limit, fork_point)
        rows = conn.execute(
            "SELECT session_id, seq, ts, model, stop_reason, status, outcome, input_tokens,"
            " output_tokens, ttfb_ms, total_ms, user_preview, assistant_preview, compaction"
            " FROM exchanges WHERE session_id = ? ORDER BY seq", (sid,),
        ).fetchall()
        for row in rows:
            if (limit is None or row["seq"] <= limit) and row["seq"] not in turns:
                turns[row["seq"]] = dict(row)
    return [turns[seq] for seq in sorted(turns)]


def _tree(conn: sqlite3.Connection, root: str) -> dict[str, Any]:
    """The session and everything linked below it: branches, forks and subagents."""
    row = conn.execute("SELECT id, kind, fork_from_seq, last_seq, agent_id, client_session_id"
                       " FROM sessions WHERE id = ?", (root,)).fetchone()
    children = conn.execute("SELECT id FROM sessions WHERE parent_id = ? ORDER BY created_at",
                            (root,)).fetchall()
    return {
        "id": root,
        "kind": row["kind"] if row else None,
        "agent_id": row["agent_id"] if row else None,
        "client_session_id": row["client_session_id"] if row else None,
        "fork_from_seq": row["fork_from_seq"] if row else None,
        "turns": row["last_seq"] if row else None,
        "branches": [_tree(conn, child["id"]) for child in children],
    }


def show_session(conn: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        return None
    root = _lineage(conn, session_id, inherited_only=False)[-1][0]
    related = []
    if row["client_session_id"]:
        related = [r["id"] for r in conn.execute(
            "SELECT id FROM sessions WHERE client_session_id = ? AND id <> ? AND parent_id IS NULL"
            " ORDER BY created_at", (row["client_session_id"], root)).fetchall()]
    return {
        "session": dict(row),
        "turns": _turn_rows(conn, session_id),
        "tree": _tree(conn, root),
        "same_client_sessions": related,
    }


def _entry_at(log_dir: Path, relative: str, offset: int, length: int | None = None
              ) -> tuple[dict[str, Any], int]:
    """The JSONL entry at ``offset`` of a record file, and the offset of the line after it."""
    with (log_dir / relative).open("rb") as handle:
        handle.seek(offset)
        line = handle.read(length) if length is not None else handle.readline()
    if length is not None and not line.endswith(b"\n"):
        raise DeltaError(f"{relative}: no whole line at offset {offset}")
    return orjson.loads(line), offset + len(line)


def raw_bodies(conn: sqlite3.Connection, log_dir: Path, session_id: str, seq: int
               ) -> tuple[bytes, bytes] | None:
    """The recorded request and response bodies of a turn, byte for byte (a delta-encoded
    request rebuilt and checked against its SHA-256; the response decoded as recorded, a
    stream's events joined). None when the session has no such turn."""
    turn = next((t for t in _turn_rows(conn, session_id) if t["seq"] == seq), None)
    if turn is None:
        return None

    def load(exchange_id: str) -> dict[str, Any]:
        row = conn.execute("SELECT file_path, offset, length FROM exchanges WHERE id = ?",
                           (exchange_id,)).fetchone()
        if row is None:
            raise DeltaError(f"base exchange {exchange_id} is not in the index")
        return _entry_at(log_dir, row["file_path"], row["offset"], row["length"])[0]

    row = conn.execute("SELECT file_path, offset, length FROM exchanges"
                       " WHERE session_id = ? AND seq = ?", (turn["session_id"], seq)).fetchone()
    request, after = _entry_at(log_dir, row["file_path"], row["offset"], row["length"])
    response, _ = _entry_at(log_dir, row["file_path"], after)
    if response.get("type") != "response" or response.get("exchange_id") != \
            request.get("exchange_id"):
        raise DeltaError(f"{row['file_path']}: the response of {request.get('exchange_id')} "
                         "does not follow its request")
    if "chunks" in response:
        answer = b"".join(decode_body(chunk, "raw") for chunk in response["chunks"])
    else:
        answer = decode_body(response) if "body" in response else b""
    return request_body(request, load), answer


def _short_time(iso: str | None) -> str:
    return (iso or "")[:19].replace("T", " ")


def format_sessions(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no sessions recorded yet"
    header = f"{'SESSION':<28} {'KIND':<13} {'PROVIDER':<9} {'MODEL':<24} {'TURNS':>5} " \
             f"{'FORKS':>5} {'FIRST':<19} {'LAST':<19} {'IN':>9} {'OUT':>8}  PARENT"
    lines = [header]
    for row in rows:
        parent = f"{row['parent_id']}@{row['fork_from_seq']}" if row["parent_id"] else "-"
        lines.append(
            f"{row['id']:<28} {row['kind']:<13} {row['provider']:<9} "
            f"{(row['model'] or '-')[:24]:<24} {row['turns']:>5} {row['forks']:>5} "
            f"{_short_time(row['first_activity']):<19} {_short_time(row['last_activity']):<19} "
            f"{row['input_tokens']:>9} {row['output_tokens']:>8}  {parent}"
        )
    return "\n".join(lines)


_LINKS = {
    "branch": "branch, forked at seq {seq}",
    "session_fork": "client session {client} forked it at seq {seq}",
    "subagent": "subagent {agent}, spawned at seq {seq}",
    "fork_subagent": "fork subagent {agent}, forked at seq {seq}",
}


def _format_tree(node: dict[str, Any], current: str, depth: int = 0) -> list[str]:
    marker = " *" if node["id"] == current else ""
    link = ""
    if depth and node["kind"] in _LINKS:
        link = " (" + _LINKS[node["kind"]].format(
            seq=node["fork_from_seq"], agent=node["agent_id"] or "-",
            client=node["client_session_id"] or "-") + ")"
    lines = [f"{'  ' * depth}{'└─ ' if depth else ''}{node['id']}{link}, "
             f"{node['turns']} turn(s){marker}"]
    for child in node["branches"]:
        lines.extend(_format_tree(child, current, depth + 1))
    return lines


def format_show(data: dict[str, Any]) -> str:
    session = data["session"]
    lines = [
        f"session {session['id']}  provider {session['provider']}  "
        f"upstream {session['upstream']}",
        f"kind {session['kind']}  model {session['model'] or '-'}  client session "
        f"{session['client_session_id'] or '-'}  agent {session['agent_id'] or 'main'}"
        + (f" (parent agent {session['parent_agent_id']})" if session["parent_agent_id"] else "")
        + (f"  compactions {session['compactions']}" if session["compactions"] else ""),
        f"tokens in {session['input_tokens']} out {session['output_tokens']} cache read "
        f"{session['cache_read_input_tokens']} cache write "
        f"{session['cache_creation_input_tokens']}",
        f"file {session['file_path']}",
        "",
        f"{'SEQ':>4} {'TIME':<19} {'MODEL':<24} {'STOP':<12} {'IN':>7} {'OUT':>6} {'TTFB':>8}",
    ]
    for turn in data["turns"]:
        ttfb = f"{turn['ttfb_ms']:.0f}ms" if turn["ttfb_ms"] is not None else "-"
        inherited = "" if turn["session_id"] == session["id"] else f"  (from {turn['session_id']})"
        stop = turn["stop_reason"] or (turn["outcome"] if turn["outcome"] != "complete" else "-")
        compaction = f"  [compaction: {turn['compaction']}]" if turn["compaction"] else ""
        lines.append(
            f"{turn['seq']:>4} {_short_time(turn['ts']):<19} {(turn['model'] or '-')[:24]:<24} "
            f"{stop[:12]:<12} {turn['input_tokens'] or 0:>7} {turn['output_tokens'] or 0:>6} "
            f"{ttfb:>8}{inherited}{compaction}"
        )
        lines.append(f"     user: {turn['user_preview'] or ''}")
        lines.append(f"     assistant: {turn['assistant_preview'] or ''}")
    lines += ["", "branches, forks and agents:", *_format_tree(data["tree"], session["id"])]
    if data["same_client_sessions"]:
        lines += ["", "other sessions of the same client session:",
                  *[f"  {sid}" for sid in data["same_client_sessions"]]]
    return "\n".join(lines)
