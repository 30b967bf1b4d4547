"""The hot path: receive, forward, stream back, time every chunk — and nothing else.

The handler only does what must happen inline (DESIGN §2): route, read the request body, send it
upstream, write each response chunk to the client as soon as it arrives and append
``(monotonic_ns, bytes)`` to the ``Exchange``. Parsing, redaction, hashing, JSON encoding and all
record I/O happen later, on the pipeline's threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from otelproxy import __version__, header_bytes
from otelproxy.config import Config
from otelproxy.errors import (
    RequestTimeout,
    RequestTooLarge,
    RouteError,
    UpstreamError,
    error_body,
)
from otelproxy.pipeline import Pipeline
from otelproxy.record import BodyCut, Exchange, Outcome
from otelproxy.recorder import Recorder
from otelproxy.routing import resolve
from otelproxy.upstream import Upstream, request_headers, response_headers

log = logging.getLogger("otelproxy.proxy")

RECORD_WAIT_FROM = 0.5
"""A new request waits while the record's backlog fills this fraction of its bounds…"""
RECORD_WAIT_UNTIL = 0.25
"""…until it is down to this fraction (``_wait_for_record``)."""
RECORD_WAIT_POLL = 0.005
"""Seconds between looks at the record's backlog while a request waits for it."""
RECORD_WAIT_MAX = 10.0
"""A request waits at most this long for the record to catch up (a recorder that is stuck or
restarting does not hold clients longer); then it goes on, and an exchange past the queue
bound is dropped from the record and counted."""


@dataclass
class Stats:
    """Counters of the hot path (mutated only on the event loop)."""

    started: float = field(default_factory=time.monotonic)
    exchanges: int = 0
    in_flight: int = 0
    rejected: int = 0
    upstream_errors: int = 0
    client_aborts: int = 0
    upstream_aborts: int = 0
    shutdown_cuts: int = 0
    client_connections: int = 0
    """Client connections open now (``otelproxy.listener``)."""
    connections_refused: int = 0
    """Client connections refused with a 503 because ``max_client_connections`` were open."""
    head_timeouts: int = 0
    """Connections closed because a request head was not complete within ``header_timeout``."""
    shutting_down: bool = False
    record_waits: int = 0
    """Requests that waited for the record to catch up before being read (``_wait_for_record``)."""
    record_wait_s: float = 0.0
    """The seconds they waited, summed."""
    full_collections: int = 0
    """Full garbage collections the proxy process ran when it chose to (``otelproxy.memory``):
    when idle, or after ``FULL_COLLECTION_MAX`` seconds of load without a pause."""
    full_collections_busy: int = 0
    """Those of them run with requests in flight (the load never paused)."""
    full_collection_ms: float = 0.0
    """The milliseconds they took, summed (the event loop waited meanwhile)."""


@dataclass
class ProxyState:
    """What the handlers share: configuration, the upstream seam, the recorder, counters."""

    config: Config
    upstream: Upstream
    pipeline: Recorder | Pipeline
    stats: Stats = field(default_factory=Stats)
    requests_in_flight: dict[asyncio.Task[Any], web.Request] = field(default_factory=dict)
    """Every proxied request being handled, by its handler task (the shutdown waits for them)."""
    cut_for_shutdown: set[asyncio.Task[Any]] = field(default_factory=set)
    """Handler tasks the shutdown cancelled after the grace period (recorded ``shutdown_cut``)."""
    record_caught_up: asyncio.Task[bool] | None = None
    """While requests wait for the record (``_wait_for_record``): the one task watching its
    backlog, which they all await."""
    record_stalled_at: int | None = None
    """The record's progress (``_recorded``) when a wait ended with none made: until it moves,
    requests no longer wait (a stuck recorder would hold every one for ``RECORD_WAIT_MAX``)."""


STATE = web.AppKey("state", ProxyState)

# Exchange ids: 8 random bytes per process start + a counter (unique, and cheaper than uuid4).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def _raw_headers(request: web.Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
            for k, v in request.raw_headers]


