"""Conversation sessions and forks, detected from the messages the client sends.

Detection (the seed's algorithm, made to hold on real client traffic):

- A tracked call's conversation is ``messages`` (Anthropic, OpenAI chat) or ``input`` items
  (OpenAI Responses). Its *prefix* is all but the last message. After a turn succeeds, the
  session's *state* is the request's messages plus the assistant message reassembled from the
  response; the state's fingerprint is stored with the turn's seq.
- ``len(messages) <= 1`` → always a new session. Otherwise the prefix fingerprint is looked up:
  no match → new session; the match is the session's latest state → continuation (seq + 1, same
  file); the match is an earlier state → fork: a branch ``{parent}_b{n}`` whose file starts with
  the parent's entries up to that turn, then a ``fork`` entry, then the new turn.
- OpenAI Responses: ``previous_response_id`` continues (or forks) the session whose turn produced
  that response, whatever the input holds.
- A failed or aborted response (status >= 400, outcome other than ``complete``, an ``error``
  event, nothing reassembled) is recorded in its session with its own seq but does not advance
  the session's state, so the client's retry is a continuation, not a fork.

Normalisation before hashing (canonical JSON: sorted keys, no whitespace, SHA-256):

1. ``system`` is not part of the fingerprint: the top-level ``system``/``instructions`` and
   ``role: "system"``/``"developer"`` entries inside ``messages`` are removed and hashed separately
   (``system_sha256``). A change of system prompt alone never starts a new session.
2. ``cache_control`` is dropped everywhere (Claude Code moves it to the newest message each turn).
3. A string ``content`` equals a single text block: ``"hi"`` ≡ ``[{"type": "text", "text": "hi"}]``
   (also inside ``tool_result`` content). Responses' ``input_text``/``output_text`` are text.
4. Keys whose value is empty or null don't count (``content: ""``, ``refusal: null``,
   ``annotations: []``), nor SDK bookkeeping: ``index`` in OpenAI tool calls, ``id``/``status`` of
   Responses items, ``type: "message"`` on Responses message items.
5. ``thinking``/``redacted_thinking`` blocks and Responses ``reasoning`` items are left out: they
   are a function of the conversation, and clients may drop or re-sign them between turns.

Client hints: ``X-Claude-Code-Session-Id`` (or the session part of Anthropic
``metadata.user_id``) is stored as ``client_session_id``. When several sessions match, one with
the same client session id wins, so two clients sending the same first turns stay apart;
subagent conversations (Claude Code's Task tool) get their own session ids and share the client
session id with their parent conversation, which links them.

State lives in SQLite; the processor runs on the pipeline's single thread, so concurrent
requests are decided one at a time in completion order, and a restarted proxy continues the same
sessions.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from otelproxy import db
from otelproxy.record import Outcome, Record, SessionInfo, iso

CLIENT_SESSION_HEADER = "x-claude-code-session-id"
_SYSTEM_ROLES = ("system", "developer")
_DROPPED_BLOCKS = ("thinking", "redacted_thinking", "reasoning")
_TEXT_TYPES = ("text", "input_text", "output_text")
_USER_ID_SESSION = re.compile(r"session_([0-9a-fA-F-]{8,})")


_id_prefix: tuple[int, str] = (-1, "")


def new_session_id(ts: float) -> str:
    """``{YYYYMMDD-HHMMSS}-{4 hex}`` as in the seed."""
    global _id_prefix
    second = int(ts)
    if _id_prefix[0] != second:
        _id_prefix = (second, datetime.fromtimestamp(second, UTC).strftime("%Y%m%d-%H%M%S-"))
    return _id_prefix[1] + os.urandom(2).hex()


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _normalise_content(content: Any) -> Any:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else None
    if isinstance(content, list):
        blocks = [_normalise_block(block) for block in content]
        return [block for block in blocks if not _empty(block)] or None
    return content


def _normalise_block(block: Any) -> Any:
    if isinstance(block, str):
        return {"type": "text", "text": block}
    if not isinstance(block, dict):
        return block
    kind = block.get("type")
    if kind in _DROPPED_BLOCKS:
        return None
    out: dict[str, Any] = {}
    for key, value in block.items():
        if key == "cache_control" or _empty(value):
            continue
        if key == "type" and value in _TEXT_TYPES:
            value = "text"
        elif key == "content":
            value = _normalise_content(value)
            if value is None:
                continue
        out[key] = value
    return out


def normalise_message(message: Any) -> Any:
    """One message (or Responses input item) in the form its fingerprint is computed on."""
    if not isinstance(message, dict):
        return _normalise_block(message)
    kind = message.get("type")
    if kind in _DROPPED_BLOCKS:
        return None
    out: dict[str, Any] = {}
    for key, value in message.items():
        if key == "cache_control" or _empty(value):
            continue
        if key == "type" and value == "message":
            continue
        if key in ("id", "status") and (kind is not None or "role" not in message):
            continue  # Responses item bookkeeping
        if key == "content":
            value = _normalise_content(value)
            if value is None:
                continue
        elif key == "tool_calls" and isinstance(value, list):
            value = [
                {k: v for k, v in call.items() if k != "index" and not _empty(v)}
                if isinstance(call, dict) else call
                for call in value
            ]
        out[key] = value
    return out


def conversation(messages: list[Any]) -> list[Any]:
    """The messages that count for the fingerprint (system entries and empties left out)."""
    out = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") in _SYSTEM_ROLES:
            continue
        normalised = normalise_message(message)
        if not _empty(normalised):
            out.append(normalised)
    return out


def fingerprint(messages: list[Any]) -> str:
    canonical = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def system_fingerprint(system: Any, messages: list[Any]) -> str | None:
    parts: list[Any] = []
    if not _empty(system):
        parts.append(_normalise_content(system) if not isinstance(system, dict) else system)
    parts.extend(
        normalise_message(m) for m in messages
        if isinstance(m, dict) and m.get("role") in _SYSTEM_ROLES
    )
    return fingerprint(parts) if parts else None


def output_messages(output: dict[str, Any] | None) -> list[Any]:
    """The assistant side of a finished turn, normalised like request messages."""
    if not output:
        return []
    if isinstance(output.get("output"), list):  # Responses API: output items
        return conversation(output["output"])
    message = {key: value for key, value in output.items() if not key.startswith("x_")}
    return conversation([message])


def client_session_id(record: Record) -> str | None:
    for name, value in record.exchange.request_headers:
        if name.lower() == CLIENT_SESSION_HEADER and value.strip():
            return value.strip()
    user_id = record.parsed.metadata_user_id
    if not user_id:
        return None
    if user_id.lstrip().startswith("{"):
        try:
            decoded = orjson.loads(user_id)
        except orjson.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict) and isinstance(decoded.get("session_id"), str):
            return str(decoded["session_id"])
    match = _USER_ID_SESSION.search(user_id)
    return match.group(1) if match else None


def _succeeded(record: Record) -> bool:
    exchange = record.exchange
    output = record.parsed.output_message
    return (
        exchange.outcome is Outcome.COMPLETE
        and exchange.status is not None and exchange.status < 400
        and output is not None
        and "x_error" not in (record.parsed.response_json or {})
    )


class SessionTracker:
    """The session processor: assigns ``record.session`` and keeps the state in SQLite."""

    name = "session"

    def __init__(self, db_path: Path) -> None:
        self._db: sqlite3.Connection = db.connect(db_path)
        self._in_batch = False

    @property
    def db(self) -> sqlite3.Connection:
        """The one writer connection; the local store writes its index rows through it too."""
        return self._db

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction for a batch of records (each record in its own savepoint)."""
        self._db.execute("BEGIN IMMEDIATE")
        self._in_batch = True
        try:
            yield
        finally:
            self._in_batch = False
            self._db.execute("COMMIT")

    def __call__(self, record: Record) -> None:
        parsed = record.parsed
        if not parsed.tracked or parsed.messages is None:
            return
        messages = conversation(parsed.messages)
        client_id = client_session_id(record)
        if not self._in_batch:
            with self.batch():
                self._track(record, messages, client_id)
            return
        self._db.execute("SAVEPOINT record")
        try:
            self._track(record, messages, client_id)
        except BaseException:
            self._db.execute("ROLLBACK TO record")
            raise
        finally:
            self._db.execute("RELEASE record")

    def _track(self, record: Record, messages: list[Any], client_id: str | None) -> None:
        parsed = record.parsed
        info = self._place(record, messages, client_id)
        info.client_session_id = client_id
        info.system_sha256 = system_fingerprint(parsed.system, parsed.messages or [])
        record.session = info
        self._save(record, info, messages)

    # -- deciding where the turn belongs ---------------------------------------------------------

    def _candidates(self, key: str, provider: str) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT f.session_id, f.seq, s.last_seq, s.state_seq, s.client_session_id,"
            " s.branch_count, s.file_path FROM fingerprints f JOIN sessions s"
            " ON s.id = f.session_id WHERE f.fingerprint = ? AND s.provider = ?"
            " ORDER BY s.last_activity DESC",
            (key, provider),
        ).fetchall()

    def _place(self, record: Record, messages: list[Any], client_id: str | None) -> SessionInfo:
        exchange = record.exchange
        parsed = record.parsed
        raw = parsed.messages or []
        rows: list[sqlite3.Row] = []
        matched_key: str | None = None
        if parsed.previous_response_id:
            matched_key = "resp:" + parsed.previous_response_id
            rows = self._candidates(matched_key, exchange.provider)
        elif len(messages) > 1:
            matched_key = fingerprint(messages[:-1])
            rows = self._candidates(matched_key, exchange.provider)
        if not rows:
            session_id = new_session_id(exchange.started_wall)
            while self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                session_id = new_session_id(exchange.started_wall)
            return SessionInfo(
                id=session_id, seq=1, file=f"{exchange.provider}/{session_id}.jsonl",
                new_session=True, new_messages=list(raw), fingerprint=matched_key,
            )
        row = self._choose(rows, client_id)
        new_messages = list(raw) if parsed.previous_response_id else list(raw[-1:])
        if row["seq"] == row["state_seq"]:
            return SessionInfo(
                id=row["session_id"], seq=row["last_seq"] + 1, file=row["file_path"],
                new_messages=new_messages, fingerprint=matched_key,
            )
        branch_number = row["branch_count"] + 1
        branch_id = f"{row['session_id']}_b{branch_number}"
        while self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (branch_id,)).fetchone():
            branch_number += 1
            branch_id = f"{row['session_id']}_b{branch_number}"
        self._db.execute("UPDATE sessions SET branch_count = ? WHERE id = ?",
                         (branch_number, row["session_id"]))
        return SessionInfo(
            id=branch_id, seq=row["seq"] + 1, file=f"{exchange.provider}/{branch_id}.jsonl",
            new_session=True, parent_id=row["session_id"], fork_from_seq=row["seq"],
            fork_reason="message_history_diverged", new_messages=new_messages,
            fingerprint=matched_key,
        )

    @staticmethod
    def _choose(rows: list[sqlite3.Row], client_id: str | None) -> sqlite3.Row:
        """Same client session first, then a session whose latest state matches, then recency."""
        def rank(row: sqlite3.Row) -> tuple[int, int]:
            same_client = client_id is not None and row["client_session_id"] == client_id
            other_client = (client_id is not None and row["client_session_id"] is not None
                            and not same_client)
            return (0 if same_client else 2 if other_client else 1,
                    0 if row["seq"] == row["state_seq"] else 1)
        return min(rows, key=rank)  # rows come newest first; min keeps the first of equals

    # -- writing the state -----------------------------------------------------------------------

    def _save(self, record: Record, info: SessionInfo, messages: list[Any]) -> None:
        exchange = record.exchange
        parsed = record.parsed
        usage = parsed.usage
        now = iso(exchange.wall_time(exchange.finished_ns or exchange.started_ns))
        model = parsed.response_model or parsed.model
        succeeded = _succeeded(record)
        state_key = fingerprint(messages + output_messages(parsed.output_message)) \
            if succeeded else None
        tokens = (usage.input_tokens or 0, usage.output_tokens or 0,
                  usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0)
        if info.new_session:
            self._db.execute(
                "INSERT INTO sessions (id, provider, upstream, created_at, last_activity,"
                " last_seq, last_fingerprint, state_seq, file_path, parent_id, fork_from_seq,"
                " client_session_id, model, system_sha256, last_response_id, input_tokens,"
                " output_tokens, cache_read_input_tokens, cache_creation_input_tokens)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (info.id, exchange.provider, exchange.upstream_url, iso(exchange.started_wall),
                 now, info.seq, state_key or "", info.seq if succeeded else 0, info.file,
                 info.parent_id, info.fork_from_seq, info.client_session_id, model,
                 info.system_sha256, parsed.response_id if succeeded else None, *tokens),
            )
        else:
            self._db.execute(
                "UPDATE sessions SET last_activity = ?, last_seq = ?, model = COALESCE(?, model),"
                " system_sha256 = COALESCE(?, system_sha256),"
                " client_session_id = COALESCE(client_session_id, ?),"
                " input_tokens = input_tokens + ?, output_tokens = output_tokens + ?,"
                " cache_read_input_tokens = cache_read_input_tokens + ?,"
                " cache_creation_input_tokens = cache_creation_input_tokens + ?,"
                " last_fingerprint = COALESCE(?, last_fingerprint),"
                " state_seq = CASE WHEN ? THEN ? ELSE state_seq END,"
                " last_response_id = COALESCE(?, last_response_id) WHERE id = ?",
                (now, info.seq, model, info.system_sha256, info.client_session_id, *tokens,
                 state_key, succeeded, info.seq, parsed.response_id if succeeded else None,
                 info.id),
            )
        if not succeeded:
            return
        keys = [(state_key, info.id, info.seq)]
        if parsed.response_id and exchange.path.rstrip("/").endswith("/responses"):
            # Responses API turns are chained by previous_response_id.
            keys.append(("resp:" + parsed.response_id, info.id, info.seq))
        self._db.executemany(
            "INSERT OR REPLACE INTO fingerprints (fingerprint, session_id, seq) VALUES (?,?,?)",
            keys,
        )
