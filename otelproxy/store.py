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
import contextlib
import errno
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson

from otelproxy.compact import DeltaEncoder
from otelproxy.config import PROVIDERS
from otelproxy.pipeline import Failures
from otelproxy.preview import assistant_preview, user_preview
from otelproxy.record import (
    SCHEMA_VERSION,
    BodyCut,
    Event,
    Exchange,
    Outcome,
    Record,
    SessionKind,
    iso,
)
from otelproxy.retention import QUIET_S, SWEEP_EVERY, Retention, sweep
from otelproxy.sessions import SessionTracker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


def cut_fields(cut: BodyCut | None) -> dict[str, Any]:
    """``body_truncated`` and, when known, ``body_wire_sha256``: the SHA-256 of the whole body
    as it crossed the proxy (before redaction; ``body_sha256`` is a compact entry's own)."""
    if cut is None:
        return {}
    return {"body_truncated": True,
            **({"body_wire_sha256": cut.sha256} if cut.sha256 else {})}


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


def request_entry(record: Record, delta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``request`` entry; with ``delta`` (``DeltaEncoder.encode``'s fields) in place of
    the body, at the end. (A delta is only made for a conversation turn, whose body parsed as
    JSON: UTF-8, so it would have been recorded as text, with no ``body_encoding``.)"""
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
        **(body_fields(record.request_body) if delta is None else {}),
        "size": exchange.request_size,
        **cut_fields(exchange.request_cut),
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
    if delta is not None:
        entry.update(delta)
    return entry


def response_entry(record: Record) -> dict[str, Any]:
    exchange = record.exchange
    parsed = record.parsed
    finished = exchange.finished_ns or exchange.started_ns
    first_ns = exchange.first_byte_ns
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
        entry["chunks"] = _chunk_entries(exchange, record.events)
    else:
        entry.update(body_fields(record.response_body))
    entry["size"] = exchange.response_size
    entry.update(cut_fields(exchange.response_cut))
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


def _chunk_entries(exchange: Exchange, events: list[Event]) -> list[dict[str, Any]]:
    """The ``chunks`` of a stream's response entry (a hundred or more a turn: written out
    here rather than through ``Exchange.wall_time``, ``iso`` and ``body_fields``, same
    values; the microseconds of ``ts`` from ``_DIGITS``, the gaps and offsets in ms from
    whole nanoseconds, see ``_EXACT_NS``)."""
    started_ns, started_wall = exchange.started_ns, exchange.started_wall
    previous = started_ns
    chunks: list[dict[str, Any]] = []
    append = chunks.append
    second_of_prefix, prefix = -1, ""
    digits, exact = _DIGITS, _EXACT_NS
    for event in events:
        ns = event.ns
        offset = ns - started_ns
        ts = started_wall + offset / 1e9
        second = int(ts)
        if second != second_of_prefix:  # iso(ts) is prefix + ".123456Z"
            second_of_prefix, prefix = second, iso(ts)[:-8]
        micros = round((ts - second) * 1e6)
        gap = ns - previous
        previous = ns
        try:
            text = event.raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        chunk: dict[str, Any] = {
            "ts": f"{prefix}.{digits[micros // 1000]}{digits[micros % 1000]}Z"
            if 0 <= micros <= 999_999 else f"{prefix}.{min(micros, 999_999):06d}Z",
            "delta_ms": (gap + 500) // 1000 / 1000 if 0 <= gap < exact
            and gap % 1000 != 500 else round(gap / 1e6, 3),
            "offset_ms": (offset + 500) // 1000 / 1000 if 0 <= offset < exact
            and offset % 1000 != 500 else round(offset / 1e6, 3),
            "raw": text,
        }
        if text is None:
            chunk.update(body_fields(event.raw, "raw"))
        append(chunk)
    return chunks


_DIGITS = [f"{n:03d}" for n in range(1000)]
"""``_DIGITS[n // 1000] + _DIGITS[n % 1000]`` is ``f"{n:06d}"`` for n in 0…999999, in a third
of the time (formatting with a spec is the slowest step of a chunk entry)."""
_EXACT_NS = 10 ** 15
"""Below this many nanoseconds ``round(n / 1e6, 3)`` is the nearest whole microsecond over
1000 (``(n + 500) // 1000 / 1000``, exact integer arithmetic and one correctly rounded
division), except on a tie (…500 ns, where the float decides) and for negatives (-0.0):
those take ``round``."""


def _dumps(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)


RETRY_FIRST = 0.5
"""Seconds before the first new attempt to open a record that could not be opened."""
RETRY_MAX = 30.0
"""The longest wait between attempts (the wait doubles from ``RETRY_FIRST``)."""
FREE_MARGIN = 64 * 1024
"""After a batch failed on a full disk, /healthz says ``failing`` until the disk has that
batch's size plus this much free again and the index can be written (or a batch succeeds)."""
_SQLITE_FULL = 13


def _identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of a path, None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class LocalStore:
    """The local record: JSONL lines and ``exchanges`` rows, written a batch at a time.

    Lines never reach a file one by one. A batch's lines are staged per file while the session
    tracker and this store fill one SQLite transaction; the staged bytes go into that transaction
    too (table ``record_journal``), then it commits, then each file gets its bytes in one
    ``os.write`` loop. So a crash at any point leaves either nothing of the batch (before the
    commit) or the whole batch in the journal, and ``open`` rewrites the journal's bytes that did
    not reach their file. A short write or an error (ENOSPC, EIO…) truncates the file back to the
    end of its last whole line; the journal keeps the bytes and the next batch writes them first.
    When that fails too the batch is rolled back, counted in ``records_unrecorded`` and the
    error shown on ``/healthz`` (``record_error``), and nothing half-written is left behind.

    The log dir is checked (device and inode) before every batch and several times a second when
    idle: deleted or replaced, it is created again with a new index and counted as a sink error.
    An unopenable record (unwritable or missing dir) is retried with a doubling wait
    (``RETRY_FIRST`` … ``RETRY_MAX``); exchanges meanwhile are counted, not recorded.
    """

    name = "local-store"
    max_open_files = 64

    def __init__(self, log_dir: Path, sessions: SessionTracker,
                 retention: Retention | None = None) -> None:
        self.log_dir = log_dir
        self.retention = retention
        """Age and size caps, swept at start and every ``SWEEP_EVERY`` seconds (None: keep)."""
        self.retention_deleted = 0
        self.retention_freed = 0
        self._sweep_at = 0.0
        self._said_over_cap = False
        self.written = 0
        self.unrecorded = 0
        self.dirs_recreated = 0
        self.failures = Failures()
        self.record_error: str | None = None
        """Why the record is not being written now (None while it is)."""
        self._sessions = sessions
        self._open: dict[str, int] = {}
        self._dirs: set[str] = set()
        self._staged: dict[str, bytearray] = {}
        self._staged_sessions: set[str] = set()
        self._ends: dict[str, int] = {}
        self._deltas = DeltaEncoder()
        self._staged_records = 0
        self._in_batch = False
        self._unwritten = True  # until open() has compared the journal with the files
        self._dir_id: tuple[int, int] | None = None
        self._db_id: tuple[int, int] | None = None
        self._retry_at = 0.0
        self._retry_wait = RETRY_FIRST
        self._room_needed = 0
        self._failed_batch = False
        self.open()

    # -- opening, checking, reopening ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._dir_id is not None

    def open(self) -> bool:
        """Open the log dir and its index, finish a journal a crash left; False (error set,
        next attempt scheduled) when it cannot."""
        try:
            make_private(self.log_dir)  # before SQLite opens (and maybe creates) its files
            self._sessions.open()
            self._unwritten = True
            self._redo_journal()
            self._dir_id = _identity(self.log_dir)
            self._db_id = _identity(self._sessions.path)
        except (OSError, sqlite3.Error) as exc:
            self._close()
            self._unavailable(f"cannot open the record in {self.log_dir}: {_describe(exc)}")
            return False
        if self.record_error is not None:
            log.warning("the record in %s is open again", self.log_dir)
        self.record_error = None
        self._retry_wait = RETRY_FIRST
        return True

    def _unavailable(self, why: str) -> None:
        if self.record_error is None:  # say it once; /healthz keeps saying it
            log.error("%s; retrying with backoff up to %g s, exchanges meanwhile are counted "
                      "as unrecorded", why, RETRY_MAX)
        self.record_error = why
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(RETRY_MAX, self._retry_wait * 2)

    def _close(self) -> None:
        self._deltas = DeltaEncoder()  # a reopened record may not hold the bases
        self._close_files()
        self._dirs.clear()
        self._ends.clear()
        self._dir_id = self._db_id = None
        with contextlib.suppress(sqlite3.Error):
            self._sessions.close()

    def check(self) -> bool:
        """Cheap per-batch check (two ``stat`` calls): is the record open and in place? Reopens
        it when its dir or index was deleted, or when a retry is due. True when it is usable."""
        if self.is_open:
            if _identity(self.log_dir) == self._dir_id and \
                    _identity(self._sessions.path) == self._db_id:
                return True
            self.dirs_recreated += 1
            self.failures.record(self.name, FileNotFoundError(
                f"the log dir {self.log_dir} or its index was deleted or replaced while "
                "recording; recording again into a new one"))
            self._close()
            self._retry_at = 0.0
        if time.monotonic() < self._retry_at:
            return False
        return self.open()

    def tick(self) -> None:
        """Called when the recorder is idle: notice a deleted dir, retry opening, retry writing
        what the journal holds (so /healthz recovers without traffic), apply retention."""
        self._sweep_if_due()
        if not self._in_batch and self.check() and self._write_journal() and \
                self._failed_batch and _free_bytes(self.log_dir) >= self._room_needed and \
                self._probe():
            self._failed_batch = False
            self.record_error = None

    def _probe(self) -> bool:
        """After a batch failed: can the index be written again (a transaction that writes a
        page and takes it back)?"""
        try:
            with self._sessions.transaction():
                db = self._sessions.db
                db.execute("INSERT INTO record_journal (file_path, offset, data)"
                           " VALUES ('', 0, zeroblob(4096))")
                db.execute("DELETE FROM record_journal WHERE file_path = ''")
        except (OSError, sqlite3.Error):
            return False
        return True

    # -- the batch ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction for a batch (the session tracker's state and this store's rows); the
        staged lines are written after it commits. Unusable, the batch is counted unrecorded."""
        if not (self.check() and self._write_journal()):
            yield  # submit() counts each record; the tracker assigns no session
            return
        self._in_batch = True
        try:
            with self._sessions.transaction():
                self._sessions.db.execute("DELETE FROM record_journal")
                yield
                self._journal_staged()
        except Exception as exc:
            self._discard_staged(exc)
            return
        finally:
            self._in_batch = False
        self._write_staged()
        self._sweep_if_due()

    # -- retention -------------------------------------------------------------------------------

    def _sweep_if_due(self) -> None:
        """Between batches, when due: delete what the retention caps leave no room for."""
        if self.retention is None or self._in_batch or time.monotonic() < self._sweep_at \
                or not self.is_open or self._failed_batch:
            return
        self._sweep_at = time.monotonic() + SWEEP_EVERY
        try:
            done = sweep(self._sessions.db, self.log_dir, max_age_s=self.retention.max_age_s,
                         max_bytes=self.retention.max_bytes)
        except (OSError, sqlite3.Error) as exc:
            self.failures.record(f"{self.name} retention", exc)
            return
        for relative in done.files:  # gone: forget the descriptor and the known size
            fd = self._open.pop(relative, None)
            if fd is not None:
                os.close(fd)
            self._ends.pop(relative, None)
        for session_id in done.sessions:
            self._deltas.forget(session_id)
        self.retention_deleted += len(done.files)
        self.retention_freed += done.bytes_freed
        if done.files:
            log.info("retention: deleted %d record file(s) (%d session(s)), %d bytes",
                     len(done.files), len(done.sessions), done.bytes_freed)
        if done.over_cap and not self._said_over_cap:
            log.warning("retention: the record is %d bytes over --retention-max-bytes in "
                        "conversations active in the last %d minutes; they are kept",
                        done.over_cap, QUIET_S // 60)
        self._said_over_cap = bool(done.over_cap)

    def submit(self, record: Record) -> None:
        if not self._in_batch:
            self.unrecorded += 1
            return
        try:
            self.write(record)
        except Exception as exc:
            self.unrecorded += 1
            self.failures.record(self.name, exc)
            if record.session is not None:
                self._deltas.forget(record.session.id)
            return
        self._staged_records += 1

    def counters(self) -> dict[str, int]:
        return {"retention_deleted_files": self.retention_deleted,
                "retention_freed_bytes": self.retention_freed,
                "records_written": self.written, "sink_errors": self.failures.total,
                "records_unrecorded": self.unrecorded,
                "log_dir_recreated": self.dirs_recreated}

    def flush(self, timeout: float) -> bool:
        return True  # every line is written by the time the batch ends

    def shutdown(self, timeout: float) -> bool:
        self._close_files()
        return True

    # -- staging, the journal and the files ------------------------------------------------------

    def _end(self, relative: str) -> int:
        """Where the next staged byte of a file will sit."""
        end = self._ends.get(relative)
        if end is None:
            try:
                st = os.stat(os.path.join(self.log_dir, relative))
                end = st.st_size if stat.S_ISREG(st.st_mode) else 0
            except OSError:  # not there yet (or unreachable: the write after the commit says)
                end = 0
            self._ends[relative] = end
        return end + len(self._staged.get(relative, b""))

    def _stage(self, relative: str, lines: list[bytes]) -> int:
        """Queue lines for a file (written after the commit); the offset they will have."""
        offset = self._end(relative)
        for line in lines:
            self._staged.setdefault(relative, bytearray()).extend(line)
        return offset

    def _journal_staged(self) -> None:
        """Inside the transaction: the staged bytes, so a crash after the commit loses none."""
        self._sessions.db.executemany(
            "INSERT INTO record_journal (file_path, offset, data) VALUES (?,?,?)",
            [(relative, self._ends[relative], bytes(data))
             for relative, data in self._staged.items()],
        )

    def _write_journal(self) -> bool:
        """Before a batch: the bytes a failed write left in the journal go to their files first
        (the next transaction empties the journal). False when they still cannot be written."""
        if not self._unwritten:
            return True
        try:
            self._redo_journal()
        except (OSError, sqlite3.Error) as exc:
            self.failures.record(self.name, exc)
            self.record_error = f"cannot write the record in {self.log_dir}: {_describe(exc)}"
            return False
        self.record_error = None
        return True

    def _redo_journal(self) -> None:
        """Write the journal's bytes that are not in their files (after a crash, at open, or
        after a failed write)."""
        rows = self._sessions.db.execute(
            "SELECT file_path, offset, data FROM record_journal ORDER BY rowid").fetchall()
        for relative, offset, data in rows:
            self._redo_row(relative, offset, data)
        self._ends.clear()
        self._unwritten = False
        if rows and self.record_error is None:
            log.info("wrote %d journal entr%s a crash had left unwritten",
                     len(rows), "y" if len(rows) == 1 else "ies")

    def _redo_row(self, relative: str, offset: int, data: bytes) -> None:
        path = os.path.join(self.log_dir, relative)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if size >= offset + len(data):
            return  # it reached the file before the crash
        self._write_file(relative, offset, data)
        self._ends.pop(relative, None)

    def _write_staged(self) -> None:
        """After the commit: each file's bytes in one write; a failure leaves them in the
        journal for the next batch."""
        staged, self._staged = self._staged, {}
        records, self._staged_records = self._staged_records, 0
        self._staged_sessions.clear()
        try:
            for relative, data in staged.items():
                start = self._write_file(relative, self._ends[relative], bytes(data))
                self._ends[relative] = start + len(data)
        except OSError as exc:
            self._ends.clear()
            self._unwritten = True
            self.failures.record(self.name, exc)
            self.record_error = f"cannot write the record in {self.log_dir}: {_describe(exc)}"
            self.written += records  # in the index and the journal: written on the next batch
            return
        self.written += records
        self.record_error = None
        self._failed_batch = False

    def _discard_staged(self, exc: BaseException) -> None:
        """The transaction failed (the index's disk is full…): the batch is not recorded."""
        self._failed_batch = True
        self._room_needed = sum(map(len, self._staged.values())) + FREE_MARGIN \
            if _disk_full(exc) else 0
        for session_id in self._staged_sessions:  # their next body must not name these
            self._deltas.forget(session_id)
        self._staged_sessions.clear()
        self._staged = {}
        self._ends.clear()
        self.unrecorded += self._staged_records
        self._staged_records = 0
        self.failures.record(self.name, exc)
        self.record_error = f"cannot write the record in {self.log_dir}: {_describe(exc)}"

    def _write_file(self, relative: str, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset`` as a whole: a torn tail past ``offset`` (a crash, an
        earlier short write) is cut first; a short write or an error truncates the file back to
        where it started, then raises."""
        fd = self._fd(relative)
        start = offset
        try:
            size = os.fstat(fd).st_size
            if size > offset:
                os.ftruncate(fd, offset)
            elif size < offset:  # shortened or deleted by someone else: append at its end
                log.warning("%s is %d bytes, %d expected: changed outside otelproxy",
                            relative, size, offset)
                start = size
                self._sessions.db.execute(
                    "UPDATE exchanges SET offset = offset - ? WHERE file_path = ? AND offset >= ?",
                    (offset - size, relative, offset))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                if start == 0:  # leave no empty file behind
                    os.unlink(os.path.join(self.log_dir, relative))
            os.close(self._open.pop(relative))
            raise
        return start

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

    def _close_files(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    # -- entries --------------------------------------------------------------------------------

    def write(self, record: Record) -> None:
        exchange = record.exchange
        if exchange.outcome is Outcome.REJECTED:
            name = f"rejected-{_day(exchange.started_wall)}.jsonl"
            self._stage(name, [_dumps(rejected_entry(record))])
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
        delta = None
        if session is not None:
            self._staged_sessions.add(session.id)  # forgotten by the encoder if not written
            delta = self._compact(record)
        request = request_entry(record, delta)
        request_line = _dumps(request)
        offset = self._stage(relative, [*lines, request_line, _dumps(response_entry(record))])
        offset += sum(len(line) for line in lines)
        self._index(record, relative, offset, len(request_line))

    def _compact(self, record: Record) -> dict[str, Any] | None:
        """A conversation turn's body as a delta against the previous one (``compact``); a
        body the record keeps only in part is recorded as it is and is no base."""
        session = record.session
        assert session is not None
        if record.exchange.request_cut is not None:
            self._deltas.forget(session.id)
            return None
        return self._deltas.encode(session.id, record.exchange.id, record.request_body,
                                   fallback=session.parent_id)

    def _start_branch(self, record: Record) -> None:
        session = record.session
        assert session is not None and session.parent_id is not None
        parent = f"{session.file.rsplit('/', 1)[0]}/{session.parent_id}.jsonl"
        parent_file = self.log_dir / parent
        parent_bytes = parent_file.read_bytes() if parent_file.exists() else b""
        copied: list[bytes] = []
        for line in (parent_bytes + self._staged.get(parent, b"")).splitlines(keepends=True):
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
        self._stage(session.file, [*copied, _dumps(fork)])

    def _index(self, record: Record, relative: str, offset: int, length: int) -> None:
        exchange = record.exchange
        session = record.session
        parsed = record.parsed
        usage = parsed.usage
        first_ns = exchange.first_byte_ns
        self._sessions.db.execute(
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


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


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
        "size": exchange.request_size,
        "status": exchange.status,
        "error": exchange.error,
    }


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d")
