"""The recorder: the pipeline (processors and sinks) in a process of its own.

    proxy process                           recorder process
    ─────────────                           ────────────────
    handler ──submit()──► channel ══ pipe ══► batch ─► processors ─► local store (JSONL+SQLite)
                                                                └─► OTLP sink (own thread)
    reader thread ◄──────── counters, acks ◄──┘

Everything the record costs — parsing, redaction, hashing, JSON encoding, SQLite, protobuf —
runs in the recorder process, so it neither holds the proxy's GIL nor takes its event loop's
time. The proxy only pickles the exchanges finished in one loop iteration and writes them, framed
(4-byte big-endian length + pickle), into a non-blocking pipe, straight from the event loop: no
thread hand-off (``multiprocessing.Queue``'s feeder thread cost ~0.1 ms per exchange in GIL and
wake-up traffic). What the pipe cannot take at once waits in a bounded buffer that the loop
drains when the pipe is writable. ``submit`` never blocks: with ``record_queue_size`` exchanges
unrecorded, or the buffer full, an exchange is dropped and counted.

The recorder runs at a lower CPU priority (``RECORDER_NICE``) and commits in groups (it waits up
to ``LINGER`` seconds for a batch to fill): serving requests comes first, the record catches up
in the gaps. It ignores SIGINT/SIGTERM (the proxy stops it after the streams in flight have
finished, so their exchanges are recorded too) and exits on its own, after flushing, when the
proxy's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from otelproxy import otlp
from otelproxy.config import Config
from otelproxy.pipeline import EXPORT_OFF, Pipeline, Sink
from otelproxy.processors import default_processors
from otelproxy.record import BodyCut, Exchange
from otelproxy.redact import redact_logging
from otelproxy.retention import Retention
from otelproxy.sessions import SessionTracker
from otelproxy.store import LocalStore

log = logging.getLogger("otelproxy.recorder")

_FLUSH = "flush"
_STOP = "stop"
_MAX_BATCH = 256
"""At most this many exchanges are recorded in one transaction."""
LINGER = 0.02
"""Seconds the recorder waits for more exchanges before it records a partial batch."""
RECORDER_NICE = 5
"""Added to the recorder's nice value: under CPU contention the proxy's loop runs first."""
_COUNTER_INTERVAL = 0.1
_IDLE_WAIT = 0.25
"""An idle recorder reports its counters and the export's health this often."""
_HEADER = struct.Struct("!I")
_MAX_BUFFER_BYTES = 256 * 1024 * 1024
"""Framed exchanges waiting in the proxy for room in the pipe; beyond this they are dropped."""
_STUB_RESERVE = 16 * 1024 * 1024
"""Room past that limit for exchanges sent without their bodies when the buffer is full: the
record keeps at least their request and response entries (``body_truncated``)."""
_PIPE_SIZE = 1024 * 1024
"""Asked of the kernel for the pipe (``F_SETPIPE_SZ``; Linux caps it at pipe-max-size)."""
RESTART_FIRST = 0.5
"""Seconds before restarting a recorder that died again soon after a restart (then doubled)."""
RESTART_MAX = 30.0
"""The longest wait between two restarts of a recorder that keeps dying."""
STABLE_AFTER = 60.0
"""A recorder that ran this long before it died is replaced at once, and its death logged."""


def frame(item: object) -> bytes:
    data = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def unframe(buffer: bytearray) -> Iterator[Any]:
    """Yield the complete frames at the start of ``buffer`` and remove them from it."""
    start = 0
    size = len(buffer)
    view = memoryview(buffer)
    try:
        while size - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + length
            if end > size:
                break
            yield pickle.loads(view[start + _HEADER.size:end])
            start = end
    finally:
        view.release()
        del buffer[:start]


