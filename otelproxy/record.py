"""The record model every processor and sink reads.

``Exchange`` is what the proxy handler fills on the hot path: raw bytes and monotonic timestamps,
nothing parsed. When the exchange is over it is handed to the pipeline, which wraps it in a
``Record`` and runs the processors (redact → decode/split → provider parse → session → enrich);
the sinks then read the finished ``Record``. After the pipeline hands a record to the sinks nobody
mutates it again, so sinks on other threads may read it freely.

Bump ``SCHEMA_VERSION`` whenever the JSONL entry shape or the SQLite schema changes.
"""

from __future__ import annotations

import operator
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SCHEMA_VERSION = 3

_second_cache: dict[int, str] = {}


def iso(ts: float) -> str:
    """ISO 8601 UTC with microseconds: ``2026-01-13T10:23:45.123456Z``."""
    second = int(ts)
    prefix = _second_cache.get(second)
    if prefix is None:
        if len(_second_cache) > 64:
            _second_cache.clear()
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache[second] = prefix
    micros = min(999_999, round((ts - second) * 1e6))
    return f"{prefix}.{micros:06d}Z"


class Outcome(StrEnum):
    """How an exchange ended."""

    COMPLETE = "complete"
    """The upstream answered and every byte reached the client."""
    CLIENT_ABORTED = "client_aborted"
    """The client went away first; the upstream request was cancelled."""
    UPSTREAM_ABORTED = "upstream_aborted"
    """The upstream connection broke after the response head; the client saw the stream cut."""
    UPSTREAM_ERROR = "upstream_error"
    """The upstream could not be reached or failed before the response head; the proxy said 502."""
    SHUTDOWN_CUT = "shutdown_cut"
    """The proxy was shutting down (SIGTERM/SIGINT) and the request was still running when the
    grace period ended: the proxy cut it, client and upstream side."""
    PROXY_ENDED = "proxy_ended"
    """The proxy process ended (killed) while the response streamed: the record has the request
    and the response head it had handed to the recorder (``channel.Begun``), not the body."""
    REJECTED = "rejected"
    """The proxy refused the request (unknown provider, host not allowed, too large); nothing was
    sent upstream. Recorded in ``rejected-{date}.jsonl``, never counted as a forwarded request."""


@dataclass(slots=True)
class BodyCut:
    """A body the record keeps only the start of (``record_max_body``), or none of (the proxy's
    buffer to the recorder was full): its full size and, when known, the SHA-256 of all of it."""

    size: int
    sha256: str | None = None


_U64 = "L" if array("L").itemsize == 8 else "Q"
"""Typecode of ``Chunks``' 8-byte integers: unsigned ``L`` where it has 8 bytes, the cheapest to
append to (45 chunks filled in 11.8 us with it, 13.4 with ``Q``, 16.2 with ``q``, whose ``append``
parses its argument with a format string)."""


