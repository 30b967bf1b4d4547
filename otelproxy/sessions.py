"""Conversation sessions, branches, forks and agents.

Every tracked call (a conversation turn: Anthropic ``POST /v1/messages``, OpenAI chat and
Responses) gets a session id and a turn number ``seq``. Two sources of identity are combined:

1. **What the client says.** Claude Code names its session in ``X-Claude-Code-Session-Id`` (or
   the ``session_id`` inside ``metadata.user_id``) and a subagent in ``x-claude-code-agent-id``
   (+ ``x-claude-code-parent-agent-id`` when nested). A *lane* is ``(client session id, agent id
   or main)``: one conversation as the client sees it. Turns of one lane never land in another
   lane's session, and a lane never continues another lane's session.
2. **The history.** A call's *prefix* (all but its last message) is fingerprinted and matched
   against the *state* each earlier turn left (its request's messages plus the assistant
   message reassembled from its response). Within a lane this finds rewinds; without client
   hints (the SDKs, OpenAI clients) it is the only source, as in the seed.

Rules, in order:

- OpenAI Responses: ``previous_response_id`` continues (or branches) the session whose turn
  produced that response, whatever the input holds.
- No client session id: the prefix matched the latest state of a session → continuation
  (seq + 1); an earlier state → a branch ``{parent}_b{n}``; nothing (or a single message) → a
  new session.
- A lane that has sessions: the prefix matched, in that lane, the latest state → continuation;
  an earlier state → branch (``--resume-session-at``, an edited earlier prompt). No match with
  history, or a history that starts with a compaction summary → the lane's current
  conversation continues (seq keeps counting): Claude Code replaced the history by a summary
  (``compaction: "compacted"``; the summarising call itself is ``"request"``) or rewrote it
  (``"history_rewritten"``). A single message that matches nothing → a new session of the lane
  (a side call or a restart), never a turn of the conversation.
- A new lane of a subagent (agent id): its own session, ``kind`` ``subagent`` (first message is
  its task) or ``fork_subagent`` (it starts with the parent's whole history), linked by
  ``parent_id``/``fork_from_seq`` to the turn that spawned it: the turn whose answer held the
  Agent/Task ``tool_use`` with that id (a fork's history carries it) or that prompt (a fresh
  subagent's first message is it), else the parent lane's latest turn. Never a branch of the
  parent, never a turn of it.
- A new main lane whose first call already carries history that matches another session's
  state (``--fork-session``, ``/branch``: a new client session id over the old history) → a new
  session, ``kind`` ``session_fork``, recorded as a fork of the original at the shared turn
  (``fork`` entry, ``from_seq``, ``parent_session``); the original continues unbranched. A new
  lane whose first call is one message is a new session even if another session began with
  the same words: two sessions with identical first prompts stay apart.

A failed or aborted response (status >= 400, outcome other than ``complete``, an ``error``
event, nothing reassembled) is recorded in its session with its own seq but leaves no state, so
the client's retry is a continuation, not a branch.

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
6. The model is not part of it (a ``/model`` switch mid-session is the same conversation).

What peers got wrong, and what these rules answer: a gateway that identified sessions by a
fingerprint alone split long Claude Code sessions (495 and 921 messages) into new ones when the
model name in its hash changed, lost every session at compaction (the first message is
rewritten) and collected phantom one-shot subagent sessions (loreai, "3-tier session
identification via client headers"); a replay tool whose global key was project + slug merged
unrelated sessions of different clients (vibe-replay, "Prevent unrelated session merges").
Here the client's ids decide identity when present and are never merged across, the history
only places a turn inside its lane, the model is outside the hash, compaction continues the
session, and subagents are their own linked sessions.

Cost per turn: normalising and hashing the whole history again every turn would cost as much as
the history. ``ProviderParse`` hands over the very message objects of the previous request for
the messages whose bytes did not change (``otelproxy.body_json``); ``Histories`` keeps, for
recent requests, the normalised form of each message object and the SHA-256 state after each
one, so a turn normalises and hashes only the message objects it has not seen. An object that is
the same object is the same bytes; anything else is normalised anew. The fingerprints are the
same bytes as ``fingerprint(conversation(messages))`` computes whole.

State lives in SQLite; the processor runs on the recorder's single thread, so concurrent
requests are decided one at a time in completion order (a spawning turn always completes
before its subagent's first call), and a restarted proxy continues the same sessions.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from otelproxy import db
from otelproxy.compact import new_sha256
from otelproxy.record import Outcome, Record, SessionInfo, SessionKind, iso

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLIENT_SESSION_HEADER = "x-claude-code-session-id"
AGENT_HEADER = "x-claude-code-agent-id"
PARENT_AGENT_HEADER = "x-claude-code-parent-agent-id"
AGENT_TOOLS = ("Agent", "Task")
COMPACTION_REQUEST = "Your task is to create a detailed summary of the conversation"
COMPACTED_PREFIX = "This session is being continued from a previous conversation"
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
    return str(new_sha256(canonical).hexdigest())


_SYSTEM_DIGESTS: OrderedDict[bytes, str] = OrderedDict()
"""The fingerprints of the system prompts seen last, by their canonical bytes: nearly every turn
sends the same 15 KB or more again, and its bytes are compared here instead of hashed anew."""
_SYSTEM_DIGESTS_KEPT = 16


def _is_system(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in _SYSTEM_ROLES


def system_fingerprint(system: Any, messages: list[Any],
                       entries: list[Any] | None = None) -> str | None:
    """The fingerprint of the top-level system prompt and the system entries of ``messages``
    (``entries``: those entries normalised already)."""
    parts: list[Any] = []
    if not _empty(system):
        parts.append(_normalise_content(system) if not isinstance(system, dict) else system)
    parts.extend(entries if entries is not None else
                 (normalise_message(m) for m in messages if _is_system(m)))
    if not parts:
        return None
    canonical = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    digest = _SYSTEM_DIGESTS.get(canonical)
    if digest is None:
        digest = _SYSTEM_DIGESTS[canonical] = str(new_sha256(canonical).hexdigest())
        # oldest first out; safe when in-process pipelines on several threads share the cache
        while len(_SYSTEM_DIGESTS) > _SYSTEM_DIGESTS_KEPT:
            with suppress(KeyError):
                _SYSTEM_DIGESTS.popitem(last=False)
    return digest


def _canonical(message: Any) -> bytes:
    """A normalised message as ``fingerprint`` serialises it inside its list."""
    return orjson.dumps([message], option=orjson.OPT_SORT_KEYS)[1:-1]


class History:
    """The normalised messages of one request (``conversation``) and their fingerprints, built
    on from what an earlier request with the same first message objects left."""

    __slots__ = ("_kept", "_states", "_system", "messages", "raw")

    def __init__(self) -> None:
        self.raw: list[Any] = []
        self.messages: list[Any] = []
        """``conversation(raw)``."""
        self._kept: list[int] = [0]
        """``len(conversation(raw[:i]))`` for each ``i``."""
        self._system: list[tuple[int, Any]] = []
        """``(index, normalised)`` of the system entries of ``raw``."""
        self._states: list[Any] = [new_sha256(b"[")]
        """SHA-256 state after ``[`` and the first ``i`` messages, comma-separated (made as
        needed: a message too deep to serialise raises only where ``fingerprint`` would)."""

    def update(self, raw: list[Any]) -> None:
        """Become the history of ``raw``: keep what the same leading objects gave."""
        same = 0
        for new, old in zip(raw, self.raw, strict=False):
            if new is not old:
                break
            same += 1
        kept = self._kept[same]
        del self.raw[same:], self._kept[same + 1:], self.messages[kept:], \
            self._states[kept + 1:]
        while self._system and self._system[-1][0] >= same:
            self._system.pop()
        for index in range(same, len(raw)):
            message = raw[index]
            self.raw.append(message)
            if _is_system(message):
                self._system.append((index, normalise_message(message)))
            else:
                normalised = normalise_message(message)
                if not _empty(normalised):
                    self.messages.append(normalised)
            self._kept.append(len(self.messages))

    def system_entries(self) -> list[Any]:
        return [normalised for _, normalised in self._system]

    def _state(self, count: int) -> Any:
        """The hash state after the first ``count`` messages."""
        while len(self._states) <= count:
            done = len(self._states) - 1
            state = self._states[done].copy()
            state.update((b"," if done else b"") + _canonical(self.messages[done]))
            self._states.append(state)
        return self._states[count]

    def fingerprint(self, count: int, more: Sequence[Any] = ()) -> str:
        """``fingerprint(self.messages[:count] + more)``."""
        state = self._state(count).copy()
        for number, message in enumerate(more, count):
            state.update((b"," if number else b"") + _canonical(message))
        state.update(b"]")
        return str(state.hexdigest())


class Histories:
    """``History`` of recent requests, found by the identity of their first message object."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._histories: OrderedDict[int, History] = OrderedDict()

    def of(self, raw: list[Any]) -> History:
        """The history of a request's messages, reusing a recent one that starts with the
        same message object (size 0: always made whole)."""
        history: History | None = None
        if raw:
            found = self._histories.pop(id(raw[0]), None)
            if found is not None and found.raw and found.raw[0] is raw[0]:
                history = found
        if history is None:
            history = History()
        history.update(raw)
        if raw and self.size:
            self._histories[id(raw[0])] = history
            while len(self._histories) > self.size:
                self._histories.popitem(last=False)
        return history


def output_messages(output: dict[str, Any] | None) -> list[Any]:
    """The assistant side of a finished turn, normalised like request messages."""
    if not output:
        return []
    if isinstance(output.get("output"), list):  # Responses API: output items
        return conversation(output["output"])
    message = {key: value for key, value in output.items() if not key.startswith("x_")}
    return conversation([message])


def _header(record: Record, name: str) -> str | None:
    for key, value in record.request_headers:  # redacted: whatever a client puts there
        if key.lower() == name and value.strip():
            return value.strip()
    return None


def client_session_id(record: Record) -> str | None:
    header = _header(record, CLIENT_SESSION_HEADER)
    if header:
        return header
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


@dataclass(frozen=True, slots=True)
class Lane:
    """One conversation as the client names it: (client session id, agent id or main)."""

    client_session_id: str
    agent_id: str | None
    parent_agent_id: str | None

    @classmethod
    def of(cls, record: Record) -> Lane | None:
        client_id = client_session_id(record)
        if client_id is None:
            return None
        return cls(client_id, _header(record, AGENT_HEADER), _header(record, PARENT_AGENT_HEADER))


def _texts(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [block["text"] for block in content
            if isinstance(block, dict) and isinstance(block.get("text"), str)]


def compaction_of(messages: list[Any]) -> str | None:
    """``request`` when the last message asks for a summary of the conversation, ``compacted``
    when the first one is such a summary (Claude Code's compaction), else None."""
    if messages and any(COMPACTION_REQUEST in text for text in _texts(messages[-1])):
        return "request"
    if messages and any(text.lstrip().startswith(COMPACTED_PREFIX)
                        for text in _texts(messages[0])):
        return "compacted"
    return None


def _digest(text: str) -> str:
    return str(new_sha256(text.encode("utf-8", "surrogatepass")).hexdigest())


def _agent_calls(message: Any) -> list[dict[str, Any]]:
    """The Agent/Task tool_use blocks of an assistant message."""
    content = message.get("content") if isinstance(message, dict) else None
    return [block for block in content if isinstance(block, dict)
            and block.get("type") == "tool_use" and block.get("name") in AGENT_TOOLS] \
        if isinstance(content, list) else []


def spawn_keys(output: dict[str, Any] | None) -> list[str]:
    """Keys that let a subagent find the turn that spawned it: ``tool:{id}`` for every Agent/Task
    tool_use in the answer (a fork subagent's history holds that block) and
    ``agent_prompt:{sha256}`` of its prompt (a fresh subagent's first message is that prompt)."""
    keys: list[str] = []
    for block in _agent_calls(output):
        if isinstance(block.get("id"), str):
            keys.append("tool:" + block["id"])
        tool_input = block.get("input")
        prompt = tool_input.get("prompt") if isinstance(tool_input, dict) else None
        if isinstance(prompt, str) and prompt.strip():
            keys.append("agent_prompt:" + _digest(prompt.strip()))
    return keys


def _spawn_lookups(messages: list[Any]) -> list[str]:
    """The keys a subagent's first request can be linked by (see ``spawn_keys``)."""
    keys: list[str] = []
    for message in reversed(messages):  # the newest Agent tool_use in an inherited history
        if isinstance(message, dict) and message.get("role") == "assistant":
            keys = ["tool:" + block["id"] for block in _agent_calls(message)
                    if isinstance(block.get("id"), str)]
            if keys:
                break
    if messages:
        keys.extend("agent_prompt:" + _digest(text.strip())
                    for text in _texts(messages[0]) if text.strip())
    return keys


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

    def __init__(self, db_path: Path, histories: int = 64) -> None:
        """``histories``: how many recent requests' normalised histories are kept (0: every
        request's history is normalised and hashed whole)."""
        self.path = db_path
        self._db: sqlite3.Connection | None = None
        self._in_batch = False
        self._histories = Histories(histories)

    @property
    def db(self) -> sqlite3.Connection:
        """The one writer connection; the local store writes its index rows through it too."""
        assert self._db is not None, "the session index is not open"
        return self._db

    def open(self) -> None:
        """Open (or create) the index; the local store calls this and retries when it fails."""
        self.close()
        self._db = db.connect(self.path)

    def close(self) -> None:
        if self._db is not None:
            conn, self._db = self._db, None
            conn.close()

    def release_memory(self) -> None:
        """While idle: SQLite frees the index pages it caches (``PRAGMA shrink_memory``; its
        cache keeps up to 2 MB of pages per connection). The next batch reads the pages it
        needs again, from the OS's page cache."""
        if self._db is not None and not self._in_batch:
            self._db.execute("PRAGMA shrink_memory")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction for a batch of records (each record in its own savepoint),
        opened by the local store: it commits, or rolls back entirely when anything fails."""
        conn = self.db
        conn.execute("BEGIN IMMEDIATE")
        self._in_batch = True
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            self._in_batch = False

    def __call__(self, record: Record) -> None:
        """Place a tracked call in its session. Outside the store's transaction (the record
        cannot be written now) nothing is placed: the record has no session."""
        parsed = record.parsed
        if not parsed.tracked or parsed.messages is None or not self._in_batch:
            return
        history = self._histories.of(parsed.messages)
        conn = self.db
        conn.execute("SAVEPOINT record")
        try:
            self._track(record, history)
        except BaseException:
            conn.execute("ROLLBACK TO record")
            raise
        finally:
            conn.execute("RELEASE record")

    def _track(self, record: Record, history: History) -> None:
        parsed = record.parsed
        messages = history.messages
        lane = Lane.of(record)
        info = self._place(record, history, lane)
        if lane is not None:
            info.client_session_id = lane.client_session_id
            info.agent_id = lane.agent_id
            info.parent_agent_id = lane.parent_agent_id
        else:
            info.client_session_id = None
        if info.compaction is None and compaction_of(messages) == "request":
            info.compaction = "request"
        info.system_sha256 = system_fingerprint(parsed.system, parsed.messages or [],
                                                history.system_entries())
        record.session = info
        self._save(record, info, history)

    # -- deciding where the turn belongs ---------------------------------------------------------

    def _candidates(self, key: str, provider: str, lane: Lane | None = None) -> list[sqlite3.Row]:
        """Sessions whose state after turn ``seq`` has fingerprint ``key``, newest first; with a
        lane, only that conversation's sessions (and its branches)."""
        query = (
            "SELECT f.session_id, f.seq, s.last_seq, s.state_seq, s.client_session_id,"
            " s.branch_count, s.file_path, s.kind FROM fingerprints f JOIN sessions s"
            " ON s.id = f.session_id WHERE f.fingerprint = ? AND s.provider = ?"
        )
        args: tuple[Any, ...] = (key, provider)
        if lane is not None:
            query += " AND s.client_session_id = ? AND s.agent_id IS ?"
            args += (lane.client_session_id, lane.agent_id)
        return self.db.execute(query + " ORDER BY s.last_activity DESC", args).fetchall()

    def _lane_session(self, lane: Lane, provider: str) -> sqlite3.Row | None:
        """The lane's current conversation: the latest active one that has more than one turn
        (a one-message side call of the same client session is not it), else the latest."""
        row: sqlite3.Row | None = self.db.execute(
            "SELECT id AS session_id, last_seq, file_path, kind FROM sessions"
            " WHERE client_session_id = ? AND agent_id IS ? AND provider = ?"
            " ORDER BY last_seq > 1 DESC, last_activity DESC LIMIT 1",
            (lane.client_session_id, lane.agent_id, provider),
        ).fetchone()
        return row

    def _new(self, record: Record, *, fingerprint: str | None,
             kind: SessionKind = SessionKind.CONVERSATION, parent: sqlite3.Row | None = None,
             parent_seq: int | None = None, reason: str | None = None,
             session_id: str | None = None) -> SessionInfo:
        exchange = record.exchange
        raw = record.parsed.messages or []
        if session_id is None:
            session_id = new_session_id(exchange.started_wall)
            while self._exists(session_id):
                session_id = new_session_id(exchange.started_wall)
        seq = 1
        if kind in (SessionKind.BRANCH, SessionKind.SESSION_FORK) and parent_seq is not None:
            seq = parent_seq + 1  # a fork numbers on from the turn it shares
        return SessionInfo(
            id=session_id, seq=seq, file=f"{exchange.provider}/{session_id}.jsonl",
            new_session=True, kind=str(kind),
            parent_id=parent["session_id"] if parent is not None else None,
            fork_from_seq=parent_seq if parent is not None else None, fork_reason=reason,
            new_messages=list(raw) if kind is not SessionKind.BRANCH else list(raw[-1:]),
            fingerprint=fingerprint,
        )

    def _exists(self, session_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM sessions WHERE id = ?",
                                (session_id,)).fetchone() is not None

    def _place(self, record: Record, history: History, lane: Lane | None) -> SessionInfo:
        messages = history.messages
        exchange = record.exchange
        parsed = record.parsed
        provider = exchange.provider
        if parsed.previous_response_id:
            response_key = "resp:" + parsed.previous_response_id
            rows = self._candidates(response_key, provider)
            if rows:
                return self._follow(record, self._choose(rows, lane), response_key, whole=True)
            return self._new(record, fingerprint=response_key)
        key = history.fingerprint(len(messages) - 1) if len(messages) > 1 else None
        if lane is None:
            # No client hint: the history alone decides (the seed's rules).
            rows = self._candidates(key, provider) if key else []
            if rows:
                return self._follow(record, self._choose(rows, None), key)
            return self._new(record, fingerprint=key)
        current = self._lane_session(lane, provider)
        if current is not None:
            rows = self._candidates(key, provider, lane) if key else []
            if rows:
                return self._follow(record, self._choose(rows, lane), key)
            compaction = compaction_of(messages)
            if len(messages) > 1 or compaction == "compacted":
                # Same conversation, history not recognised: compaction replaced it with a
                # summary (or the client rewrote it); the conversation goes on.
                return SessionInfo(
                    id=current["session_id"], seq=current["last_seq"] + 1,
                    file=current["file_path"], kind=current["kind"],
                    new_messages=list(parsed.messages or []), fingerprint=key,
                    compaction="compacted" if compaction == "compacted" else "history_rewritten",
                )
            return self._new(record, fingerprint=key)  # a one-message side call or a restart
        if lane.agent_id is not None:
            return self._spawned(record, messages, lane, key)
        if key:
            # A new client session that starts with history: a fork of the session it came
            # from (--fork-session, /branch), which itself continues unbranched.
            rows = self._candidates(key, provider)
            if rows:
                parent = self._choose(rows, lane)
                return self._new(record, fingerprint=key, kind=SessionKind.SESSION_FORK,
                                 parent=parent, parent_seq=parent["seq"],
                                 reason="client_session_forked")
        return self._new(record, fingerprint=key)

    def _spawned(self, record: Record, messages: list[Any], lane: Lane,
                 key: str | None) -> SessionInfo:
        """A subagent's first turn: its own session, linked to the turn that spawned it."""
        kind = SessionKind.FORK_SUBAGENT if len(messages) > 1 else SessionKind.SUBAGENT
        provider = record.exchange.provider
        parent_lane = Lane(lane.client_session_id, lane.parent_agent_id, None)
        for spawn_key in _spawn_lookups(messages):
            rows = self._candidates(spawn_key, provider, parent_lane) or [
                row for row in self._candidates(spawn_key, provider)  # another agent's turn
                if row["client_session_id"] == lane.client_session_id]
            if rows:
                return self._new(record, fingerprint=key, kind=kind, parent=rows[0],
                                 parent_seq=rows[0]["seq"], reason="agent_spawned")
        parent = self._lane_session(parent_lane, provider)
        return self._new(record, fingerprint=key, kind=kind, parent=parent,
                         parent_seq=parent["last_seq"] if parent is not None else None,
                         reason="agent_spawned")

    def _follow(self, record: Record, row: sqlite3.Row, key: str | None, *,
                whole: bool = False) -> SessionInfo:
        """The history matched the state after turn ``row["seq"]``: continue that session if it
        is its latest state, else branch it."""
        raw = record.parsed.messages or []
        new_messages = list(raw) if whole else list(raw[-1:])
        if row["seq"] == row["state_seq"]:
            return SessionInfo(
                id=row["session_id"], seq=row["last_seq"] + 1, file=row["file_path"],
                kind=row["kind"], new_messages=new_messages, fingerprint=key,
            )
        branch_number = row["branch_count"] + 1
        branch_id = f"{row['session_id']}_b{branch_number}"
        while self._exists(branch_id):
            branch_number += 1
            branch_id = f"{row['session_id']}_b{branch_number}"
        self.db.execute("UPDATE sessions SET branch_count = ? WHERE id = ?",
                         (branch_number, row["session_id"]))
        info = self._new(record, fingerprint=key, kind=SessionKind.BRANCH, parent=row,
                         parent_seq=row["seq"], reason="message_history_diverged",
                         session_id=branch_id)
        info.new_messages = new_messages
        return info

    @staticmethod
    def _choose(rows: list[sqlite3.Row], lane: Lane | None) -> sqlite3.Row:
        """Same client session first, then a session whose latest state matches, then recency."""
        client_id = lane.client_session_id if lane is not None else None

        def rank(row: sqlite3.Row) -> tuple[int, int]:
            same_client = client_id is not None and row["client_session_id"] == client_id
            other_client = (client_id is not None and row["client_session_id"] is not None
                            and not same_client)
            return (0 if same_client else 2 if other_client else 1,
                    0 if row["seq"] == row["state_seq"] else 1)
        return min(rows, key=rank)  # rows come newest first; min keeps the first of equals

    # -- writing the state -----------------------------------------------------------------------

    def _save(self, record: Record, info: SessionInfo, history: History) -> None:
        exchange = record.exchange
        parsed = record.parsed
        usage = parsed.usage
        now = iso(exchange.wall_time(exchange.finished_ns or exchange.started_ns))
        model = parsed.response_model or parsed.model
        succeeded = _succeeded(record)
        state_key = history.fingerprint(len(history.messages),
                                        output_messages(parsed.output_message)) \
            if succeeded else None
        tokens = (usage.input_tokens or 0, usage.output_tokens or 0,
                  usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0)
        compacted = 1 if info.compaction == "compacted" else 0
        if info.new_session:
            self.db.execute(
                "INSERT INTO sessions (id, provider, upstream, created_at, last_activity,"
                " last_seq, last_fingerprint, state_seq, file_path, parent_id, fork_from_seq,"
                " client_session_id, model, system_sha256, last_response_id, input_tokens,"
                " output_tokens, cache_read_input_tokens, cache_creation_input_tokens, kind,"
                " agent_id, parent_agent_id, compactions)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (info.id, exchange.provider, exchange.upstream_url, iso(exchange.started_wall),
                 now, info.seq, state_key or "", info.seq if succeeded else 0, info.file,
                 info.parent_id, info.fork_from_seq, info.client_session_id, model,
                 info.system_sha256, parsed.response_id if succeeded else None, *tokens,
                 info.kind, info.agent_id, info.parent_agent_id, compacted),
            )
        else:
            self.db.execute(
                "UPDATE sessions SET last_activity = ?, last_seq = ?, model = COALESCE(?, model),"
                " system_sha256 = COALESCE(?, system_sha256),"
                " client_session_id = COALESCE(client_session_id, ?),"
                " input_tokens = input_tokens + ?, output_tokens = output_tokens + ?,"
                " cache_read_input_tokens = cache_read_input_tokens + ?,"
                " cache_creation_input_tokens = cache_creation_input_tokens + ?,"
                " last_fingerprint = COALESCE(?, last_fingerprint),"
                " state_seq = CASE WHEN ? THEN ? ELSE state_seq END,"
                " compactions = compactions + ?,"
                " last_response_id = COALESCE(?, last_response_id) WHERE id = ?",
                (now, info.seq, model, info.system_sha256, info.client_session_id, *tokens,
                 state_key, succeeded, info.seq, compacted,
                 parsed.response_id if succeeded else None, info.id),
            )
        if not succeeded:
            return
        keys = [(state_key, info.id, info.seq)]
        keys.extend((key, info.id, info.seq) for key in spawn_keys(parsed.output_message))
        if parsed.response_id and exchange.path.rstrip("/").endswith("/responses"):
            # Responses API turns are chained by previous_response_id.
            keys.append(("resp:" + parsed.response_id, info.id, info.seq))
        self.db.executemany(
            "INSERT OR REPLACE INTO fingerprints (fingerprint, session_id, seq) VALUES (?,?,?)",
            keys,
        )
