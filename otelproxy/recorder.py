"""The recorder: the pipeline (processors and sinks) in a process of its own.

    proxy process                                 recorder process
    ─────────────                                 ────────────────
    handler ──submit()──► [bounded queue] ───────► batch ─► processors ─► local store (JSONL+SQLite)
                                                                      └─► OTLP sink (own thread)
    reader thread ◄──────── counters, acks ◄──────┘

Everything the record costs — parsing, redaction, hashing, JSON encoding, SQLite, protobuf —
runs in the recorder process, so it neither holds the proxy's GIL nor takes its event loop's
time: the proxy only pickles the finished ``Exchange`` onto a queue (``multiprocessing``'s
feeder thread does the pickling and the pipe write). ``submit`` never blocks: when the queue is
full the exchange is dropped and counted. The recorder ignores SIGINT/SIGTERM (the proxy stops it
after the streams in flight have finished, so their exchanges are recorded too) and exits on its
own, after flushing, if the proxy process disappears.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from otelproxy import otlp
from otelproxy.config import Config
from otelproxy.pipeline import Pipeline, Sink
from otelproxy.processors import default_processors
from otelproxy.record import Exchange
from otelproxy.sessions import SessionTracker
from otelproxy.store import LocalStore

log = logging.getLogger("otelproxy.recorder")

_FLUSH = "flush"
_STOP = "stop"
_MAX_BATCH = 256
_COUNTER_INTERVAL = 0.1


class Recorder:
    """The proxy's handle on the recorder process; the interface the handler and /healthz use."""

    def __init__(self, config: Config, env: dict[str, str] | None = None) -> None:
        self.config = config
        self._env = dict(os.environ if env is None else env)
        otlp.resolve(config, self._env)  # a bad OTLP setting fails here, as a ConfigError
        self._context = multiprocessing.get_context("spawn")
        self._queue: Any = self._context.Queue(config.record_queue_size)
        self._results, self._child_end, self._process = self._make_process()
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
        self.submitted = 0
        self.dropped = 0
        self._drop_logs = 0
        self._outbox: list[Exchange] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._processed = 0

    def _make_process(self) -> tuple[Connection, Connection, Any]:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=recorder_main, args=(self.config, self._env, self._queue, send),
            name="otelproxy-recorder",
            # A daemonic process may not have children; then shutdown() must stop it.
            daemon=not multiprocessing.current_process().daemon,
        )
        return receive, send, process

    def _restart(self) -> None:
        """The recorder died (killed, out of memory): start another so recording goes on.

        The exchanges still on the old queue are lost with it, and counted as dropped: a
        process killed while it held the queue's reader lock leaves the queue unusable, so the
        new recorder gets a new queue."""
        self._process.join(5)
        self.restarts += 1
        for key, value in self._counters.items():
            self._earlier[key] = self._earlier.get(key, 0) + value
        self._earlier["processed"] = self._earlier.get("processed", 0) + self._processed
        self._counters, self._processed = {}, 0
        lost = self.pending
        self.dropped += lost
        log.error("the recorder process exited (status %s) with %d exchange(s) unrecorded; "
                  "starting a new one (restart %d)", self._process.exitcode, lost, self.restarts)
        old, self._queue = self._queue, self._context.Queue(self.config.record_queue_size)
        old.cancel_join_thread()
        old.close()
        self._results, self._child_end, self._process = self._make_process()
        self._process.start()
        self._child_end.close()

    def start(self, timeout: float = 60.0) -> None:
        """Start the recorder process and wait until it has opened the record."""
        self._process.start()
        self._child_end.close()
        self._reader.start()
        if not self._ready.wait(timeout) or not self._process.is_alive():
            raise RuntimeError("the recorder process did not start (see its error above)")

    # -- used on the proxy's event loop: must never block -------------------------------------

    def submit(self, exchange: Exchange) -> None:
        """Queue a finished exchange. On an event loop, the exchanges finished in one loop
        iteration go onto the queue together (one pickle, one pipe write)."""
        self.submitted += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._put([exchange])
            return
        self._loop = loop
        self._outbox.append(exchange)
        if len(self._outbox) == 1:
            loop.call_soon(self._put_outbox)

    def _put_outbox(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._put(batch)

    def _push_outbox(self, timeout: float) -> None:
        """From another thread: make sure exchanges submitted so far are on the queue."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._put_outbox()
                return
        except RuntimeError:
            pass
        pushed = threading.Event()

        def push() -> None:
            self._put_outbox()
            pushed.set()

        try:
            loop.call_soon_threadsafe(push)
        except RuntimeError:  # the loop closed meanwhile
            return
        pushed.wait(timeout)

    def _put(self, batch: list[Exchange]) -> None:
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.dropped += len(batch)
            if self._drop_logs == 0 or self._drop_logs % 100 == 0:
                log.error("record queue full: %d exchange(s) dropped so far", self.dropped)
            self._drop_logs += 1

    @property
    def pending(self) -> int:
        processed = self._processed + self._earlier.get("processed", 0)
        return max(0, self.submitted - self.dropped - processed)

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        for key, value in self._earlier.items():
            if key != "processed":
                out[key] = out.get(key, 0) + value
        out["records_dropped"] = out.get("records_dropped", 0) + self.dropped
        out["recorder_restarts"] = self.restarts
        # A recorder that died counts as a sink error: /healthz turns "degraded".
        out["sink_errors"] = out.get("sink_errors", 0) + self.restarts
        if not self._process.is_alive() and not self._stopped.is_set():
            out["sink_errors"] += 1
        return out

    # -- blocking calls, for shutdown and tests ------------------------------------------------

    def flush(self, timeout: float, sinks: bool = True) -> bool:
        """Wait until every exchange submitted before this call is recorded (and, with
        ``sinks``, exported by every sink)."""
        token = next(self._tokens)
        done = threading.Event()
        answer: list[bool] = []
        with self._lock:
            self._acks[token] = (done, answer)
        self._push_outbox(timeout)
        try:
            self._queue.put((_FLUSH, token, sinks, timeout), timeout=timeout)
        except queue.Full:
            return False
        finished = done.wait(timeout)
        with self._lock:
            self._acks.pop(token, None)
        return finished and all(answer)

    def shutdown(self, timeout: float) -> bool:
        """Record everything submitted, flush the sinks, stop the process."""
        self._stopping = True
        if not self._process.is_alive():
            return False
        deadline = time.monotonic() + timeout
        self._push_outbox(timeout)
        try:
            self._queue.put((_STOP, 0, True, timeout), timeout=timeout)
        except queue.Full:
            self._process.terminate()
            return False
        self._stopped.wait(max(0.1, deadline - time.monotonic()))
        self._process.join(max(0.1, deadline - time.monotonic()))
        clean = self._stopped.is_set() and not self._process.is_alive()
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._queue.close()
        return clean

    def _read(self) -> None:
        while True:
            try:
                kind, payload = self._results.recv()
            except (EOFError, OSError):
                if self._stopping or self._stopped.is_set() or not self._ready.is_set():
                    self._ready.set()
                    return
                self._restart()
                continue
            if kind == "counters":
                self._processed = payload.pop("processed", self._processed)
                self._counters = payload
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


def build_pipeline(
    config: Config, env: Mapping[str, str], extra_sinks: Sequence[Sink] = ()
) -> Pipeline:
    """The processors and sinks of the record: redact → decode → provider → session; then the
    local store (sharing the session tracker's SQLite connection) and, when configured, OTLP."""
    sessions = SessionTracker(config.db_path)
    sinks: list[Sink] = [LocalStore(config.log_dir, sessions.db)]
    exporter = otlp.build_sink(config, env)
    if exporter is not None:
        sinks.append(exporter)
    return Pipeline([*default_processors(), sessions], [*sinks, *extra_sinks],
                    config.record_queue_size)


def recorder_main(config: Config, env: dict[str, str], inbox: Any, results: Connection) -> None:
    """The recorder process: drain the queue in batches through the pipeline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    pipeline = build_pipeline(config, env)
    sinks = pipeline.sinks
    processed = 0
    last_report = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_report
        now = time.monotonic()
        if force or now - last_report >= _COUNTER_INTERVAL:
            last_report = now
            results.send(("counters", {**pipeline.counters(), "processed": processed}))

    results.send(("ready", None))
    report(force=True)
    while True:
        try:
            first = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the proxy is gone: finish up and leave
                first = (_STOP, 0, True, 10.0)
            else:
                report()
                continue
        items = [first]
        while len(items) < _MAX_BATCH:
            try:
                items.append(inbox.get_nowait())
            except queue.Empty:
                break
        batch: list[object] = []
        for item in items:
            if isinstance(item, list):
                batch.extend(item)
                continue
            pipeline.handle_segment(batch)
            processed += len(batch)
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
        pipeline.handle_segment(batch)
        processed += len(batch)
        report()