class Channel:
    """The proxy's end of the pipe to the recorder: ordered frames, never a blocking write.

    ``send`` may be called from the event loop or any thread. It writes what the pipe takes at
    once; the rest waits in a buffer, which the loop drains when the pipe is writable
    (``add_writer``) and ``wait_sent`` drains on a thread that may block (flush, shutdown).
    """

    def __init__(self, connection: Connection, limit: int = _MAX_BUFFER_BYTES) -> None:
        self._connection = connection  # kept: it owns the descriptor
        self._fd = connection.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError, AttributeError):  # Linux only, best effort
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        self._limit = limit
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._watching: asyncio.AbstractEventLoop | None = None
        self.broken = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def send(self, item: object, reserve: int = 0) -> bool:
        """Queue ``item`` for the recorder; False when the buffer is full (past its limit plus
        ``reserve``) or the pipe broken."""
        data = frame(item)
        with self._lock:
            if self.broken or len(self._buffer) + len(data) > self._limit + reserve:
                return False
            written = 0 if self._buffer else self._write(data)  # keep frames in order
            if written < len(data):
                self._buffer += memoryview(data)[written:]
                self._drain()
                if self._buffer:
                    self._watch()
        return True

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE: the recorder is gone (the reader thread restarts it)
            self.broken = True
            self._buffer.clear()
            return len(data)

    def _drain(self) -> None:
        """Write as much of the buffer as the pipe takes (the lock is held)."""
        while self._buffer:
            written = self._write(self._buffer)
            if not written:
                return
            del self._buffer[:written]

    def _watch(self) -> None:
        """On an event loop, have it drain the buffer once the pipe is writable."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread: wait_sent() drains
        if self._watching is None:
            self._watching = loop
            loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        with self._lock:
            self._drain()
            if not self._buffer and self._watching is not None:
                self._watching.remove_writer(self._fd)
                self._watching = None

    def wait_sent(self, timeout: float) -> bool:
        """Block until the buffer is in the pipe (for threads that may block)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._drain()
                if not self._buffer:
                    return not self.broken
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([], [self._fd], [], min(remaining, 0.1))

    def close(self) -> None:
        """Give up what is buffered and close the pipe (after the loop stopped watching it)."""
        with self._lock:
            loop, self._watching = self._watching, None
            self.broken = True
            self._buffer.clear()
        if loop is not None and not loop.is_closed():
            def finish() -> None:
                loop.remove_writer(self._fd)
                self._connection.close()

            try:
                if asyncio.get_running_loop() is loop:
                    finish()
                    return
            except RuntimeError:
                pass
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(finish)
                return
        self._connection.close()