class Chunks:
    """A response body as it came from the upstream: for each network chunk, when it was
    received (``time.monotonic_ns()``) and its bytes. Iterating yields ``(ns, bytes)`` pairs.

    The proxy holds one per open stream, so it is packed: the bytes in one buffer, the chunk
    ends and times in two arrays of 8-byte integers, about the data plus 16 bytes a chunk (and
    the slack of growing). 45 SSE events of 140 bytes take 8.1 KB where a list of
    ``(ns, bytes)`` tuples took 12.2 KB.
    """

    __slots__ = ("data", "ends", "times")

    def __init__(self, data: bytearray | None = None, ends: array[int] | None = None,
                 times: array[int] | None = None) -> None:
        self.data = bytearray() if data is None else data
        """The chunks' bytes, one after the other."""
        self.ends = array(_U64) if ends is None else ends
        """Where each chunk ends in ``data``."""
        self.times = array(_U64) if times is None else times
        """When each chunk was received."""

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, bytes]]) -> Chunks:
        """From ``(ns, bytes)`` pairs, as iterating gives them back."""
        chunks = cls()
        for ns, data in pairs:
            chunks.append(ns, data)
        return chunks

    def append(self, ns: int, data: bytes) -> None:
        buffer = self.data
        buffer += data
        self.ends.append(len(buffer))
        self.times.append(ns)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        data = bytes(self.data)  # slices of bytes are bytes, and the buffer may still grow
        start = 0
        for ns, end in zip(self.times, self.ends, strict=True):
            yield ns, data[start:end]
            start = end

    def __len__(self) -> int:
        return len(self.times)

    @property
    def nbytes(self) -> int:
        """Bytes of body held."""
        return len(self.data)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as its buffer and arrays, each one string in the pickle."""
        return (Chunks, (self.data, self.ends, self.times))


@dataclass(slots=True)
class Exchange:
    """One request and its response as they crossed the proxy (filled by the handler).

    Timestamps are ``time.monotonic_ns()``; ``started_wall`` anchors them to wall-clock time.
    Headers are the raw ones, secrets included: only processors read them, and the redaction
    processor runs first, so no sink ever sees the raw values.
    """

    id: str
    provider: str
    upstream_url: str
    """``scheme://host[:port]`` of the upstream origin."""
    method: str
    path: str
    """The path on the upstream, e.g. ``/v1/messages``."""
    query: str
    request_headers: list[tuple[str, str]]
    request_body: bytes = b""
    started_wall: float = field(default_factory=time.time)
    started_ns: int = field(default_factory=time.monotonic_ns)
    forwarded_ns: int | None = None
    """When the request was handed to the upstream connection."""
    status: int | None = None
    reason: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    headers_ns: int | None = None
    """When the upstream response head arrived."""
    chunks: Chunks = field(default_factory=Chunks)
    """The response body as received from upstream: every chunk's bytes and receive time."""
    finished_ns: int | None = None
    """When the last byte was handed to the client (or the exchange ended otherwise)."""
    outcome: Outcome = Outcome.COMPLETE
    error: str | None = None
    """A short description of what went wrong, secrets never included."""
    proxy_ns: int = 0
    """Time the proxy itself spent: before forwarding, preparing headers, writing chunks."""
    generated_response: bool = False
    """True when the proxy wrote the response itself (502/504 on upstream failure)."""
    request_cut: BodyCut | None = None
    """Set when ``request_body`` holds only the start of the body the client sent."""
    response_cut: BodyCut | None = None
    """Set when ``chunks`` hold only the start of the response body."""
    request_handed: int | None = None
    """The size of the request body when the proxy handed it to the recorder while the
    response still streamed (``channel.Begun``): ``request_body`` is then empty here, and the
    recorder puts it back."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as the constructor's arguments, in field order: the proxy pickles every
        exchange for the recorder, and this is about three times cheaper than the default."""
        return (Exchange, _exchange_fields(self))

    @property
    def first_byte_ns(self) -> int | None:
        """When the first byte of the response body arrived (the head's time without a body)."""
        times = self.chunks.times
        return times[0] if times else self.headers_ns

    @property
    def response_size(self) -> int:
        """Bytes of the response body on the wire (all of them, also when cut)."""
        if self.response_cut is not None:
            return self.response_cut.size
        return self.chunks.nbytes

    @property
    def held_bytes(self) -> int:
        """Bytes of body it holds: the request body and the response chunks it keeps (what it
        weighs in memory, about)."""
        return len(self.request_body) + self.chunks.nbytes

    @property
    def request_size(self) -> int:
        """Bytes of the request body the client sent (all of them, also when cut)."""
        if self.request_cut is not None:
            return self.request_cut.size
        if self.request_handed is not None:
            return self.request_handed
        return len(self.request_body)

    def ms_since_start(self, ns: int | None) -> float | None:
        return None if ns is None else round((ns - self.started_ns) / 1e6, 3)

    def wall_time(self, ns: int) -> float:
        return self.started_wall + (ns - self.started_ns) / 1e9


_exchange_fields = operator.attrgetter(*(item.name for item in fields(Exchange)))