def _provider_guess(raw_path: str, state: ProxyState) -> str | None:
    first = raw_path.split("/", 2)[1] if raw_path.count("/") >= 1 else ""
    return first if first in ("anthropic", "openai") else state.config.default_provider


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: status, version, uptime and counters as JSON. HTTP 503 and
    ``failing`` (with ``record_error``) while the record is not being written."""
    state = request.app[STATE]
    stats = state.stats
    counters = state.pipeline.counters()
    export = state.pipeline.export_status()  # OTLP: "off", "ok" or "failing" (+ last error)
    healthy = export["export_status"] != "failing" and not any(counters.get(key, 0) for key in (
        "sink_errors", "records_dropped", "records_unrecorded", "records_without_bodies"))
    record_error = state.pipeline.record_error()
    body = {
        "status": "failing" if record_error else "ok" if healthy else "degraded",
        "version": __version__,
        "uptime_s": round(time.monotonic() - stats.started, 3),
        "exchanges": stats.exchanges,
        "in_flight": stats.in_flight,
        "rejected": stats.rejected,
        "upstream_errors": stats.upstream_errors,
        "client_aborts": stats.client_aborts,
        "upstream_aborts": stats.upstream_aborts,
        "shutdown_cuts": stats.shutdown_cuts,
        "client_connections": stats.client_connections,
        "connections_refused": stats.connections_refused,
        "head_timeouts": stats.head_timeouts,
        "records_submitted": state.pipeline.submitted,
        "records_pending": state.pipeline.pending,
        "record_waits": stats.record_waits,
        "record_wait_s": round(stats.record_wait_s, 3),
        "full_collections": stats.full_collections,
        "full_collections_busy": stats.full_collections_busy,
        "full_collection_ms": round(stats.full_collection_ms, 3),
        **counters,
        **export,
    }
    if record_error:
        body["record_error"] = record_error
    return web.json_response(body, status=503 if record_error else 200)


async def proxy(request: web.Request) -> web.StreamResponse:
    """Forward one request upstream and stream the answer back, recording the exchange."""
    started_ns = time.monotonic_ns()
    started_wall = time.time()
    state = request.app[STATE]
    config = state.config
    raw_path, _, query = request.raw_path.partition("?")
    headers = _raw_headers(request)
    exchange = Exchange(
        id=f"{_ID_PREFIX}{next(_ID_COUNTER):012x}",
        provider=_provider_guess(raw_path, state) or "unknown",
        upstream_url="", method=request.method, path=raw_path, query=query,
        request_headers=headers, started_wall=started_wall, started_ns=started_ns,
    )
    task = asyncio.current_task()
    assert task is not None
    state.requests_in_flight[task] = request
    sending = "client disconnected while sending the request"
    gone = sending
    try:
        try:
            route = resolve(raw_path, config)
            exchange.provider, exchange.path = route.provider, route.path
            exchange.upstream_url = route.origin.url
            if state.pipeline.backlog >= RECORD_WAIT_FROM:  # else no coroutine per request
                gone = "client disconnected while its request waited for the record to catch up"
                await _wait_for_record(state)
                gone = sending
            if (request.content_length is not None
                    and request.content_length > config.max_request_bytes):
                raise RequestTooLarge(_too_large(config))
            exchange.request_body = await _read_body(request, config)
        except RouteError as exc:
            response = _reject(request, state, exchange, exc)
            if isinstance(exc, RequestTimeout):  # a stalled client: answer, then hang up now
                await response.prepare(request)
                await response.write_eof()
                _cut_client(request)
            return response
        except asyncio.CancelledError:
            _client_gone(state, exchange, gone)
            state.pipeline.submit(exchange)
            raise
        if len(exchange.request_body) > config.record_max_body:
            hasher = Oversize()
            await hasher.catch_up(exchange.request_body)
            exchange.request_cut = hasher.cut()

        stats = state.stats
        stats.exchanges += 1
        stats.in_flight += 1
        try:
            return await _forward(request, state, exchange)
        finally:
            if exchange.finished_ns is None:
                exchange.finished_ns = time.monotonic_ns()
            _cut_for_record(exchange, config)
            state.pipeline.submit(exchange)
            stats.in_flight -= 1  # after submit: in_flight == 0 means every exchange is queued
    finally:
        del state.requests_in_flight[task]
        state.cut_for_shutdown.discard(task)


async def _wait_for_record(state: ProxyState) -> None:
    """Called once the record's backlog fills ``RECORD_WAIT_FROM`` of its bounds.

    Back-pressure instead of loss: while the record's backlog fills half of its bounds
    (``record_queue_size`` exchanges unrecorded, or the bodies waiting for the recorder's pipe),
    a new request is not read until it is down to a quarter, for at most ``RECORD_WAIT_MAX``.
    The recorder runs when the proxy leaves it CPU (it is under ``SCHED_IDLE``), so under a
    load that keeps the proxy's CPU busy the intake slows to the rate the record keeps, rather
    than the record dropping exchanges at its bound. Waiting cannot help, so no request waits,
    while the recorder is down or restarting, or after a wait in which it recorded nothing,
    until it records again. The waiters share one task that watches the backlog."""
    pipeline = state.pipeline
    if pipeline.record_error() is not None or state.record_stalled_at == _recorded(pipeline):
        return
    state.record_stalled_at = None
    stats = state.stats
    if stats.record_waits == 0:
        log.warning("the record is %d exchanges behind: new requests wait for it to catch up "
                    "(counted in record_waits on /healthz)", pipeline.pending)
    stats.record_waits += 1
    watcher = state.record_caught_up
    if watcher is None or watcher.done():
        watcher = state.record_caught_up = asyncio.create_task(
            _record_catches_up(state))  # referenced in state until done
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        await asyncio.shield(watcher)  # a client that gives up does not end the others' wait
    finally:
        stats.record_wait_s += loop.time() - began


async def _record_catches_up(state: ProxyState) -> bool:
    """Until the backlog is down to ``RECORD_WAIT_UNTIL`` (True), or ``RECORD_WAIT_MAX`` has
    passed, the recorder went down or the proxy is shutting down (False). A wait that ends
    with nothing recorded marks the recorder stalled (``ProxyState.record_stalled_at``)."""
    pipeline, stats = state.pipeline, state.stats
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECORD_WAIT_MAX
    progress = _recorded(pipeline)
    # polled, by this one task: the backlog falls in the recorder (another process, or the
    # in-process pipeline's thread)
    while pipeline.backlog > RECORD_WAIT_UNTIL:
        if loop.time() >= deadline or stats.shutting_down or pipeline.record_error():
            if _recorded(pipeline) == progress:
                state.record_stalled_at = progress
            return False
        await asyncio.sleep(RECORD_WAIT_POLL)
    return True


def _recorded(pipeline: Recorder | Pipeline) -> int:
    """Exchanges recorded so far. Not those dropped: a stuck recorder whose backlog is past the
    bound drops what arrives, and that is no progress."""
    return pipeline.submitted - pipeline.pending - pipeline.dropped


HAND_OVER_FROM = 16 * 1024
"""A streamed exchange's request body at least this large goes to the recorder as soon as the
response head is relayed (``Recorder.hand_over``), not when the stream ends. With 100 streams
open, each held 57.6 KB of Python objects in the proxy, 33.8 of them its 40.7 KB request body;
handed over, 36.9 KB (``tracemalloc``, README "Memory per stream")."""


def _cut_for_record(exchange: Exchange, config: Config) -> None:
    """A request body over ``record_max_body`` was forwarded whole; the record keeps its start
    (``request_cut`` has its size and digest). Idempotent."""
    if exchange.request_cut is not None:
        exchange.request_body = exchange.request_body[:config.record_max_body]


def _too_large(config: Config) -> str:
    return f"request body exceeds this proxy's limit of {config.max_request_bytes} bytes"


async def _read_body(request: web.Request, config: Config) -> bytes:
    """The whole request body; ``RequestTooLarge`` beyond the limit, ``RequestTimeout`` after
    ``body_timeout`` seconds without a byte. A body that arrived in one piece (most, on a local
    connection) is kept as that piece, not copied."""
    parts: list[bytes] = []
    size = 0
    content = request.content
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(config.body_timeout) as silence:
            while chunk := await content.readany():
                parts.append(chunk)
                size += len(chunk)
                if size > config.max_request_bytes:
                    raise RequestTooLarge(_too_large(config))
                silence.reschedule(loop.time() + config.body_timeout)
    except TimeoutError:
        raise RequestTimeout(
            f"request body stalled: nothing received for {config.body_timeout:g} s "
            f"({size} bytes read)"
        ) from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _reject(
    request: web.Request, state: ProxyState, exchange: Exchange, exc: RouteError
) -> web.Response:
    state.stats.rejected += 1
    exchange.outcome = Outcome.REJECTED
    exchange.status = exc.status
    exchange.error = str(exc)
    exchange.generated_response = True
    exchange.finished_ns = time.monotonic_ns()
    state.pipeline.submit(exchange)
    provider = exchange.provider if exchange.provider != "unknown" else None
    response = web.Response(
        status=exc.status, body=error_body(provider, exc.error_type, str(exc)),
        content_type="application/json",
    )
    if isinstance(exc, RequestTooLarge | RequestTimeout):
        response.force_close()  # the rest of the body was not read
    return response


async def _forward(
    request: web.Request, state: ProxyState, exchange: Exchange
) -> web.StreamResponse:
    stats = state.stats
    url = exchange.upstream_url + exchange.path + ("?" + exchange.query if exchange.query else "")
    outgoing = request_headers(exchange.request_headers)
    exchange.forwarded_ns = time.monotonic_ns()
    exchange.proxy_ns = exchange.forwarded_ns - exchange.started_ns
    try:
        upstream = await state.upstream.send(exchange.method, url, outgoing, exchange.request_body)
    except UpstreamError as exc:
        stats.upstream_errors += 1
        return _upstream_failed(exchange, exc)
    except asyncio.CancelledError:
        _client_gone(state, exchange, "client disconnected before the upstream answered")
        raise

    async with upstream:
        mark = time.monotonic_ns()
        exchange.headers_ns = mark
        exchange.status, exchange.reason = upstream.status, upstream.reason or ""
        exchange.response_headers = [
            (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
            for k, v in upstream.raw_headers
        ]
        response = RelayedResponse(
            status=upstream.status, reason=upstream.reason,
            headers=response_headers(exchange.response_headers),
        )
        oversize: Oversize | None = None
        try:
            await response.prepare(request)
            if len(exchange.request_body) >= HAND_OVER_FROM \
                    and upstream.content_type == "text/event-stream":
                _cut_for_record(exchange, state.config)
                state.pipeline.hand_over(exchange)
            exchange.proxy_ns += time.monotonic_ns() - mark
            chunks = exchange.chunks
            reader = upstream.content
            room = state.config.record_max_body  # what the record may still keep
            while True:
                try:
                    data = await reader.readany()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    stats.upstream_aborts += 1
                    exchange.outcome = Outcome.UPSTREAM_ABORTED
                    exchange.error = f"upstream stream broke: {type(exc).__name__}"
                    _cut_client(request)
                    return response
                if not data:
                    break
                received = time.monotonic_ns()
                if oversize is None and len(data) <= room:
                    room -= len(data)
                    chunks.append(received, data)
                else:  # past the cap (rare): keep the start, hash and count all of it
                    if oversize is None:
                        oversize = Oversize()
                        await oversize.catch_up(chunks.data)
                        chunks.append(received, data[:room])
                    oversize.update(data)
                await response.write(data)
                exchange.proxy_ns += time.monotonic_ns() - received
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            _client_gone(state, exchange, "client disconnected mid-response")
            upstream.close()
            return response
        except asyncio.CancelledError:
            _client_gone(state, exchange, "client disconnected mid-response")
            upstream.close()
            raise
        finally:
            if oversize is not None:  # the digest once, however the stream ended
                exchange.response_cut = oversize.cut()
    exchange.finished_ns = time.monotonic_ns()
    return response


class Oversize:
    """Size and SHA-256 of a body larger than the record keeps (``record_max_body``). Only a
    body that crosses the cap pays for hashing: what was kept so far is hashed on a thread
    (hashlib releases the GIL), every later chunk as it passes."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._size = 0

    async def catch_up(self, kept: bytes | bytearray) -> None:
        await asyncio.to_thread(self.update, kept)

    def update(self, data: bytes | bytearray) -> None:
        self._sha.update(data)
        self._size += len(data)

    def cut(self) -> BodyCut:
        return BodyCut(self._size, self._sha.hexdigest())


class RelayedResponse(web.StreamResponse):
    """A response relayed from the upstream: it carries only the headers the upstream sent."""

    def __init__(self, *, status: int, reason: str | None, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self.not_sent = tuple(name for name in _AIOHTTP_DEFAULTS if name not in headers)
        """Which of aiohttp's defaults the upstream did not send (held for the whole stream:
        a tuple of shared names, not a set of every name)."""


# Headers aiohttp fills in when a response lacks them (``StreamResponse._prepare_headers``).
_AIOHTTP_DEFAULTS = ("Date", "Server", "Content-Type")


async def _drop_added_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: take back the defaults aiohttp added to a relayed response."""
    if isinstance(response, RelayedResponse):
        for name in response.not_sent:
            response.headers.popall(name, None)


def _client_gone(state: ProxyState, exchange: Exchange, why: str) -> None:
    """The handler was cancelled: the client went away, or the shutdown cut the request."""
    if asyncio.current_task() in state.cut_for_shutdown:
        state.stats.shutdown_cuts += 1
        exchange.outcome = Outcome.SHUTDOWN_CUT
        exchange.error = (f"cut by the proxy's shutdown: still running after the "
                          f"{state.config.grace_period:g} s grace period")
    else:
        state.stats.client_aborts += 1
        exchange.outcome = Outcome.CLIENT_ABORTED
        exchange.error = why + (" (proxy shutting down)" if state.stats.shutting_down else "")
    exchange.finished_ns = time.monotonic_ns()


def _cut_client(request: web.Request) -> None:
    """End the client's response the way the upstream ended ours: without a proper ending."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _upstream_failed(exchange: Exchange, exc: UpstreamError) -> web.Response:
    exchange.outcome = Outcome.UPSTREAM_ERROR
    exchange.error = str(exc)
    exchange.generated_response = True
    body = error_body(exchange.provider, exc.error_type, f"otelproxy: {exc}")
    exchange.status = exc.status
    exchange.response_headers = [("Content-Type", "application/json")]
    now = time.monotonic_ns()
    exchange.headers_ns = now
    exchange.chunks.append(now, body)
    exchange.finished_ns = now
    return web.Response(status=exc.status, body=body, content_type="application/json")


class EveryTarget(web.Resource):
    """A route resource matching every request target, ``*`` included: aiohttp's path patterns
    need a leading ``/``, so ``OPTIONS *`` would get aiohttp's own plain-text 404 instead of the
    proxy's 400 in the provider's shape and a record (``routing.resolve`` refuses it)."""

    @property
    def canonical(self) -> str:
        return "/"

    def _match(self, path: str) -> dict[str, str]:
        return {}

    def raw_match(self, path: str) -> bool:
        return True

    def get_info(self) -> dict[str, str]:  # type: ignore[override]
        return {"path": "*"}

    def url_for(self) -> URL:  # type: ignore[override]
        return URL("/")

    def add_prefix(self, prefix: str) -> None:
        raise NotImplementedError("the proxy route is not mounted under a prefix")


def build_app(state: ProxyState) -> web.Application:
    header_bytes.install()  # header values forwarded byte for byte, both ways
    app = web.Application(client_max_size=state.config.max_request_bytes + 1)
    app[STATE] = state
    app.on_response_prepare.append(_drop_added_headers)
    app.router.add_get("/healthz", healthz)
    every_target = EveryTarget()
    app.router.register_resource(every_target)
    every_target.add_route("*", proxy)
    return app