class Recorder:
    """The proxy's handle on the recorder process; the interface the handler and /healthz use."""

    def __init__(self, config: Config, env: dict[str, str] | None = None,
                 buffer_limit: int = _MAX_BUFFER_BYTES) -> None:
        """``buffer_limit``: bytes of framed exchanges that may wait in the proxy for the pipe."""
        self.config = config
        self._buffer_limit = buffer_limit
        self._env = dict(os.environ if env is None else env)
        otlp.resolve(config, self._env)  # a bad OTLP setting fails here, as a ConfigError
        self._context = multiprocessing.get_context("spawn")
        self._channel, self._results, self._child_ends, self._process = self._make_process()
        self._stopping = False
        self.restarts = 0
        self._earlier: dict[str, int] = {}  # counters of recorder processes that have died
        self._tokens = itertools.count(1)
        self._acks: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._read, name="otelproxy-recorder-reader",
                                        daemon=True)
        self._counters: dict[str, int] = {}
        self._export: dict[str, str | None] = dict(EXPORT_OFF)
        self.submitted = 0
        self.dropped = 0
        self.without_bodies = 0
        self._drop_logs = 0
        self._outbox: list[Exchange] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._processed = 0
        self._child_error: str | None = None
        self._down_error: str | None = None
        self._started_at = 0.0
        self._restart_wait = 0.0
        self._exited = threading.Event()
        self._stop_waiting = threading.Event()

    def _make_process(self) -> tuple[Channel, Connection, tuple[Connection, Connection], Any]:
        inbox, feed = self._context.Pipe(duplex=False)
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=recorder_main, args=(self.config, self._env, inbox, send),
            name="otelproxy-recorder",
            # A daemonic process may not have children; then shutdown() must stop it.
            daemon=not multiprocessing.current_process().daemon,
        )
        return Channel(feed, self._buffer_limit), receive, (inbox, send), process

    def _start_process(self) -> None:
        self._process.start()
        self._started_at = time.monotonic()
        for end in self._child_ends:  # the child has its copies; EOF must reach each side
            end.close()

    def _restart(self) -> None:
        """The recorder died (killed, out of memory, SIGBUS on a full disk): start another so
        recording goes on. The exchanges it had not recorded are lost with it, and counted as
        dropped. One that keeps dying is restarted after a doubling wait (``RESTART_FIRST`` …
        ``RESTART_MAX``) and logged once; new exchanges wait in the new pipe meanwhile."""
        self._process.join(5)
        self._exited.set()
        self.restarts += 1
        for key, value in self._counters.items():
            self._earlier[key] = self._earlier.get(key, 0) + value
        self._earlier["processed"] = self._earlier.get("processed", 0) + self._processed
        self._counters, self._processed = {}, 0
        lost = self.pending
        self.dropped += lost
        if time.monotonic() - self._started_at >= STABLE_AFTER:
            self._restart_wait = 0.0
        wait = self._restart_wait
        self._restart_wait = min(RESTART_MAX, max(RESTART_FIRST, wait * 2))
        status = _exit_status(self._process.exitcode)
        self._down_error = (f"the recorder process exited ({status}); "
                            f"restarting it in {wait:g} s" if wait else
                            f"the recorder process exited ({status}); restarting it")
        if wait == 0.0:  # the first exit after a good run: said once, then counted
            log.error("the recorder process exited (%s) with %d exchange(s) unrecorded; "
                      "starting a new one (restart %d). If it keeps exiting it is restarted "
                      "with a wait of up to %g s, counted on /healthz and not logged again",
                      status, lost, self.restarts, RESTART_MAX)
        else:
            log.debug("the recorder process exited again (%s); restart %d in %g s",
                      status, self.restarts, wait)
        old = self._channel
        self._channel, self._results, self._child_ends, self._process = self._make_process()
        old.close()
        if self._stop_waiting.wait(wait):
            return
        self._start_process()
        self._down_error = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the recorder process and wait until it has opened the record (or died: it is
        restarted in the background and the proxy serves meanwhile)."""
        self._start_process()
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05) and not self._exited.is_set():
            if time.monotonic() > deadline:
                log.error("the recorder process did not start in %g s", timeout)
                return

    def record_error(self) -> str | None:
        """Why the record is not being written now (None while it is): the recorder process is
        down, or the one running cannot write (its last error)."""
        if self._down_error is not None:
            return self._down_error
        if not self._process.is_alive() and not self._stopped.is_set():
            return "the recorder process is not running"
        return self._child_error

    # -- used on the proxy's event loop: must never block -------------------------------------

    def submit(self, exchange: Exchange) -> None:
        """Hand a finished exchange to the recorder. On an event loop, the exchanges finished in
        one loop iteration go together (one pickle, one pipe write)."""
        self.submitted += 1
        if self.pending > self.config.record_queue_size:
            self._drop(1, "record queue full")
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send([exchange])
            return
        self._loop = loop
        self._outbox.append(exchange)
        if len(self._outbox) == 1:
            loop.call_soon(self._send_outbox)

    def _send_outbox(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._send(batch)

    def _send(self, batch: list[Exchange]) -> None:
        channel = self._channel
        if channel.send(batch):
            return
        if not channel.broken and channel.send([without_bodies(e) for e in batch],
                                               _STUB_RESERVE):
            self.without_bodies += len(batch)
            if self.without_bodies == len(batch):
                log.error("record buffer full: exchanges are recorded without their bodies "
                          "(counted in records_without_bodies)")
            return
        self._drop(len(batch), "recorder gone" if channel.broken else "record buffer full")

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self._drop_logs == 0 or self._drop_logs % 100 == 0:
            log.error("%s: %d exchange(s) dropped so far", why, self.dropped)
        self._drop_logs += 1

    def _push_outbox(self, timeout: float) -> None:
        """From another thread: make sure exchanges submitted so far are on their way."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._send_outbox()
                return
        except RuntimeError:
            pass
        pushed = threading.Event()

        def push() -> None:
            self._send_outbox()
            pushed.set()

        try:
            loop.call_soon_threadsafe(push)
        except RuntimeError:  # the loop closed meanwhile
            return
        pushed.wait(timeout)

    @property
    def pending(self) -> int:
        """Exchanges submitted and not yet recorded (nor dropped)."""
        processed = self._processed + self._earlier.get("processed", 0)
        return max(0, self.submitted - self.dropped - processed)

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        for key, value in self._earlier.items():
            if key != "processed":
                out[key] = out.get(key, 0) + value
        out["records_dropped"] = out.get("records_dropped", 0) + self.dropped
        out["records_without_bodies"] = self.without_bodies
        out["recorder_restarts"] = self.restarts
        # A recorder that died counts as a sink error: /healthz turns "degraded".
        out["sink_errors"] = out.get("sink_errors", 0) + self.restarts
        if not self._process.is_alive() and not self._stopped.is_set():
            out["sink_errors"] += 1
        return out

    def export_status(self) -> dict[str, str | None]:
        """The OTLP export's health as the recorder process last reported it (within
        ``_IDLE_WAIT``)."""
        return dict(self._export)

    # -- blocking calls, for shutdown and tests ------------------------------------------------

    def _control(self, message: tuple[str, int, bool, float], timeout: float) -> bool:
        """Send a control message behind every exchange submitted so far."""
        self._push_outbox(timeout)
        channel = self._channel
        return channel.send(message) and channel.wait_sent(timeout)

    def flush(self, timeout: float, sinks: bool = True) -> bool:
        """Wait until every exchange submitted before this call is recorded (and, with
        ``sinks``, exported by every sink)."""
        token = next(self._tokens)
        done = threading.Event()
        answer: list[bool] = []
        with self._lock:
            self._acks[token] = (done, answer)
        try:
            if not self._control((_FLUSH, token, sinks, timeout), timeout):
                return False
            finished = done.wait(timeout)
        finally:
            with self._lock:
                self._acks.pop(token, None)
        return finished and all(answer)

    def shutdown(self, timeout: float) -> bool:
        """Record everything submitted, flush the sinks, stop the process."""
        self._stopping = True
        self._stop_waiting.set()
        if not self._process.is_alive():  # dead, or waiting to be restarted: nothing to flush
            self._channel.close()
            return False
        deadline = time.monotonic() + timeout
        if not self._control((_STOP, 0, True, timeout), timeout):
            self._process.terminate()
        self._stopped.wait(max(0.1, deadline - time.monotonic()))
        self._process.join(max(0.1, deadline - time.monotonic()))
        clean = self._stopped.is_set() and not self._process.is_alive()
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._channel.close()
        return clean

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._results.recv()
            except (EOFError, OSError):
                if self._stopping or self._stopped.is_set():
                    self._ready.set()
                    return
                self._restart()
                if self._stop_waiting.is_set():
                    return
                continue
            if kind == "counters":
                self._processed = payload.pop("processed", self._processed)
                self._child_error = payload.pop("record_error", None)
                self._counters = payload
            elif kind == "export":
                self._export = payload
            elif kind == "ready":
                self._ready.set()
            elif kind == "ack":
                token, ok = payload
                with self._lock:
                    waiter = self._acks.get(token)
                if waiter is not None:
                    waiter[1].append(ok)
                    waiter[0].set()
            elif kind == "stopped":
                self._stopped.set()