@dataclass(slots=True)
class Event:
    """A unit of the response body for the record: one SSE event, or one network chunk."""

    ns: int
    raw: bytes


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


@dataclass(slots=True)
class Parsed:
    """What the provider processor understood of the exchange (all optional)."""

    tracked: bool = False
    """A session-tracked call (a conversation turn)."""
    operation: str | None = None
    """GenAI operation name: ``chat`` for conversation calls, None otherwise."""
    request_json: Any = None
    model: str | None = None
    stream: bool | None = None
    messages: list[Any] | None = None
    system: Any = None
    metadata_user_id: str | None = None
    previous_response_id: str | None = None
    response_json: Any = None
    response_model: str | None = None
    response_id: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output_message: dict[str, Any] | None = None
    """The assistant message reassembled from the response (streamed or not)."""
    usage: Usage = field(default_factory=Usage)
    tokens_per_second: float | None = None
    parse_error: str | None = None


@dataclass(slots=True)
class SessionInfo:
    """Where the exchange sits in a conversation (filled by the session processor)."""

    id: str
    seq: int
    file: str
    """Path of the session's JSONL file relative to the log dir."""
    new_session: bool = False
    parent_id: str | None = None
    fork_from_seq: int | None = None
    fork_reason: str | None = None
    client_session_id: str | None = None
    fingerprint: str | None = None
    new_messages: list[Any] | None = None
    """Messages added since the session's previous turn (all of them on turn 1)."""
    system_sha256: str | None = None
    kind: str = "conversation"
    """How the session came to be (``SessionKind``); a turn of an existing session keeps it."""
    agent_id: str | None = None
    """Claude Code's ``x-claude-code-agent-id``: the subagent that sent the turn (None: main)."""
    parent_agent_id: str | None = None
    """``x-claude-code-parent-agent-id``: the agent that spawned it (None: the main thread)."""
    compaction: str | None = None
    """``request``: the client asked the model to summarise the conversation; ``compacted``: the
    turn's history was replaced by such a summary (the session continues)."""


class SessionKind(StrEnum):
    """How a session is related to the others (``sessions.kind``, ``session.kind``)."""

    CONVERSATION = "conversation"
    """A conversation of its own: a new client session, or one whose history matched nothing."""
    BRANCH = "branch"
    """``{parent}_b{n}``: the client rewound its conversation and diverged (same client session)."""
    SESSION_FORK = "session_fork"
    """A new client session that starts from another one's history (``--fork-session``,
    ``/branch``): a fork of the original at the shared turn."""
    SUBAGENT = "subagent"
    """A subagent's own conversation (``Agent``/``Task`` tool), linked to the spawning turn."""
    FORK_SUBAGENT = "fork_subagent"
    """A fork subagent: starts with its parent's whole history, yet is its own conversation."""


@dataclass(slots=True)
class Record:
    """An ``Exchange`` plus everything the processors derived from it; what sinks read."""

    exchange: Exchange
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    """Redacted request headers."""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    """Redacted response headers."""
    request_body: bytes = b""
    """Request body with secrets obfuscated (the record's copy, never the forwarded bytes);
    decoded when the client compressed it."""
    request_content_encoding: str | None = None
    """The request's ``content-encoding`` when ``request_body`` was decoded from it."""
    response_body: bytes = b""
    """Decoded (content-encoding removed), secrets obfuscated response body."""
    content_encoding: str | None = None
    decode_error: str | None = None
    streaming: bool = False
    events: list[Event] = field(default_factory=list)
    """The response's SSE events, secrets obfuscated (keys split across events included)."""
    payloads: list[tuple[str, Any]] = field(default_factory=list)
    """Each event's name and data, decoded from the obfuscated event
    (``otelproxy.providers.decode_event``)."""
    parsed: Parsed = field(default_factory=Parsed)
    session: SessionInfo | None = None
    notes: list[str] = field(default_factory=list)
    """Problems a processor ran into; kept in the record instead of raised."""
