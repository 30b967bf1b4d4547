"""The pipeline: exchanges in, processors in a list, sinks out — all off the request path.

    [exchanges] ──► handle_batch() ──► processors ──► sink.submit()   (local store: inline;
                                                                       OTLP: encodes inline,
                                                                       sends on its threads)

In the proxy the pipeline runs inside the recorder process (``otelproxy.recorder_process``),
which feeds it batches; as a ``Worker`` it can also run in-process on its own thread (tests,
embedding).

``Pipeline.submit`` never blocks: when the queue is full the exchange is dropped and counted
(loudly). A processor or sink that raises is logged once per kind of failure and counted; it
never reaches the proxy (mitmproxy's ``safecall``). ``flush``/``shutdown`` take a timeout, as the
OpenTelemetry SDK's batch processors do.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

from otelproxy.record import Exchange, Record

log = logging.getLogger("otelproxy.pipeline")

EXPORT_OFF: dict[str, str | None] = {"export_status": "off", "export_last_error": None}


TYPE_CHECKING = False
if TYPE_CHECKING:  # types for the checker alone: the recorder process does not import typing
    from typing import Protocol

    class Processor(Protocol):
        """Derives something from a record, in place. Runs on the pipeline thread, in list
        order."""

        name: str

        def __call__(self, record: Record) -> None: ...

    class Sink(Protocol):
        """Writes finished records somewhere. ``submit`` must not block and must not raise."""

        name: str

        def submit(self, record: Record) -> None: ...

        def flush(self, timeout: float) -> bool: ...

        def shutdown(self, timeout: float) -> bool: ...

        def counters(self) -> dict[str, int]: ...


@dataclass
class Failures:
    """Counts failures and logs the first of each kind (then every 1000th)."""

    counts: dict[str, int] = field(default_factory=dict)
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, where: str, exc: BaseException) -> None:
        key = f"{where}: {type(exc).__name__}"
        with self._lock:
            self.total += 1
            seen = self.counts.get(key, 0)
            self.counts[key] = seen + 1
        if seen % 1000 == 0:
            log.error("%s failed (%d so far): %s", where, seen + 1, exc, exc_info=seen == 0)


_STOP = object()


class Worker:
    """A bounded queue drained by one daemon thread; the base of the pipeline and of sinks."""

    max_batch = 256
    """At most this many queued items are handed to ``handle_batch`` at once."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name=f"otelproxy-{name}", daemon=True)
        self._started = False
        self.dropped = 0
        self.failures = Failures()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def put(self, item: object) -> bool:
        """Enqueue without blocking; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.error("%s queue full: %d item(s) dropped so far", self.name, self.dropped)
            return False
        return True

    def handle(self, item: object) -> None:
        raise NotImplementedError

    def handle_batch(self, items: list[object]) -> None:
        """Handle items taken from the queue together (a sink may write them in one go)."""
        for item in items:
            try:
                self.handle(item)
            except Exception as exc:
                self.failures.record(self.name, exc)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            segment: list[object] = []
            for item in items:
                if item is _STOP or isinstance(item, threading.Event):
                    self.handle_segment(segment)
                    segment = []
                    if item is _STOP:
                        stop = True
                    else:
                        assert isinstance(item, threading.Event)
                        item.set()
                else:
                    segment.append(item)
            self.handle_segment(segment)
            for _ in items:
                self._queue.task_done()
            if stop:
                return

    def handle_segment(self, segment: list[object]) -> None:
        """``handle_batch`` for a run of items, failures counted instead of raised."""
        if not segment:
            return
        try:
            self.handle_batch(segment)
        except Exception as exc:
            self.failures.record(self.name, exc)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before this call is handled."""
        if not self._started or not self._thread.is_alive():
            return self._queue.unfinished_tasks == 0
        marker = threading.Event()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(marker, timeout=max(0.0, deadline - time.monotonic()))
                break
            except queue.Full:
                return False
        return marker.wait(max(0.0, deadline - time.monotonic()))

    def shutdown(self, timeout: float) -> bool:
        done = self.flush(timeout)
        if self._started and self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
            except queue.Full:
                return False
            self._thread.join(timeout)
        return done

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def backlog(self) -> float:
        """How full the queue is (past 1, exchanges are dropped)."""
        return self._queue.qsize() / max(1, self._queue.maxsize)