def without_bodies(exchange: Exchange) -> Exchange:
    """The exchange with its bodies left out (sizes, hashes when known, first-byte time kept)."""
    request_cut, response_cut = exchange.request_cut, exchange.response_cut
    return dataclasses.replace(
        exchange, request_body=b"", chunks=exchange.chunks[:1] and [(exchange.chunks[0][0], b"")],
        request_cut=BodyCut(exchange.request_size, request_cut.sha256 if request_cut else None),
        response_cut=BodyCut(exchange.response_size,
                             response_cut.sha256 if response_cut else None),
    )


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"


def build_pipeline(
    config: Config, env: Mapping[str, str], extra_sinks: Sequence[Sink] = ()
) -> Pipeline:
    """The processors and sinks of the record: redact → decode → provider → session; then the
    local store (sharing the session tracker's SQLite connection) and, when configured, OTLP."""
    sessions = SessionTracker(config.db_path)
    sinks: list[Sink] = [LocalStore(config.log_dir, sessions, Retention.of(
        config.retention_days, config.retention_max_bytes))]
    exporter = otlp.build_sink(config, env)
    if exporter is not None:
        sinks.append(exporter)
    return Pipeline([*default_processors(), sessions], [*sinks, *extra_sinks],
                    config.record_queue_size)


