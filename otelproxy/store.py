"""The local record: JSONL files plus the ``exchanges`` table of the SQLite index.

Layout (under ``log_dir``)::

    sessions.db                               SQLite index (``otelproxy.db``)
    {provider}/{session-id}.jsonl             one conversation: session_start, request, response…
    {provider}/{session-id}_b{n}.jsonl        a branch: the parent's entries up to the fork
                                              point, a ``fork`` entry, then its own turns
    {provider}/untracked-{YYYYMMDD}.jsonl     every other call (count_tokens, models, HEAD …)
    rejected-{YYYYMMDD}.jsonl                 requests the proxy refused (403/404/413)

Entries are one JSON object per line (see README "The local record"). Bodies that are UTF-8 are
stored as text, anything else as base64 with ``"body_encoding": "base64"``. This sink runs inline
on the pipeline's thread (off the request path); if it cannot write, it logs loudly and counts
the failure (visible on ``/healthz``) while the proxy keeps forwarding.
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from otelproxy.compact import DeltaEncoder
from otelproxy.config import PROVIDERS
from otelproxy.pipeline import Failures
from otelproxy.preview import assistant_preview, user_preview
from otelproxy.record import SCHEMA_VERSION, Outcome, Record, SessionKind, iso

log = logging.getLogger("otelproxy.store")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
"""The record holds conversations: only its owner may read it (the SQLite files included)."""


def make_private(log_dir: Path) -> None:
    """Create ``log_dir`` owner-only and make the record already in it owner-only:
    ``sessions.db*`` and JSONL files 0600, the provider folders 0700. Nothing else is touched,
    and the log dir's own mode only changes when it holds nothing but the record: a
    ``--log-dir`` shared with other files (``.``, a home folder) keeps its mode, with a
    warning. What cannot be changed is reported once, not fatal."""
    log_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    record: list[tuple[os.DirEntry[str], int]] = []  # (entry, wanted mode)
    others: list[str] = []
    with os.scandir(log_dir) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and entry.name in PROVIDERS:
                record.append((entry, PRIVATE_DIR))
                with os.scandir(entry.path) as files:
                    record.extend((item, PRIVATE_FILE) for item in files if _is_record_file(item))
            elif _is_record_file(entry):
                record.append((entry, PRIVATE_FILE))
            else:
                others.append(entry.name)
    changes = [(entry.path, mode, entry.stat(follow_symlinks=False).st_mode)
               for entry, mode in record]
    if others:
        log.warning("the log dir %s holds more than the record (%s): its own mode is left as it "
                    "is; give otelproxy a folder of its own to keep the record private", log_dir,
                    ", ".join(sorted(others)[:3]) + (", …" if len(others) > 3 else ""))
    else:
        changes.append((str(log_dir), PRIVATE_DIR, log_dir.stat().st_mode))
    refused: list[str] = []
    for path, mode, current in changes:
        if current & 0o777 != mode:
            try:
                os.chmod(path, mode)
            except OSError as exc:
                refused.append(f"{path}: {exc.strerror}")
    if refused:
        log.warning("cannot make %d path(s) of the record owner-only (first: %s)",
                    len(refused), refused[0])


def _is_record_file(entry: os.DirEntry[str]) -> bool:
    """A JSONL file or one of SQLite's files of the index (not a symlink)."""
    return entry.is_file(follow_symlinks=False) and (
        entry.name.endswith(".jsonl") or entry.name.startswith("sessions.db"))


FORK_KINDS = (SessionKind.BRANCH, SessionKind.SESSION_FORK)
"""Sessions whose file starts with a copy of the parent's entries up to the fork point."""


def body_fields(data: bytes, key: str = "body") -> dict[str, Any]:
    try:
        return {key: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: base64.b64encode(data).decode("ascii"), f"{key}_encoding": "base64"}


