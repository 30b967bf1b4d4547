"""The recorder process: ``python -m otelproxy.recorder_process INBOX_FD RESULTS_FD``.

Started by the proxy's ``otelproxy.recorder.Recorder`` with two pipe ends (``otelproxy.channel``
says what travels on them). It reads the configuration (``Start``) first, builds the pipeline
(processors, the local store and, when configured, the OTLP sink), then records what arrives in
batches: it waits up to ``LINGER`` seconds for a batch to fill and commits up to ``_MAX_BATCH``
exchanges, holding up to about ``_MAX_BATCH_BYTES`` of bodies, in one transaction. It reports
its progress (``Progress``) after each batch and while idle, answers ``Flush`` and ``Stop``,
and when its inbox ends (the proxy stopped or died) it records what it has, shuts the sinks
down and exits.

It runs under ``SCHED_IDLE`` (else ``RECORDER_NICE``): serving requests comes first, the record
catches up in the gaps. It ignores SIGINT/SIGTERM: the proxy stops it after the streams in
flight have finished, so their exchanges are recorded too.

It imports only what recording needs: not asyncio, not aiohttp (the proxy's modules), and the
OTLP package only when the proxy says export is on (``Start.export``; ``requests`` and the
OpenTelemetry SDK load when its sink is built). Nor ``typing`` (half a MiB resident): the
modules it runs import it for the type checker alone (``TYPE_CHECKING = False``, which type
checkers read as true).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from otelproxy.channel import (
    Begun,
    Exchanges,
    Flush,
    Flushed,
    Message,
    Progress,
    Ready,
    RecorderEnd,
    Start,
    Stop,
    Stopped,
)
from otelproxy.config import Config
from otelproxy.memory import release_free_heap
from otelproxy.record import BodyCut, Outcome

TYPE_CHECKING = False
if TYPE_CHECKING:
    from otelproxy.compact import Handed
    from otelproxy.pipeline import Pipeline, Sink
    from otelproxy.record import Exchange

_MAX_BATCH = 256
"""At most this many exchanges are recorded in one transaction."""
_MAX_BATCH_BYTES = 1024 * 1024
"""A batch is recorded once its exchanges hold this many bytes of bodies. Until its commit the
recorder holds a batch's exchanges, and their JSONL lines twice more (staged, and in the
journal). The 500 exchanges of the benchmark's 500-stream round (47 KB each), recorded 256 at
a time, took the pipeline's resident set up by 27 MiB; 5 at a time (a 256 KiB cap), by 0.7
MiB (README, "Memory per stream"). Each batch is one SQLite transaction (no fsync: WAL,
``synchronous = NORMAL``), and at the Claude Code pace a 256 KiB batch held 3 to 4 exchanges:
its ``BEGIN`` and ``COMMIT`` were the recorder's largest single cost (a profile of the Claude
Code phase, 2026-12-08 00:42 UTC). With 1 MiB the recorder took 1.79-2.13 ms of CPU per
exchange against 2.00-2.38 (``python -m benchmarks.recorder_pace``, six alternating rounds
each, 01:00 UTC), and a burst of 500 exchanges took its resident set up by 6.0 MiB instead of
2.7 (``python -m benchmarks.recorder_burst``, three rounds each, twice)."""
LINGER = 0.25
"""Seconds the recorder waits for more exchanges before it records a partial batch (it reads
the pipe as messages come all the while, so the proxy never buffers for it). Recording in fewer,
larger batches is cheaper on a CPU shared with the proxy: each batch starts with caches the
proxy has cooled. A recorder given Claude-Code-shaped exchanges at the benchmark's pace (one
every 22 ms, 240 of them: ``python -m benchmarks.recorder_pace``) used 2.25 to 2.46 ms of CPU
per exchange at 0.25 s against 2.67 to 3.08 at 0.02 s (three rounds each, alternating); the
same exchanges given at once take about 1.6. At that pace a batch of handed-over exchanges
(21 KB of answer each) closed on a 256 KiB ``_MAX_BATCH_BYTES`` after about 0.28 s, so a longer
wait would only delay the record at low rates."""
RECORDER_NICE = 5
"""Added to the recorder's nice value where ``SCHED_IDLE`` is refused: under CPU contention
the proxy's loop runs first."""
COUNTER_INTERVAL = 0.1
"""An idle recorder's reports (its counters and the export's health) come at most this often;
each recorded batch is reported at once."""
IDLE_WAIT = 0.25
"""An idle recorder looks at its sinks (``Pipeline.tick``) this often and reports its counters
and the export's health when they changed."""
TRIM_INTERVAL = 1.0
"""An idle recorder returns freed heap to the system at most this often (``otelproxy.memory``),
and only when it has recorded something since; SQLite's page cache goes first
(``Pipeline.release_memory``)."""