class _Inbox:
    """The recorder's end of the pipe: complete frames, in order; ``closed`` after EOF."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._fd = connection.fileno()
        self._buffer = bytearray()
        self.closed = False

    def receive(self, timeout: float) -> list[Any]:
        """The frames that arrived within ``timeout`` (all that are complete; maybe none)."""
        if self.closed:
            return []
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not ready:
            return []
        data = os.read(self._fd, _PIPE_SIZE)  # EINTR is retried by Python itself (PEP 475)
        if not data:
            self.closed = True
            return []
        self._buffer += data
        return list(unframe(self._buffer))


def recorder_main(config: Config, env: dict[str, str], inbox: Connection,
                  results: Connection) -> None:
    """The recorder process: read exchanges in groups and run them through the pipeline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.umask(0o077)  # everything this process creates is the record: owner-only
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logging()
    with contextlib.suppress(OSError):
        os.nice(RECORDER_NICE)
    pipeline = build_pipeline(config, env)
    sinks = pipeline.sinks
    source = _Inbox(inbox)
    processed = 0
    last_report = 0.0
    last_export: dict[str, str | None] = {}

    def report(force: bool = False) -> None:
        nonlocal last_report, last_export
        now = time.monotonic()
        if force or now - last_report >= _COUNTER_INTERVAL:
            last_report = now
            results.send(("counters", {**pipeline.counters(), "processed": processed,
                                       "record_error": pipeline.record_error()}))
            export = pipeline.export_status()
            if export != last_export:
                last_export = export
                results.send(("export", export))

    def record(batch: list[object]) -> None:
        nonlocal processed
        for start in range(0, len(batch), _MAX_BATCH):
            pipeline.handle_segment(batch[start:start + _MAX_BATCH])
        processed += len(batch)

    report(force=True)  # before "ready": the proxy knows the export's state once started
    results.send(("ready", None))
    batch: list[object] = []
    first_at = 0.0
    while True:
        wait = first_at + LINGER - time.monotonic() if batch else _IDLE_WAIT
        items = source.receive(wait)
        if not items and not batch:
            if source.closed:  # the proxy is gone: finish up and leave
                items = [(_STOP, 0, True, 10.0)]
            else:
                pipeline.tick()
                report()
                continue
        if not batch and items:
            first_at = time.monotonic()
        for item in items:
            if isinstance(item, list):
                batch.extend(item)
                continue
            record(batch)
            batch = []
            kind, token, with_sinks, timeout = item
            if kind == _FLUSH:
                ok = all(sink.flush(timeout) for sink in sinks) if with_sinks else True
                report(force=True)
                results.send(("ack", (token, ok)))
            elif kind == _STOP:
                ok = pipeline.close(timeout)
                report(force=True)
                results.send(("stopped", ok))
                results.close()
                return
        if batch and (len(batch) >= _MAX_BATCH or source.closed
                      or time.monotonic() - first_at >= LINGER):
            record(batch)
            batch = []
            report()