def headers_dict(headers: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Headers as a JSON object; a repeated header becomes a list of its values."""
    out: dict[str, str | list[str]] = {}
    for name, value in headers:
        key = name.lower()
        if key in out:
            existing = out[key]
            out[key] = [*existing, value] if isinstance(existing, list) else [existing, value]
        else:
            out[key] = value
    return out


def request_entry(record: Record) -> dict[str, Any]:
    exchange = record.exchange
    session = record.session
    parsed = record.parsed
    entry: dict[str, Any] = {
        "type": "request",
        "ts": iso(exchange.started_wall),
        "seq": session.seq if session else None,
        "session_id": session.id if session else None,
        "exchange_id": exchange.id,
        "method": exchange.method,
        "path": exchange.path,
        "query": exchange.query,
        "upstream": exchange.upstream_url,
        "headers": headers_dict(record.request_headers),
        **body_fields(record.request_body),
        "size": len(exchange.request_body),
    }
    if record.request_content_encoding:  # the body is the decoded one
        entry["content_encoding"] = record.request_content_encoding
    if parsed.model:
        entry["model"] = parsed.model
    if session:
        if session.fingerprint:
            entry["fingerprint"] = session.fingerprint
        if session.client_session_id:
            entry["client_session_id"] = session.client_session_id
        if session.agent_id:
            entry["agent_id"] = session.agent_id
        if session.parent_agent_id:
            entry["parent_agent_id"] = session.parent_agent_id
        if session.compaction:
            entry["compaction"] = session.compaction
    return entry


def response_entry(record: Record) -> dict[str, Any]:
    exchange = record.exchange
    parsed = record.parsed
    finished = exchange.finished_ns or exchange.started_ns
    first_ns = exchange.chunks[0][0] if exchange.chunks else exchange.headers_ns
    entry: dict[str, Any] = {
        "type": "response",
        "ts": iso(exchange.wall_time(finished)),
        "seq": record.session.seq if record.session else None,
        "session_id": record.session.id if record.session else None,
        "exchange_id": exchange.id,
        "status": exchange.status,
        "headers": headers_dict(record.response_headers),
    }
    if record.streaming:
        previous = exchange.started_ns
        chunks = []
        for event in record.events:
            chunk: dict[str, Any] = {
                "ts": iso(exchange.wall_time(event.ns)),
                "delta_ms": round((event.ns - previous) / 1e6, 3),
                "offset_ms": round((event.ns - exchange.started_ns) / 1e6, 3),
                **body_fields(event.raw, "raw"),
            }
            chunks.append(chunk)
            previous = event.ns
        entry["chunks"] = chunks
    else:
        entry.update(body_fields(record.response_body))
    entry["size"] = exchange.response_size
    if record.content_encoding:
        entry["content_encoding"] = record.content_encoding
        entry["decoded_size"] = len(record.response_body)
    if record.decode_error:
        entry["decode_error"] = record.decode_error
    entry["timing"] = {
        "ttfb_ms": exchange.ms_since_start(first_ns),
        "headers_ms": exchange.ms_since_start(exchange.headers_ns),
        "total_ms": exchange.ms_since_start(finished),
    }
    usage = parsed.usage
    if usage.input_tokens is not None or usage.output_tokens is not None:
        entry["usage"] = {k: v for k, v in (
            ("input_tokens", usage.input_tokens), ("output_tokens", usage.output_tokens),
            ("cache_read_input_tokens", usage.cache_read_input_tokens),
            ("cache_creation_input_tokens", usage.cache_creation_input_tokens),
        ) if v is not None}
    if parsed.tokens_per_second is not None:
        entry["tokens_per_second"] = parsed.tokens_per_second
    if parsed.response_model:
        entry["model"] = parsed.response_model
    if parsed.finish_reasons:
        entry["stop_reason"] = parsed.finish_reasons[0]
    entry["outcome"] = str(exchange.outcome)
    if exchange.error:
        entry["error"] = exchange.error
    if exchange.generated_response:
        entry["generated_by_proxy"] = True
    entry["proxy"] = {"overhead_ms": round(exchange.proxy_ns / 1e6, 3)}
    if parsed.parse_error:
        entry["parse_error"] = parsed.parse_error
    if record.notes:
        entry["notes"] = record.notes
    return entry


def _dumps(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)


class LocalStore:
    """The local record: writes JSONL lines and ``exchanges`` rows, inline on the pipeline thread.

    It shares the session tracker's SQLite connection, so a batch's session state and index rows
    commit in one transaction and the JSONL files never disagree with the DB; a second writer
    connection would also make the two wait on SQLite's write lock. Failures are counted and
    logged (``Failures``) and shown on ``/healthz``; they never reach the proxy.
    """

    name = "local-store"
    max_open_files = 64

    def __init__(self, log_dir: Path, conn: sqlite3.Connection | None = None) -> None:
        self.log_dir = log_dir
        self.written = 0
        self.failures = Failures()
        self._db = conn
        self._open: dict[str, int] = {}
        self._dirs: set[str] = set()
        self._deltas = DeltaEncoder()
        log_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)

    def submit(self, record: Record) -> None:
        try:
            self.write(record)
        except Exception as exc:
            self.failures.record(self.name, exc)
            return
        self.written += 1

    def counters(self) -> dict[str, int]:
        return {"records_written": self.written, "sink_errors": self.failures.total}

    def flush(self, timeout: float) -> bool:
        return True  # every line is written by the time submit() returns

    def shutdown(self, timeout: float) -> bool:
        self._close_files()
        return True

    def write(self, record: Record) -> None:
        exchange = record.exchange
        if exchange.outcome is Outcome.REJECTED:
            name = f"rejected-{_day(exchange.started_wall)}.jsonl"
            self._append(name, [_dumps(rejected_entry(record))])
            return
        session = record.session
        lines: list[bytes] = []
        if session is not None:
            relative = session.file
            if session.new_session and session.kind in FORK_KINDS:
                self._start_branch(record)
            elif session.new_session:
                lines.append(_dumps(session_start_entry(record)))
        else:
            relative = f"{exchange.provider}/untracked-{_day(exchange.started_wall)}.jsonl"
        request = request_entry(record)
        if session is not None:
            self._compact(record, request)
        request_line = _dumps(request)
        try:
            offset, _ = self._append(relative,
                                     [*lines, request_line, _dumps(response_entry(record))])
        except OSError:
            if session is not None:
                self._deltas.forget(session.id)  # the next body must not name this one
            raise
        offset += sum(len(line) for line in lines)
        self._index(record, relative, offset, len(request_line))

    def _compact(self, record: Record, entry: dict[str, Any]) -> None:
        """A conversation turn's body as a delta against the previous one (``compact``)."""
        session = record.session
        assert session is not None
        fields = self._deltas.encode(session.id, record.exchange.id, record.request_body,
                                     fallback=session.parent_id)
        if fields is not None:
            del entry["body"]
            entry.update(fields)

    def _start_branch(self, record: Record) -> None:
        session = record.session
        assert session is not None and session.parent_id is not None
        parent_file = self.log_dir / session.file.rsplit("/", 1)[0] / f"{session.parent_id}.jsonl"
        copied: list[bytes] = []
        if parent_file.exists():
            with parent_file.open("rb") as handle:
                for line in handle:
                    entry = orjson.loads(line)
                    seq = entry.get("seq")
                    if isinstance(seq, int) and seq > (session.fork_from_seq or 0):
                        break
                    if entry.get("type") == "fork" and entry.get("from_seq", 0) >= (
                        session.fork_from_seq or 0
                    ):
                        break
                    copied.append(line)
        fork = {
            "type": "fork",
            "ts": iso(record.exchange.started_wall),
            "session_id": session.id,
            "from_seq": session.fork_from_seq,
            "parent_session": session.parent_id,
            "reason": session.fork_reason or "message_history_diverged",
            "kind": session.kind,
            "schema_version": SCHEMA_VERSION,
        }
        if session.client_session_id:
            fork["client_session_id"] = session.client_session_id
        self._append(session.file, [*copied, _dumps(fork)])

    def _fd(self, relative: str) -> int:
        """An append-only descriptor for a record file, kept open (least recently used closed)."""
        fd = self._open.pop(relative, None)
        if fd is None:
            path = os.path.join(self.log_dir, relative)
            folder = os.path.dirname(path)
            if folder not in self._dirs:
                os.makedirs(folder, mode=PRIVATE_DIR, exist_ok=True)
                self._dirs.add(folder)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
            while len(self._open) >= self.max_open_files:
                os.close(self._open.pop(next(iter(self._open))))
        self._open[relative] = fd
        return fd

    def _append(self, relative: str, lines: list[bytes]) -> tuple[int, int]:
        data = b"".join(lines)
        fd = self._fd(relative)
        try:
            offset = os.fstat(fd).st_size
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError:
            os.close(self._open.pop(relative))
            raise
        return offset, len(data)

    def _close_files(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def _index(self, record: Record, relative: str, offset: int, length: int) -> None:
        if self._db is None:
            return
        exchange = record.exchange
        session = record.session
        parsed = record.parsed
        usage = parsed.usage
        first_ns = exchange.chunks[0][0] if exchange.chunks else exchange.headers_ns
        self._db.execute(
            "INSERT OR REPLACE INTO exchanges (id, session_id, seq, ts, provider, upstream, method,"
            " path, status, outcome, model, stop_reason, input_tokens, output_tokens,"
            " cache_read_input_tokens, cache_creation_input_tokens, ttfb_ms, total_ms,"
            " user_preview, assistant_preview, file_path, offset, length, agent_id, compaction)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                exchange.id, session.id if session else None, session.seq if session else None,
                iso(exchange.started_wall), exchange.provider, exchange.upstream_url,
                exchange.method, exchange.path, exchange.status, str(exchange.outcome),
                parsed.response_model or parsed.model,
                parsed.finish_reasons[0] if parsed.finish_reasons else None,
                usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens,
                usage.cache_creation_input_tokens, exchange.ms_since_start(first_ns),
                exchange.ms_since_start(exchange.finished_ns),
                user_preview(parsed.messages) if session else None,
                assistant_preview(parsed.output_message) if session else None,
                relative, offset, length,
                session.agent_id if session else None, session.compaction if session else None,
            ),
        )


def session_start_entry(record: Record) -> dict[str, Any]:
    exchange = record.exchange
    session = record.session
    assert session is not None
    entry: dict[str, Any] = {
        "type": "session_start",
        "ts": iso(exchange.started_wall),
        "session_id": session.id,
        "provider": exchange.provider,
        "upstream": exchange.upstream_url,
        "schema_version": SCHEMA_VERSION,
    }
    entry["kind"] = session.kind
    for key, value in (("client_session_id", session.client_session_id),
                       ("agent_id", session.agent_id),
                       ("parent_agent_id", session.parent_agent_id),
                       ("parent_session", session.parent_id),
                       ("parent_seq", session.fork_from_seq)):
        if value is not None:
            entry[key] = value
    return entry


def rejected_entry(record: Record) -> dict[str, Any]:
    exchange = record.exchange
    return {
        "type": "rejected",
        "ts": iso(exchange.started_wall),
        "exchange_id": exchange.id,
        "method": exchange.method,
        "path": exchange.path,
        "query": exchange.query,
        "headers": headers_dict(record.request_headers),
        "size": len(exchange.request_body),
        "status": exchange.status,
        "error": exchange.error,
    }


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")