def build_pipeline(
    config: Config, env: Mapping[str, str], extra_sinks: Sequence[Sink] = (),
    export: bool = True,
) -> Pipeline:
    """The processors and sinks of the record: redact → decode → provider → session; then the
    local store (sharing the session tracker's SQLite connection) and, when configured, OTLP.
    ``export=False``: the caller knows that export is off, so ``otelproxy.otlp`` is not even
    imported."""
    from otelproxy.pipeline import Pipeline
    from otelproxy.processors import default_processors
    from otelproxy.retention import Retention
    from otelproxy.sessions import SessionTracker
    from otelproxy.store import LocalStore

    sessions = SessionTracker(config.db_path)
    sinks: list[Sink] = [LocalStore(config.log_dir, sessions, Retention.of(
        config.retention_days, config.retention_max_bytes))]
    if export:
        from otelproxy import otlp  # build_sink loads requests and the SDK only to export

        exporter = otlp.build_sink(config, env)
        if exporter is not None:
            sinks.append(exporter)
    return Pipeline([*default_processors(), sessions], [*sinks, *extra_sinks],
                    config.record_queue_size)


_STOP_MARGIN = 0.5
"""Seconds of a ``Stop`` deadline kept back from the sinks, for answering and exiting."""


def lower_priority() -> None:
    """``SCHED_IDLE``: from now on the recorder runs only when its CPU has nothing else to run
    (irreversible for an unprivileged process). Where refused, a nice value instead.

    Every thread of the process, not only the calling one: on Linux a scheduling policy and a
    nice value belong to a thread, and the OTLP sink's export threads, started with the
    pipeline before this is called, kept the proxy's own priority (``ps -L``: ``TS``, nice 0).
    Each assembles, compresses and sends a batch of spans or log records at once (after a
    500-stream round, hundreds), as the proxy's equal for its CPU. A thread started later
    inherits the policy of the one that starts it."""
    threads = _thread_ids()
    try:
        for thread in threads:
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or refused (seccomp)
        for thread in threads:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, thread,
                               os.getpriority(os.PRIO_PROCESS, thread) + RECORDER_NICE)


def _thread_ids() -> list[int]:
    """The ids of this process's threads (Linux: ``/proc/self/task``; elsewhere the process,
    which is what ``0`` names to the calls above)."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def recorder_main(inbox: int, results: int) -> int:
    """The recorder process: read exchanges in groups and run them through the pipeline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.umask(0o077)  # everything this process creates is the record: owner-only
    end = RecorderEnd(inbox, results)
    received: list[Message] = []
    while not received and not end.closed:
        received = end.receive(None)
    if not received:
        return 0  # the proxy went away before it sent anything
    start, *received = received
    assert isinstance(start, Start), start
    config = start.config
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from otelproxy.redact import redact_logging

    redact_logging()
    return _record(build_pipeline(config, start.env, export=start.export), end, received)


class Streaming:
    """The exchanges still streaming whose request the proxy handed over (``channel.Begun``):
    their request bodies (``compact.Handed``) and what else the proxy knew then (the request,
    the response head), so that a proxy killed mid-stream still leaves them in the record."""

    def __init__(self) -> None:
        from otelproxy.compact import Handed
        from otelproxy.processors import conversation_key

        self.bodies = Handed()
        self._key = conversation_key
        self._begun: dict[str, Exchange] = {}

    def begin(self, exchange: Exchange) -> None:
        body, exchange.request_body = exchange.request_body, b""
        self.bodies.hold(exchange.id, self._key(exchange, body), body)
        exchange.request_handed = len(body)
        self._begun[exchange.id] = exchange

    def end(self, exchange: Exchange) -> None:
        """Put back the request body of a finished exchange (``request_handed``)."""
        self._begun.pop(exchange.id, None)
        _put_back(exchange, self.bodies)

    def orphans(self) -> list[Exchange]:
        """The exchanges begun and never finished: the proxy process ended (a proxy that stops
        lets its streams finish first). Recorded ``proxy_ended``."""
        out = list(self._begun.values())
        self._begun.clear()
        now = time.monotonic_ns()
        for exchange in out:
            _put_back(exchange, self.bodies)
            exchange.outcome = Outcome.PROXY_ENDED
            exchange.error = "the proxy process ended while the response streamed"
            exchange.finished_ns = now
        return out