class Pipeline(Worker):
    """Runs the processors over each finished exchange, then hands the record to every sink."""

    def __init__(
        self, processors: Sequence[Processor], sinks: Sequence[Sink], maxsize: int = 10_000
    ) -> None:
        super().__init__("pipeline", maxsize)
        self.processors = list(processors)
        self.sinks = list(sinks)
        self.submitted = 0

    def submit(self, exchange: Exchange) -> None:
        self.submitted += 1
        self.put(exchange)

    def hand_over(self, exchange: Exchange) -> None:
        """In the proxy's own process the exchange keeps its request body: nothing to gain."""

    def handle_batch(self, items: list[object]) -> None:
        """Sinks with a ``batch()`` context (the local store: one transaction, whose session
        state the session processor writes) wrap the whole batch."""
        with ExitStack() as stack:
            for sink in self.sinks:
                batch = getattr(sink, "batch", None)
                if batch is not None:
                    stack.enter_context(batch())
            super().handle_batch(items)

    def handle(self, item: object) -> None:
        assert isinstance(item, Exchange)
        record = Record(item)
        for processor in self.processors:
            try:
                processor(record)
            except Exception as exc:
                self.failures.record(f"processor {processor.name}", exc)
                record.notes.append(f"processor {processor.name} failed: {type(exc).__name__}")
        for sink in self.sinks:
            try:
                sink.submit(record)
            except Exception as exc:
                self.failures.record(f"sink {sink.name}", exc)

    def flush(self, timeout: float, sinks: bool = True) -> bool:
        """Wait until everything submitted is processed (and, with ``sinks``, every sink has
        flushed)."""
        deadline = time.monotonic() + timeout
        done = Worker.flush(self, timeout)
        if sinks:
            for sink in self.sinks:
                done = sink.flush(max(0.0, deadline - time.monotonic())) and done
        return done

    def close(self, timeout: float) -> bool:
        """Shut every sink down, then close processors that hold resources (the session DB)."""
        deadline = time.monotonic() + timeout
        done = True
        for sink in self.sinks:
            done = sink.shutdown(max(0.1, deadline - time.monotonic())) and done
        for processor in self.processors:
            close = getattr(processor, "close", None)
            if close is not None:
                close()
        return done

    def shutdown(self, timeout: float) -> bool:
        """Process what is queued, stop the thread, then ``close``."""
        deadline = time.monotonic() + timeout
        done = Worker.shutdown(self, timeout)
        return self.close(max(0.1, deadline - time.monotonic())) and done

    def export_status(self) -> dict[str, str | None]:
        """The OTLP export's health (``OtlpSink.export_status``); ``off`` without export."""
        for sink in self.sinks:
            status = getattr(sink, "export_status", None)
            if status is not None:
                result: dict[str, str | None] = status()
                return result
        return dict(EXPORT_OFF)

    def tick(self) -> None:
        """While idle: let sinks that watch something (the local store's log dir) look."""
        for sink in self.sinks:
            tick = getattr(sink, "tick", None)
            if tick is not None:
                try:
                    tick()
                except Exception as exc:
                    self.failures.record(f"sink {sink.name}", exc)

    def release_memory(self) -> None:
        """While idle: processors and sinks that cache what they can read again (the session
        tracker: SQLite's page cache) let it go."""
        parts: list[Processor | Sink] = [*self.processors, *self.sinks]
        for part in parts:
            release = getattr(part, "release_memory", None)
            if release is not None:
                try:
                    release()
                except Exception as exc:
                    self.failures.record(part.name, exc)

    def record_error(self) -> str | None:
        """Why the local record is not being written now (None while it is)."""
        for sink in self.sinks:
            error = getattr(sink, "record_error", None)
            if isinstance(error, str):
                return error
        return None

    def counters(self) -> dict[str, int]:
        out = {"records_dropped": self.dropped, "sink_errors": self.failures.total}
        for sink in self.sinks:
            for key, value in sink.counters().items():
                out[key] = out.get(key, 0) + value
        return out
