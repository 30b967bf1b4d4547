"""OTLP export: the sink that turns each record into telemetry (``mapping.encode``) and sends it
in batches over OTLP/HTTP protobuf.

The local JSONL + SQLite record is the complete copy; this sink is the live, searchable view.
It is built *after* the exchange, from the finished ``Record``, inside the recorder process
(``otelproxy.recorder``), never in the proxy's process. ``submit`` encodes on the caller's
thread, the recorder's own (a fraction of a millisecond: ``otelproxy.otlp.mapping``,
``otelproxy.otlp.wire``); only the sending has threads of its own:

    pipeline ──submit()──► span(s) + 2 log records, encoded ──► one exporter thread per signal:
                                                                bounded queue, batched
                                                   OTLP/HTTP protobuf ──► Seq /ingest/otlp/v1/…

(An OTLP worker thread of its own, which encoded each record handed to it, cost about as much
again as the encoding: a thread wake-up and GIL hand-off per exchange; see
``benchmarks/export_profile.py``.)

The exporters follow the SDK's batch processor and OTLP/HTTP exporter; the SDK gives the
resource (``Resource.create``: ``OTEL_RESOURCE_ATTRIBUTES``, ``telemetry.sdk.*``).

Never in the way. ``submit`` never blocks and never raises (an exchange that cannot be encoded
is counted, ``otlp_errors``). Each signal's exporter has a bounded queue of encoded items;
before queueing, the sink checks that both have room and otherwise drops the exchange and
counts it, so nothing is evicted silently. A batch leaves
when ``max_export_batch_size`` items wait, ``schedule_delay`` after the first, on flush and at
shutdown; a POST is retried on 429/502/503/504 and connection errors with exponential backoff
(``Retry-After`` honoured) until the export timeout. Failed exports (Seq down, slow, 5xx) are
counted. Counters appear on ``/healthz`` (``otlp_*``), and so does the export's health
(``export_status``: ``failing`` from the moment an attempt fails or has waited ``SLOW_EXPORT_S``
for an answer, until one goes through; ``export_last_error``); losses are reported as one WARN
line at most once a minute (with the last error). ``flush`` is bounded by its timeout;
``shutdown`` by ``--otlp-shutdown-timeout`` too, and what it abandons is counted as not
exported and reported in one line.

The POSTs go out on one kept-alive ``http.client`` connection per signal
(``otelproxy.otlp.transport``). This module (and the SDK's resources) is imported only when
export is configured (``otelproxy.otlp.build_sink``).
"""

from __future__ import annotations

import errno
import gzip
import math
import random
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Final

from opentelemetry.sdk.resources import Resource

from otelproxy import __version__
from otelproxy.otlp import wire
from otelproxy.otlp.mapping import encode
from otelproxy.otlp.settings import SIGNALS, BatchSettings, ExportSettings, TlsFiles, log, safe_url
from otelproxy.otlp.transport import ConnectFailed, Endpoint
from otelproxy.pipeline import Failures
from otelproxy.record import Record

WARN_INTERVAL_S: Final = 60.0
SLOW_EXPORT_S: Final = 0.75
"""An export unanswered for this long counts as failing (``export_status``) while it waits."""
RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
EXPORT_ATTEMPTS: Final = 6
"""A batch is sent at most this many times (and never past the export timeout)."""