def _put_back(exchange: Exchange, handed: Handed) -> None:
    """An exchange whose request body was handed over earlier gets it back; when this recorder
    was not given it (it was restarted since, or the pipe was full), the record keeps the
    body's size alone, as for an exchange sent without its bodies."""
    body = handed.take(exchange.id)
    size = exchange.request_handed
    exchange.request_handed = None
    if body is None:
        if exchange.request_cut is None:
            exchange.request_cut = BodyCut(size or 0)
        return
    exchange.request_body = body
    if exchange.request_cut is not None and exchange.request_cut.size == len(body):
        exchange.request_cut = None  # sent without bodies at the end, but it had come whole


def _record(pipeline: Pipeline, end: RecorderEnd, received: list[Message]) -> int:
    """Record what arrives until ``Stop`` or the end of the inbox."""
    processed = 0
    last_report = 0.0
    sent: Progress | None = None

    def report(force: bool = False) -> None:
        """Send ``Progress``: ``force``, at once; else at most every ``COUNTER_INTERVAL`` and
        only when it says something new (an idle proxy is not woken to read the same counters
        four times a second)."""
        nonlocal last_report, sent
        now = time.monotonic()
        if force or now - last_report >= COUNTER_INTERVAL:
            last_report = now
            progress = Progress(processed, pipeline.counters(), pipeline.record_error(),
                                pipeline.export_status())
            if force or progress != sent:
                end.send(progress)
                sent = progress

    def record(batch: list[Exchange]) -> None:
        """Record a batch and say so at once: a recorder killed between its commit and its
        report leaves that batch counted as dropped though it is in the record (the next
        recorder writes what the journal holds), so the window is kept to one batch."""
        nonlocal processed
        pipeline.handle_segment(list(batch))
        if batch:
            processed += len(batch)
            report(force=True)

    streaming = Streaming()
    report(force=True)  # before Ready: the proxy knows the export's state once started
    end.send(Ready())
    lower_priority()  # only now: starting (imports, opening the record) is not held back
    batch: list[Exchange] = []
    held = 0  # bytes of bodies in ``batch``
    first_at = 0.0
    trimmed = (-1, 0.0)  # (processed, when): the last time freed heap went back to the system
    while True:
        if not received:
            received = end.receive(first_at + LINGER - time.monotonic() if batch else IDLE_WAIT)
        if not received and not batch:
            if not end.closed:
                pipeline.tick()
                report()
                if trimmed[0] != processed and time.monotonic() - trimmed[1] >= TRIM_INTERVAL:
                    pipeline.release_memory()  # SQLite's page cache, then the heap freed:
                    release_free_heap()  # idle after recording, what a burst used goes back
                    trimmed = (processed, time.monotonic())
                continue
            received = [Stop(time.monotonic() + 10.0)]  # the proxy is gone: finish, leave
        messages, received = received, []
        for message in messages:
            if isinstance(message, Exchanges):
                for exchange in message.items:
                    if isinstance(exchange, Begun):
                        streaming.begin(exchange.exchange)
                        continue
                    if exchange.request_handed is not None:
                        streaming.end(exchange)
                    if not batch:
                        first_at = time.monotonic()
                    batch.append(exchange)
                    held += exchange.held_bytes
                    if len(batch) >= _MAX_BATCH or held >= _MAX_BATCH_BYTES:
                        record(batch)
                        batch, held = [], 0
                continue
            if isinstance(message, Stop):
                batch += streaming.orphans()
            record(batch)
            batch, held = [], 0
            if isinstance(message, Flush):
                ok = not message.sinks or all(sink.flush(message.timeout)
                                              for sink in pipeline.sinks)
                report(force=True)
                end.send(Flushed(message.token, ok))
            elif isinstance(message, Stop):
                ok = pipeline.close(max(0.1, message.deadline - time.monotonic() - _STOP_MARGIN))
                report(force=True)
                end.send(Stopped(ok))
                end.close_results()
                return 0
        if batch and (end.closed or time.monotonic() - first_at >= LINGER):
            record(batch)
            batch, held = [], 0


if __name__ == "__main__":
    raise SystemExit(recorder_main(int(sys.argv[1]), int(sys.argv[2])))
