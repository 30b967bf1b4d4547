"""The proxy's handle on the recorder process, which runs the pipeline (processors and sinks).

    proxy process (one event loop)                    recorder process
    ──────────────────────────────                    ────────────────
    handler ──submit()──► Recorder ══ inbox pipe ═══► batch ─► processors ─► local store
                             ▲                                           └─► OTLP sink (thread)
                             └── add_reader ◄═ results pipe ══ progress, answers

Everything the record costs — parsing, redaction, hashing, JSON encoding, SQLite, protobuf —
runs in the recorder process (``otelproxy.recorder_process``), so it neither holds the proxy's
GIL nor takes its event loop's time. ``Recorder`` starts it as ``python -m
otelproxy.recorder_process INBOX_FD RESULTS_FD``: a plain subprocess with its two pipe ends
passed on (not ``multiprocessing``: no resource-tracker process beside it, nothing re-imported
to start it), whose first message is the configuration. ``otelproxy.channel`` holds the
messages and their framing, the same both ways. The proxy resolves the OTLP settings when it
makes its ``Recorder`` (a bad one is a ``ConfigError`` then) and tells the recorder whether
export is on, so that a recorder without export never imports the OTLP package (the idle
memory this layout takes is measured in the README, "How it works").

The proxy's side lives on its event loop alone, with no thread and nothing shared between
threads: ``submit`` gathers the exchanges finished within ``OUTBOX_DELAY`` into one message (of
up to ``_FRAME_BYTES``) and writes it into the non-blocking pipe; what the pipe cannot take at
once waits in a buffer (``PipeWriter``) that the loop drains when the pipe is writable. While
that buffer is not empty, newly finished exchanges wait in the outbox as they are, not framed:
the proxy does not hold a backlog twice (the exchanges and their pickles), and frames it as
the pipe makes room (``drain`` and ``stop`` frame all of it at once: their message comes after).
The loop reads the recorder's progress and answers (``loop.add_reader``).
``submit`` never blocks: with ``record_queue_size`` exchanges unrecorded an exchange is
dropped; with ``buffer_limit`` bytes of bodies waiting it waits without its bodies (counted).
``hand_over`` sends a streamed exchange's request body ahead, when its stream begins, through
the same outbox (``channel.Begun``).
Another thread (a test, an embedding program) uses ``flush``, which runs ``drain`` on the loop;
waiting for the exit status of a recorder that ended (``waitpid``) is the one call made on a
worker thread.

A recorder that dies (killed, out of memory, SIGBUS on a full disk) is restarted: at once after
a good run, then after a doubling wait (``RESTART_FIRST`` … ``RESTART_MAX``); meanwhile
/healthz answers 503 with the reason, and exchanges wait in the new pipe. The proxy stops it
(``stop``) after the streams in flight have finished, so their exchanges are recorded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import site
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from otelproxy.channel import (
    READ_SIZE,
    Begun,
    Exchanges,
    Flush,
    Flushed,
    Message,
    Progress,
    Ready,
    Start,
    Stop,
    Stopped,
    frame,
    pipe,
    unframe,
)
from otelproxy.config import Config
from otelproxy.pipeline import EXPORT_OFF
from otelproxy.record import BodyCut, Chunks, Exchange

if TYPE_CHECKING:
    from otelproxy.pipeline import Pipeline, Sink

log = logging.getLogger("otelproxy.recorder")

_MAX_BUFFER_BYTES = 256 * 1024 * 1024
"""Bytes of bodies that exchanges waiting in the proxy for room in the pipe may hold; past this
an exchange waits without its bodies: the record keeps at least its request and response
entries (``body_truncated``)."""
_STUB_RESERVE = 16 * 1024 * 1024
"""Room past the ``PipeWriter``'s limit for exchanges sent without their bodies, and for
``Flush`` and ``Stop``."""
_FRAME_BYTES = 256 * 1024
"""Exchanges go to the recorder in messages holding up to this many bytes of bodies (at least
one exchange each), so that a backlog is framed as the pipe makes room, not all at once."""
OUTBOX_DELAY = 0.05
"""Seconds an exchange (or a hand-over) waits in the outbox for others to go with it: the
recorder, which shares the proxy's CPU, is woken once per message and records most cheaply in
few, large bursts. Given the benchmark's Claude Code exchanges at its pace (two messages per
exchange, about 90 a second), the recorder took 1.92 to 2.13 ms of CPU per exchange at 0.05 s
against 2.29 to 2.54 sent on the loop's next turn (``python -m benchmarks.recorder_pace``, six
alternating rounds; at 0.02 s no difference showed). An outbox holding ``_FRAME_BYTES`` goes at
once. What it costs: a proxy killed outright (SIGKILL) also loses the exchanges of its last
50 ms, and a stream begun in them leaves no ``proxy_ended`` record."""
RESTART_FIRST = 0.5
"""Seconds before restarting a recorder that died again soon after a restart (then doubled)."""
RESTART_MAX = 30.0
"""The longest wait between two restarts of a recorder that keeps dying."""
STABLE_AFTER = 60.0
"""A recorder that ran this long before it died is replaced at once, and its death logged."""
STOP_PROGRESS_WAIT = 2.0
"""Past the stop deadline, the recorder gets this many seconds more each time it has recorded
something in the last ones."""
STOP_EXTRA_MAX = 60.0
"""The most time added to the stop deadline for a recorder that is still making progress."""
_EXIT_WAIT = 5.0
"""Seconds a recorder whose pipe closed gets to exit before it is killed."""


class PipeWriter:
    """The proxy's end of the recorder's inbox: frames in order, never a blocking write.

    ``send`` writes what the pipe takes at once; the rest waits in a buffer of at most ``limit``
    bytes, which the event loop writes when the pipe is writable (``add_writer``). Call it on
    the event loop only.
    """

    def __init__(self, fd: int, limit: int,
                 on_room: Callable[[], None] | None = None) -> None:
        """``on_room``: called on the loop each time the buffer has been written whole."""
        self.fd = fd
        os.set_blocking(fd, False)
        self._limit = limit
        self._on_room = on_room
        self._buffer = bytearray()
        self._watching: asyncio.AbstractEventLoop | None = None
        self.broken = False
        """The recorder closed its end (it is gone): nothing more can be sent."""

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def send(self, message: Message, reserve: int = 0) -> bool:
        """Queue ``message`` for the recorder; False when the buffer is full (past its limit
        plus ``reserve``) or the pipe broken."""
        data = frame(message)
        if self.broken or len(self._buffer) + len(data) > self._limit + reserve:
            return False
        written = 0 if self._buffer else self._write(data)  # keep frames in order
        if written < len(data):
            self._buffer += memoryview(data)[written:]
            self.watch()
        return True

    def watch(self) -> None:
        """Have the running event loop write the buffer once the pipe is writable (outside a
        loop, e.g. a ``Start`` larger than the pipe written at construction: on the next call
        on the loop)."""
        if self._buffer and self._watching is None and not self.broken:
            try:
                self._watching = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._watching.add_writer(self.fd, self._writable)

    def _write(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # EPIPE: the recorder is gone (its results pipe tells the Recorder)
            self.broken = True
            self._buffer.clear()
            return len(data)

    def _writable(self) -> None:
        while self._buffer:
            written = self._write(self._buffer)
            if not written:
                return
            del self._buffer[:written]
        self._unwatch()
        if self._on_room is not None:
            self._on_room()

    def _unwatch(self) -> None:
        if self._watching is not None:
            self._watching.remove_writer(self.fd)
            self._watching = None

    def close(self) -> None:
        """Give up what is buffered and close the pipe (idempotent: a descriptor number is
        never closed twice, it may belong to something else by then)."""
        self._unwatch()
        self.broken = True
        self._buffer.clear()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass(eq=False)
class RecorderProcess:
    """One recorder process as the proxy holds it: its pipes, and what it said last."""

    inbox: PipeWriter
    results: int
    """The proxy's (read) end of the results pipe; watched by the event loop once started."""
    child_ends: tuple[int, ...]
    """The recorder's ends (inbox read, results write), closed here once it has them."""
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    received: bytearray = dataclasses.field(default_factory=bytearray)
    running: bool = False
    """Between its start and the end of its results pipe (it exited)."""
    stopped: bool = False
    """It answered ``Stop``."""

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def close_results(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Stop reading its results (idempotent)."""
        if self.results >= 0:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self.results)
            os.close(self.results)
            self.results = -1

    def close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Close every pipe end the proxy holds for it (idempotent)."""
        self.inbox.close()
        self.close_results(loop)
        for end in self.child_ends:  # never started
            os.close(end)
        self.child_ends = ()


class Recorder:
    """The proxy's handle on the recorder process; the interface the handler and /healthz use.
    Every method but ``flush`` runs on the proxy's event loop."""

    def __init__(self, config: Config, env: Mapping[str, str] | None = None,
                 buffer_limit: int = _MAX_BUFFER_BYTES) -> None:
        """``env``: where the OTLP export reads ``OTEL_*`` (default: this process's
        environment). ``buffer_limit``: bytes of framed exchanges that may wait in the proxy for
        the pipe."""
        self.config = config
        self._env = dict(os.environ if env is None else env)
        from otelproxy import otlp  # its settings only: light

        # a bad OTLP setting fails here, as a ConfigError
        self._exporting = otlp.resolve(config, self._env) is not None
        self._buffer_limit = buffer_limit
        self.process = self._new_process()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._replacing: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[bool] | None = None
        self._tokens = itertools.count(1)
        self._answers: dict[int, asyncio.Future[bool]] = {}
        self.restarts = 0
        self._earlier: dict[str, int] = {}  # counters of recorder processes that have died
        self._counters: dict[str, int] = {}
        self._export: dict[str, str | None] = dict(EXPORT_OFF)
        self._processed = 0
        self._child_error: str | None = None
        self._down_error: str | None = None
        self._restart_wait = 0.0
        self.submitted = 0
        self.dropped = 0
        self.without_bodies = 0
        self._drop_logs = 0
        self._outbox: deque[tuple[Exchange | Begun, int]] = deque()
        """Exchanges (and request bodies handed over) not yet framed, with the bytes of bodies
        each holds."""
        self._outbox_bytes = 0

    # -- the process -----------------------------------------------------------------------------

    def _new_process(self) -> RecorderProcess:
        """The pipes of the next recorder process (started by ``_spawn``); exchanges submitted
        meanwhile wait in them."""
        inbox_read, inbox_write = pipe()
        try:
            results_read, results_write = pipe()
        except OSError:  # out of descriptors, say: the first pipe must not leak
            os.close(inbox_read)
            os.close(inbox_write)
            raise
        os.set_blocking(results_read, False)
        inbox = PipeWriter(inbox_write, self._buffer_limit, self._send_outbox)
        inbox.send(Start(self.config, self._env, self._exporting))  # first, whatever follows
        return RecorderProcess(inbox, results_read, (inbox_read, results_write))

    def _spawn(self) -> None:
        """Start the process for ``self.process`` and watch its results pipe."""
        process = self.process
        loop = self._bound_loop()
        inbox, results = process.child_ends
        process.popen = subprocess.Popen(
            [sys.executable, "-P", "-m", "otelproxy.recorder_process", str(inbox), str(results)],
            pass_fds=process.child_ends, stdin=subprocess.DEVNULL, env=_child_env())
        process.started_at = time.monotonic()
        process.running = True
        for end in process.child_ends:  # the child has its copies; EOF must reach each side
            os.close(end)
        process.child_ends = ()
        loop.add_reader(process.results, self._readable, process)
        process.inbox.watch()

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a Recorder is used on one event loop only")
        return loop

    async def start(self, within: float = 60.0) -> None:
        """Start the recorder process and wait until it has opened the record (or died: it is
        restarted in the background and the proxy serves meanwhile)."""
        self._bound_loop()
        self._ready = asyncio.get_running_loop().create_future()
        self._spawn()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), within)
        except TimeoutError:
            log.error("the recorder process did not start in %g s", within)

    def _readable(self, process: RecorderProcess) -> None:
        """The event loop's callback for the results pipe: progress, answers, or its end."""
        try:
            data = os.read(process.results, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._ended(process)
            return
        process.received += data
        for message in unframe(process.received):
            self._handle(process, message)

    def _handle(self, process: RecorderProcess, message: Message) -> None:
        match message:
            case Progress(processed, counters, record_error, export):
                self._processed, self._counters = processed, counters
                self._child_error, self._export = record_error, export
            case Ready():
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
            case Flushed(token, ok):
                answer = self._answers.get(token)
                if answer is not None and not answer.done():
                    answer.set_result(ok)
            case Stopped(ok):
                process.stopped = True
                if self._stopped is not None and not self._stopped.done():
                    self._stopped.set_result(ok)

    def _ended(self, process: RecorderProcess) -> None:
        """Its results pipe closed: the process exited (or is about to)."""
        loop = self._bound_loop()
        process.close_results(loop)
        process.running = False
        for answer in self._answers.values():  # what it had not answered, it never will
            if not answer.done():
                answer.set_result(False)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(False)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if self._stopping or process is not self.process:
            return
        self._replacing = loop.create_task(self._replace(process))

    async def _replace(self, dying: RecorderProcess) -> None:
        """The recorder died (killed, out of memory, SIGBUS on a full disk): start another so
        recording goes on. The exchanges it had not recorded are lost with it, and counted as
        dropped. One that keeps dying is restarted after a doubling wait (``RESTART_FIRST`` …
        ``RESTART_MAX``) and logged once; new exchanges wait in the new pipe meanwhile."""
        status = await _exit_status(dying)
        self.restarts += 1
        self._send_outbox(force=True)  # into the dead pipe: counted below with the rest
        for key, value in self._counters.items():
            self._earlier[key] = self._earlier.get(key, 0) + value
        self._earlier["processed"] = self._earlier.get("processed", 0) + self._processed
        self._counters, self._processed = {}, 0
        lost = self.pending
        self.dropped += lost
        if time.monotonic() - dying.started_at >= STABLE_AFTER:
            self._restart_wait = 0.0
        wait = self._restart_wait
        self._restart_wait = min(RESTART_MAX, max(RESTART_FIRST, wait * 2))
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
        dying.close(self._loop)
        while True:
            try:
                if self.process is dying:  # its pipes at once: exchanges wait in them meanwhile
                    self.process = self._new_process()
                await asyncio.sleep(wait)
                self._spawn()
                break
            except OSError as exc:  # e.g. out of file descriptors: try again, later
                wait = self._restart_wait
                self._restart_wait = min(RESTART_MAX, wait * 2)
                self._down_error = f"cannot start the recorder process ({exc}); " \
                                   f"trying again in {wait:g} s"
                # here, not only before _spawn: a failed _new_process must not retry in a loop
                # that never yields (the proxy would hang, and no descriptor be freed)
                await asyncio.sleep(wait)
                wait = 0.0
        self._down_error = None

    def record_error(self) -> str | None:
        """Why the record is not being written now (None while it is): the recorder process is
        down, or the one running cannot write (its last error)."""
        if self._down_error is not None:
            return self._down_error
        if not self.process.running and not self.process.stopped:
            return "the recorder process is not running"
        return self._child_error

    # -- used on the proxy's event loop: must never block -----------------------------------------

    def submit(self, exchange: Exchange) -> None:
        """Hand a finished exchange to the recorder. The exchanges finished within
        ``OUTBOX_DELAY`` go together (one pickle, one pipe write); while the pipe is full they
        wait here as they are."""
        self.submitted += 1
        full = self.pending > self.config.record_queue_size
        if full and exchange.request_handed is None:
            self._drop(1, "record queue full")
            return
        size = exchange.held_bytes
        # one whose request the recorder holds already goes on, past the bound, without its
        # bodies: dropped, it would have been recorded as begun and never ended
        if full or self._outbox_bytes + size > self._buffer_limit:
            exchange, size = without_bodies(exchange), 0
            self._count_without_bodies(1)
        self._queue(exchange, size)

    def hand_over(self, exchange: Exchange) -> None:
        """Send the request body of an exchange whose response has begun streaming now, not
        when the stream ends: the recorder holds it as the little it adds to the previous turn
        of its conversation (``compact.Handed``), and the proxy holds nothing of it for the
        rest of the stream. Not while the buffer for the pipe is short of room: the exchange
        then keeps its body."""
        body = exchange.request_body
        if self._outbox_bytes + len(body) > self._buffer_limit or not self.process.running:
            return
        self._queue(Begun(dataclasses.replace(exchange, chunks=Chunks())), len(body))
        exchange.request_body = b""
        exchange.request_handed = len(body)

    def _queue(self, item: Exchange | Begun, size: int) -> None:
        """Into the outbox (``size``: bytes of bodies it holds). The first one after the pipe
        took everything is framed ``OUTBOX_DELAY`` later with those that came meanwhile, or
        on the loop's next turn once they hold ``_FRAME_BYTES``."""
        self._outbox.append((item, size))
        before = self._outbox_bytes
        self._outbox_bytes += size
        if self.process.inbox.buffered:
            return  # the pipe's writer takes the outbox as the pipe makes room (on_room)
        if len(self._outbox) == 1:
            self._bound_loop().call_later(OUTBOX_DELAY, self._send_outbox)
        if before < _FRAME_BYTES <= self._outbox_bytes:
            self._bound_loop().call_soon(self._send_outbox)

    def _send_outbox(self, force: bool = False) -> None:
        """Frame the outbox (``_FRAME_BYTES`` at a time) while the pipe takes it whole; the
        rest waits for ``PipeWriter``'s ``on_room``. ``force``: all of it now, buffered if need
        be (before a ``Flush`` or ``Stop``, which must come after it)."""
        outbox, inbox = self._outbox, self.process.inbox
        while outbox and (force or not inbox.buffered):
            batch: list[Exchange | Begun] = []
            size = 0
            while outbox and (not batch or size + outbox[0][1] <= _FRAME_BYTES):
                exchange, held = outbox.popleft()
                batch.append(exchange)
                size += held
            self._outbox_bytes -= size
            self._send(batch)

    def _send(self, batch: list[Exchange | Begun]) -> None:
        inbox = self.process.inbox
        if inbox.send(Exchanges(batch)):
            return
        # without bodies: a handed-over body is left out whole (its exchange is then recorded
        # with the body's size alone, as one sent without bodies)
        stubs: list[Exchange | Begun] = [without_bodies(item) for item in batch
                                          if isinstance(item, Exchange)]
        if not stubs:  # handed-over bodies only: nothing more to send or count
            return
        if not inbox.broken and inbox.send(Exchanges(stubs), _STUB_RESERVE):
            self._count_without_bodies(len(stubs))
            return
        self._drop(len(stubs), "recorder gone" if inbox.broken else "record buffer full")

    def _count_without_bodies(self, count: int) -> None:
        if not self.without_bodies:
            log.error("record buffer full: exchanges are recorded without their bodies "
                      "(counted in records_without_bodies)")
        self.without_bodies += count

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        if self._drop_logs == 0 or self._drop_logs % 100 == 0:
            log.error("%s: %d exchange(s) dropped so far", why, self.dropped)
        self._drop_logs += 1

    @property
    def backlog(self) -> float:
        """How full the record's bounds are: the larger of the unrecorded exchanges over
        ``record_queue_size`` and the bodies waiting here for the pipe over the buffer limit
        (past 1, exchanges are dropped, or recorded without their bodies)."""
        return max(self.pending / self.config.record_queue_size,
                   self._outbox_bytes / self._buffer_limit)

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
        if not self.process.running and not self.process.stopped:
            out["sink_errors"] += 1
        return out

    def export_status(self) -> dict[str, str | None]:
        """The OTLP export's health as the recorder process last reported it (a change within
        ``recorder_process.IDLE_WAIT``)."""
        return dict(self._export)

    # -- waiting: coroutines on the loop, and ``flush`` for other threads -----------------------

    async def drain(self, within: float, sinks: bool = True) -> bool:
        """Wait up to ``within`` seconds until every exchange submitted before this call is
        recorded (and, with ``sinks``, exported by every sink); True if it is."""
        self._send_outbox(force=True)
        token = next(self._tokens)
        answer = self._bound_loop().create_future()
        self._answers[token] = answer
        try:
            if not self.process.inbox.send(Flush(token, sinks, within), _STUB_RESERVE):
                return False
            return await asyncio.wait_for(answer, within)
        except TimeoutError:
            return False
        finally:
            del self._answers[token]

    def flush(self, timeout: float, sinks: bool = True) -> bool:
        """``drain`` from another thread than the event loop's (tests, embedding): False when
        the loop does not run."""
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            raise RuntimeError("Recorder.flush on the recorder's own event loop: await drain()")
        if loop is None or loop.is_closed():
            return False
        waiting = asyncio.run_coroutine_threadsafe(self.drain(timeout, sinks), loop)
        try:
            return waiting.result(timeout + _EXIT_WAIT)
        except TimeoutError:
            waiting.cancel()
            return False

    async def stop(self, within: float) -> bool:
        """Record everything submitted, flush the sinks and stop the process, in ``within``
        seconds; True when all of it was done in time."""
        self._stopping = True
        if self._replacing is not None:  # dead, or waiting to be restarted
            self._replacing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replacing
            if self.process.child_ends:  # exchanges wait in the next one's pipe: record them
                with contextlib.suppress(OSError):
                    self._spawn()
        process = self.process
        if not process.running:
            self._count_unrecorded()
            process.close(self._loop)
            return False
        loop = self._bound_loop()
        deadline = loop.time() + within
        self._send_outbox(force=True)
        self._stopped = loop.create_future()
        ok = False
        if process.inbox.send(Stop(time.monotonic() + within), _STUB_RESERVE):
            ok = await self._await_stopped(max(0.1, deadline - loop.time()))
        assert process.popen is not None  # it ignores SIGTERM: it leaves once Stop is done
        code = await _wait_exit(process.popen, max(1.0 if process.stopped else 0.1,
                                                   deadline - loop.time()))
        if code is None:
            process.popen.kill()
            await _wait_exit(process.popen, _EXIT_WAIT)
        process.running = False
        process.close(loop)
        # what it had not recorded: killed, or submitted after Stop (a handler cut late)
        lost = self._count_unrecorded()
        return ok and process.stopped and code is not None and not lost

    async def _await_stopped(self, within: float) -> bool:
        """Wait ``within`` seconds for ``Stopped``, then longer while the recorder still makes
        progress on its backlog (under ``SCHED_IDLE`` on a busy machine it records slowly, and
        what it has not recorded when it is killed is lost), up to ``STOP_EXTRA_MAX`` more."""
        assert self._stopped is not None
        waited, extra, said = within, 0.0, False
        while True:
            before = self._processed
            try:
                return await asyncio.wait_for(asyncio.shield(self._stopped), waited)
            except TimeoutError:
                if self._processed == before or extra >= STOP_EXTRA_MAX:
                    return False
            if not said:
                said = True
                log.warning("the recorder still has %d exchange(s) to record; waiting while "
                            "it makes progress (up to %g s more)", self.pending, STOP_EXTRA_MAX)
            waited = STOP_PROGRESS_WAIT
            extra += waited

    def _count_unrecorded(self) -> int:
        """The process is gone for good: what it had not recorded is lost, counted and said;
        how many. The outbox is emptied: no ``OUTBOX_DELAY`` timer left behind sends it into a
        closed pipe later, to be counted a second time."""
        self._outbox.clear()
        self._outbox_bytes = 0
        lost = self.pending
        if lost:
            self.dropped += lost
            log.error("the recorder stopped with %d exchange(s) unrecorded (counted as dropped)",
                      lost)
        return lost


def _child_env() -> dict[str, str]:
    """The recorder's environment: the proxy's, with the directory the proxy imported otelproxy
    from put first on ``PYTHONPATH`` when that is not a site directory (a source checkout, say).
    The child runs with ``-P``: the working directory is never on its path, so a ``pickle.py``
    or ``json.py`` where otelproxy was started cannot run in the process that sees the
    unredacted exchanges, and both processes run the same otelproxy."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in {*site.getsitepackages(), site.getusersitepackages()}:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


async def _wait_exit(popen: subprocess.Popen[bytes], within: float) -> int | None:
    """Its exit status once it has exited (None if it still runs after ``within`` seconds);
    ``waitpid`` blocks, so on a worker thread."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return await asyncio.to_thread(popen.wait, within)
    return None


async def _exit_status(process: RecorderProcess) -> str:
    """How a recorder whose pipe closed has exited (killed when it lingers)."""
    assert process.popen is not None
    code = await _wait_exit(process.popen, _EXIT_WAIT)
    if code is None:
        process.popen.kill()
        code = await _wait_exit(process.popen, _EXIT_WAIT)
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"status {code}"


def without_bodies(exchange: Exchange) -> Exchange:
    """The exchange with its bodies left out (sizes, hashes when known, first-byte time kept)."""
    request_cut, response_cut = exchange.request_cut, exchange.response_cut
    return dataclasses.replace(
        exchange, request_body=b"", chunks=Chunks.of((ns, b"") for ns in exchange.chunks.times[:1]),
        request_cut=BodyCut(exchange.request_size, request_cut.sha256 if request_cut else None),
        response_cut=BodyCut(exchange.response_size,
                             response_cut.sha256 if response_cut else None),
    )


def build_pipeline(
    config: Config, env: Mapping[str, str], extra_sinks: Sequence[Sink] = ()
) -> Pipeline:
    """``recorder_process.build_pipeline``: the pipeline in this process (e.g. for a
    ``Server`` that records in-process, with a sink of its own)."""
    from otelproxy import recorder_process

    return recorder_process.build_pipeline(config, env, extra_sinks)