@dataclass
class _Tally:
    """Telemetry queued for export and not yet through it, per signal; and the losses."""

    capacity: dict[str, int]
    outstanding: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    exported: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    dropped: int = 0
    """Exchanges never queued for export: an exporter's queue was full."""
    closed: bool = False
    """Set at shutdown, when what was still outstanding was counted as failed."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, wanted: Mapping[str, int]) -> bool:
        """Claim room in the exporters' queues for one exchange's telemetry, or count a drop."""
        with self.lock:
            if any(self.outstanding[s] + n > self.capacity[s] for s, n in wanted.items()):
                self.dropped += 1
                return False
            for signal, count in wanted.items():
                self.outstanding[signal] += count
            return True

    def done(self, signal: str, count: int, ok: bool) -> None:
        with self.lock:
            if self.closed:  # counted as failed already (``close``)
                return
            self.outstanding[signal] -= count
            (self.exported if ok else self.failed)[signal] += count

    def close(self) -> dict[str, int]:
        """At shutdown: what is still outstanding failed; later results are ignored. Returns
        the outstanding counts per signal."""
        with self.lock:
            left = dict(self.outstanding)
            for signal, count in left.items():
                self.failed[signal] += count
                self.outstanding[signal] = 0
            self.closed = True
            return left

    def losses(self) -> tuple[int, int]:
        with self.lock:
            return self.dropped, sum(self.failed.values())


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


# getaddrinfo's error codes by number (EAI_AGAIN: the resolver did not answer in time).
_ADDRINFO_ERRORS: Final = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


def _failure(exc: BaseException) -> str:
    """What went wrong, named without any message (a message may quote the endpoint and its
    credentials): the exception's type, then the causes it wraps, with ``getaddrinfo``'s and
    ``OSError``'s error codes by name, e.g. ``gaierror EAI_AGAIN`` for a name lookup that got
    no answer."""
    names: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(names) < 6:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, socket.gaierror):
            name += f" {_ADDRINFO_ERRORS.get(current.errno, current.errno)}"
        elif type(current) is OSError and current.errno:
            name += f" {errno.errorcode.get(current.errno, current.errno)}"
        if not names or names[-1] != name:
            names.append(name)
        current = current.__cause__ or current.__context__
    return ": ".join(names)


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "deflate":
        return zlib.compress(data)
    return data


class _Exporter:
    """One signal's export, in the manner of the SDK's batch processor + OTLP/HTTP exporter,
    for telemetry that is already encoded: a queue (bounded through ``_Tally.reserve``) drained
    by one daemon thread, which sends a batch when ``max_export_batch_size`` items wait, when
    ``schedule_delay`` has passed since the first one arrived, on ``flush`` and on ``stop``.
    A POST is retried on 429/502/503/504 and on connection errors, with exponential backoff
    (``Retry-After`` honoured), until the export timeout; then the batch counts as failed."""

    def __init__(self, signal: str, endpoint: str, headers: Mapping[str, str],
                 batch: BatchSettings, settings: ExportSettings, envelope: wire.Envelope,
                 tally: _Tally, report: Callable[[], None]) -> None:
        self.signal = signal
        self.endpoint = endpoint
        self.last_error: str | None = None
        self._failing = False
        """The last attempt failed (and none has succeeded since)."""
        self._posting_since: float | None = None
        headers = {"Content-Type": "application/x-protobuf", **headers}
        if settings.compression != "none":
            headers["Content-Encoding"] = settings.compression
        self._compression = settings.compression
        # A batch's attempts together: the exporter timeout, cut to the processor's own.
        self._timeout = min(settings.timeout_s, batch.export_timeout_ms / 1000)
        self._batch = batch
        self._envelope = envelope
        self._tally = tally
        self._report = report
        self._endpoint = Endpoint(endpoint, headers, settings.tls.get(signal, TlsFiles()))
        self._items: deque[bytes] = deque()
        self._sending = 0
        self._flushing = False
        self._stopping = False
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"otelproxy-otlp-{signal}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, items: Sequence[bytes]) -> None:
        """Queue encoded items (their room was reserved in the tally)."""
        with self._cond:
            was_empty = not self._items
            self._items.extend(items)
            if was_empty or len(self._items) >= self._batch.max_export_batch_size:
                self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Send everything queued now; True once it is through (exported or failed)."""
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._items and not self._sending,
                                       max(0.0, timeout))

    def stop(self, timeout: float) -> bool:
        """Send what is queued and stop within ``timeout``; past it, abandon what is left."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self.abort()  # wakes a retry's backoff; a POST under way is left to its timeout
            self._thread.join(0.1)
        return not self._thread.is_alive()  # the thread closes its connection as it ends

    def trouble(self) -> str | None:
        """What is wrong with this export right now: the last attempt failed, or the one under
        way has had no answer for ``SLOW_EXPORT_S``; None when it works."""
        since = self._posting_since
        if since is not None and (waited := time.monotonic() - since) >= SLOW_EXPORT_S:
            return f"no answer for {waited:.1f} s"
        return self.last_error if self._failing else None

    def abort(self) -> None:
        """Stop now: a retry waiting for its backoff gives up, queued items count as failed."""
        self._abort.set()
        with self._cond:
            self._cond.notify_all()

    def _next_batch(self) -> list[bytes] | None:
        """The next batch to send, once one is due; None once stopped (or aborted) and empty."""
        size = self._batch.max_export_batch_size
        delay = self._batch.schedule_delay_ms / 1000
        due = time.monotonic() + delay
        with self._cond:
            while not self._abort.is_set():
                waiting = len(self._items)
                now = time.monotonic()
                if waiting and (waiting >= size or self._flushing or self._stopping
                                or now >= due):
                    self._sending = min(size, waiting)
                    return [self._items.popleft() for _ in range(self._sending)]
                if waiting:
                    self._cond.wait(due - now)
                    continue
                if self._stopping:
                    return None
                if self._flushing:
                    self._flushing = False
                    self._cond.notify_all()
                self._cond.wait()
                due = time.monotonic() + delay
            return None

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            ok = self._send(self._envelope.request(batch))
            self._tally.done(self.signal, len(batch), ok)
            with self._cond:
                self._sending = 0
                self._cond.notify_all()
            if not ok:
                self._report()
        with self._cond:  # aborted: what is left will not be sent
            left = len(self._items)
            self._items.clear()
            self._cond.notify_all()
        if left:
            self._tally.done(self.signal, left, False)
        self._endpoint.close()

    def _send(self, body: bytes) -> bool:
        try:
            data = _compress(body, self._compression)
            deadline = time.monotonic() + self._timeout
            for attempt in range(EXPORT_ATTEMPTS):
                problem, retryable, backoff = self._post(data, deadline)
                self._failing = problem is not None
                if problem is None:
                    return True
                self.last_error = problem
                if backoff is None:
                    backoff = 2 ** attempt * random.uniform(0.8, 1.2)
                if (not retryable or attempt + 1 == EXPORT_ATTEMPTS
                        or backoff > deadline - time.monotonic() or self._abort.wait(backoff)):
                    return False
        except Exception as exc:  # never let the exporter thread die
            # The type only: a message may quote the endpoint, credentials and all, and this
            # goes to the log and to /healthz.
            self.last_error = f"export failed ({type(exc).__name__})"
            self._failing = True
        return False

    def _post(self, data: bytes, deadline: float) -> tuple[str | None, bool, float | None]:
        """One POST: (problem or None, worth retrying, the server's Retry-After)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timed out", False, None
        self._posting_since = time.monotonic()
        try:
            answer = self._endpoint.post(data, remaining)
        except ConnectFailed as exc:  # DNS, refused, connect timeout, TLS, reset
            return f"connection failed ({_failure(exc.__cause__ or exc)})", True, None
        except TimeoutError as exc:  # no answer in time
            return _failure(exc), False, None
        finally:
            self._posting_since = None
        status = answer.status
        if 200 <= status < 300:
            return None, False, None
        return f"HTTP {status}", status in RETRYABLE_STATUSES, _retry_after(answer.retry_after)


class OtlpSink:
    """Sink turning each record into a span (two with the upstream call) and two log records,
    encoded on the thread that submits it and exported in batches by one thread per signal."""

    name = "otlp"

    def __init__(self, settings: ExportSettings) -> None:
        self.settings = settings
        self.failures = Failures()
        self._started = False
        self._tally = _Tally({"traces": settings.spans.max_queue_size,
                              "logs": settings.logs.max_queue_size})
        self._warn_lock = threading.Lock()
        self._last_warn = -WARN_INTERVAL_S
        self._warned_losses = 0
        envelope = wire.Envelope(Resource.create(dict(settings.resource)).attributes,
                                 "otelproxy", __version__)
        self._exporters: dict[str, _Exporter] = {}
        for signal, endpoint, headers, batch in (
                ("traces", settings.traces_endpoint, settings.traces_headers, settings.spans),
                ("logs", settings.logs_endpoint, settings.logs_headers, settings.logs)):
            if endpoint:
                self._exporters[signal] = _Exporter(signal, endpoint, headers, batch, settings,
                                                    envelope, self._tally, self._report_losses)

    def start(self) -> None:
        if not self._started:
            self._started = True
            for exporter in self._exporters.values():
                exporter.start()

    # -- Sink protocol ---------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Encode one exchange and queue it for export; when an exporter's queue is full, the
        exchange is dropped (counted, reported). Never raises: a failure is counted."""
        try:
            spans, logs = encode(record, self.settings)  # before claiming queue room
        except Exception as exc:
            self.failures.record(self.name, exc)
            return
        wanted = {signal: len(spans if signal == "traces" else logs)
                  for signal in self._exporters}
        if not self._tally.reserve(wanted):
            self._report_losses()
            return
        for signal, exporter in self._exporters.items():
            exporter.add(spans if signal == "traces" else logs)

    def counters(self) -> dict[str, int]:
        tally = self._tally
        with tally.lock:
            return {
                "otlp_exported_spans": tally.exported["traces"],
                "otlp_exported_logs": tally.exported["logs"],
                "otlp_export_failed": sum(tally.failed.values()),
                "otlp_dropped": tally.dropped,
                "otlp_pending": sum(tally.outstanding.values()),
                "otlp_errors": self.failures.total,
            }

    def export_status(self) -> dict[str, str | None]:
        """``export_status`` (``ok`` or ``failing``) and ``export_last_error`` (the trouble of
        a failing export, else the last error seen, if any) for ``/healthz``."""
        exporters = self._exporters.values()
        trouble = next((t for e in exporters if (t := e.trouble()) is not None), None)
        last = trouble or next((e.last_error for e in exporters if e.last_error), None)
        return {"export_status": "ok" if trouble is None else "failing",
                "export_last_error": last}

    def flush(self, timeout: float) -> bool:
        """Let the exporters send everything queued, within ``timeout``."""
        deadline = time.monotonic() + timeout
        done = True
        for exporter in self._exporters.values():
            done = exporter.flush(deadline - time.monotonic()) and done
        return done

    def shutdown(self, timeout: float) -> bool:
        """Flush within ``timeout`` or the settings' ``shutdown_timeout_s``, whichever is
        shorter, then stop the exporters: what is left (a slow or unreachable backend) is
        abandoned, counted as not exported and reported in one line."""
        started = time.monotonic()
        budget = min(timeout, self.settings.shutdown_timeout_s)
        deadline = started + budget
        done = self.flush(budget)
        if not done:
            for exporter in self._exporters.values():
                exporter.abort()
        for exporter in self._exporters.values():
            done = exporter.stop(max(0.0, deadline - time.monotonic())) and done
        left = self._tally.close()
        dropped, failed = self._tally.losses()
        if any(left.values()):
            errors = sorted({e.last_error for e in self._exporters.values() if e.last_error})
            log.warning("OTLP export stopped after %.1f s (shutdown budget %g s) with %d "
                        "span(s) and %d log record(s) unsent; in all %d exchange(s) dropped "
                        "and %d span(s)/log record(s) not exported%s",
                        time.monotonic() - started, budget, left.get("traces", 0),
                        left.get("logs", 0), dropped, failed,
                        f" (last error: {', '.join(errors)})" if errors else "")
        elif dropped or failed:
            log.warning("OTLP export stopped: %d exchange(s) dropped, %d span(s)/log record(s) "
                        "not exported", dropped, failed)
        return done

    def _report_losses(self) -> None:
        """One WARN line at most once a minute while telemetry is being lost."""
        dropped, failed = self._tally.losses()
        now = time.monotonic()
        with self._warn_lock:
            if dropped + failed == self._warned_losses or now - self._last_warn < WARN_INTERVAL_S:
                return
            self._warned_losses = dropped + failed
            self._last_warn = now
        errors = sorted({e.last_error for e in self._exporters.values() if e.last_error})
        log.warning("OTLP export to %s is losing telemetry: %d exchange(s) dropped (queue full), "
                    "%d span(s)/log record(s) failed to export so far%s (the local record is "
                    "complete)", safe_url(self.settings.logs_endpoint
                                           or self.settings.traces_endpoint), dropped, failed,
                    f" (last error: {', '.join(errors)})" if errors else "")
