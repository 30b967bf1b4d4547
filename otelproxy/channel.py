"""The channel between the proxy and its recorder process: one set of messages, one framing.

    proxy process (event loop)                            recorder process
    Recorder ── PipeWriter ═══ inbox pipe ════► RecorderEnd.receive ──► pipeline
    Recorder ◄─ loop.add_reader ◄═ results pipe ═ RecorderEnd.send ◄── progress, answers

Every message is one of the frozen dataclasses below; their docstrings are the reference. On the
wire, in both directions, a message is one frame: its pickle, preceded by the pickle's length as
a 4-byte big-endian integer. Both pipes belong to the two processes alone (the proxy creates
them and passes the recorder its ends), so nothing else writes to them.

The proxy's ends (``otelproxy.recorder``) never block: it writes what the pipe takes at once and
buffers the rest for its event loop, and reads the results pipe on that loop. The recorder's
ends (``RecorderEnd``) block: that process has nothing else to do. This module imports neither
asyncio nor the record's modules, so the recorder process starts small.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

try:  # what pickle.dumps and pickle.loads are, without the pure-Python pickler pickle.py also
    from _pickle import dumps, loads  # defines (in the recorder, 0.2 MiB resident for nothing)
except ImportError:  # an interpreter without pickle's C accelerator
    from pickle import dumps, loads

TYPE_CHECKING = False
if TYPE_CHECKING:  # unpickling imports them where they are needed
    from otelproxy.config import Config
    from otelproxy.record import Exchange

# -- proxy → recorder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The first message on a new recorder's inbox: what to record, and how."""

    config: Config
    env: Mapping[str, str]
    """Where the OTLP export reads its ``OTEL_*`` settings (the proxy's environment, or a
    test's)."""
    export: bool
    """Whether they turn OTLP export on (the proxy has resolved them): when not, the recorder
    does not even import the export's modules."""


@dataclass(frozen=True)
class Begun:
    """An exchange whose response is still streaming, as it was when the proxy handed over its
    request body (``Recorder.hand_over``): the exchange comes again when it ends, in
    ``Exchanges``, with ``request_handed`` set and no request body."""

    exchange: Exchange


@dataclass(frozen=True)
class Exchanges:
    """Finished exchanges, in the order they finished (those of ``OUTBOX_DELAY``, in
    ``otelproxy.recorder``), and ``Begun`` ones, in the order they were handed over."""

    items: list[Exchange | Begun]


@dataclass(frozen=True)
class Flush:
    """Answer ``Flushed(token, ok)`` once every exchange sent before is recorded (and, with
    ``sinks``, every sink has flushed within ``timeout`` seconds)."""

    token: int
    sinks: bool
    timeout: float


@dataclass(frozen=True)
class Stop:
    """Record everything sent before, shut the sinks down by ``deadline``, answer ``Stopped``
    and exit."""

    deadline: float
    """``time.monotonic()`` by which the sinks must be shut down (the clock is the same in both
    processes): what recording the backlog took is not given to the sinks again."""


# -- recorder → proxy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What the recorder has done so far: sent after each recorded batch, before each answer,
    and when idle every ``IDLE_WAIT`` if something changed (the export's health, a sink
    error)."""

    processed: int
    """Exchanges received and run through the pipeline."""
    counters: dict[str, int]
    """The pipeline's counters (``records_written``, ``sink_errors`` …) for /healthz."""
    record_error: str | None
    """Why the local record cannot be written now (None while it can)."""
    export: dict[str, str | None]
    """The OTLP export's health: ``export_status`` (off, ok, failing), ``export_last_error``."""


@dataclass(frozen=True)
class Ready:
    """The recorder has opened the record (or knows why it cannot, in ``Progress``) and reads
    exchanges."""


@dataclass(frozen=True)
class Flushed:
    """The answer to ``Flush(token)``: ``ok`` unless a sink could not flush in time."""

    token: int
    ok: bool


@dataclass(frozen=True)
class Stopped:
    """The answer to ``Stop``: everything is recorded; ``ok`` unless a sink could not finish
    in time. The recorder exits next."""

    ok: bool


Message = Start | Exchanges | Flush | Stop | Progress | Ready | Flushed | Stopped

# -- framing -------------------------------------------------------------------------------------

_HEADER = struct.Struct("!I")
PIPE_SIZE = 1024 * 1024
"""Asked of the kernel for each pipe (``F_SETPIPE_SZ``; Linux caps it at pipe-max-size)."""
READ_SIZE = 64 * 1024
"""Bytes asked of a pipe per read. Each read allocates what it asks for before it shrinks it to
what came: reading a megabyte at a time, the recorder's resident set peaked 5 to 10 MiB over its
start while recording 500 exchanges of 47 KB; reading this much, 2.3 to 2.5 MiB, in no more
time."""


def frame(message: Message) -> bytes:
    """One message as it goes on the wire."""
    data = dumps(message, -1)  # -1: pickle.HIGHEST_PROTOCOL
    return _HEADER.pack(len(data)) + data


def unframe(buffer: bytearray) -> Iterator[Message]:
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
            yield loads(view[start + _HEADER.size:end])
            start = end
    finally:
        view.release()
        del buffer[:start]


def pipe() -> tuple[int, int]:
    """A new pipe (read end, write end), both ends closed on exec unless passed on."""
    read, write = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # Linux only, best effort
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read, write


# -- the recorder's ends: blocking -----------------------------------------------------------------


class RecorderEnd:
    """The recorder process's ends of both pipes: ``receive`` exchanges and requests, ``send``
    progress and answers (blocking: the proxy reads on its event loop)."""

    def __init__(self, inbox: int, results: int) -> None:
        self._inbox = inbox
        self._results = results
        os.set_blocking(inbox, True)
        os.set_blocking(results, True)
        self._buffer = bytearray()
        self.closed = False
        """The proxy closed the inbox (it stopped, or died): nothing more will come."""

    def receive(self, timeout: float | None) -> list[Message]:
        """The messages complete within ``timeout`` seconds (maybe none; None: wait for one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._inbox], [], [], wait)
            if not ready:
                break
            data = os.read(self._inbox, READ_SIZE)  # EINTR is retried by Python (PEP 475)
            if not data:
                self.closed = True
                break
            self._buffer += data
            messages = list(unframe(self._buffer))
            if messages:
                return messages
        return []

    def send(self, message: Message) -> None:
        """Write ``message`` whole; nothing when the proxy is gone (it reads no more, and the
        end of the inbox tells the recorder to finish up)."""
        data = memoryview(frame(message))
        try:
            while data:
                data = data[os.write(self._results, data):]
        except BrokenPipeError:
            pass

    def close_results(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._results)
