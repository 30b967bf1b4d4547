"""Assembling and running the proxy: app, upstream seam, recorder process, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from otelproxy import open_files
from otelproxy.config import Config
from otelproxy.listener import Listener
from otelproxy.memory import (
    FULL_COLLECTION_MAX,
    full_collections_held,
    hold_full_collections,
    release_free_heap,
)
from otelproxy.pipeline import Pipeline
from otelproxy.proxy import STATE, ProxyState, build_app
from otelproxy.recorder import Recorder
from otelproxy.upstream import Upstream

log = logging.getLogger("otelproxy")

T = TypeVar("T")

CLOSE_TIMEOUT = 2.0
"""Seconds a cut request's handler, and then aiohttp's own shutdown, get to finish."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (a dependency wherever it builds: Linux, macOS),
    else None: asyncio's own."""
    try:
        module = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = module.new_event_loop
    return factory


def loop_name() -> str:
    return "uvloop" if loop_factory() is not None else "asyncio"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop ``loop_factory`` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: open the long-lived resources, and close them after the last handler."""
    state = app[STATE]
    await state.upstream.start()
    recorder = state.pipeline
    if isinstance(recorder, Recorder):  # on this loop: it reads the recorder's pipe
        await recorder.start()
    else:
        await asyncio.to_thread(recorder.start)
    idle = asyncio.create_task(_release_when_idle(state))
    yield
    idle.cancel()
    await state.upstream.close()
    timeout = max(5.0, state.config.grace_period)
    if isinstance(recorder, Recorder):
        flushed = await recorder.stop(timeout)
    else:
        flushed = await asyncio.to_thread(recorder.shutdown, timeout)
    if not flushed:
        log.error("shutdown: the record could not be flushed completely")


IDLE_CHECK = 1.0
"""Seconds between the proxy's checks for being idle (``_release_when_idle``)."""


async def _release_when_idle(state: ProxyState) -> None:
    """Once the proxy is idle and exchanges have started since the last time, return the heap
    they freed to the system (``otelproxy.memory``): after a burst, the idle proxy does not keep
    its peak. Idle is a whole check long: nothing in flight and no exchange begun since the
    previous look. No request in flight at one instant was not enough: the benchmark's round of
    500 streams began a few milliseconds after its warm-up requests ended, and a full
    collection begun in that instant (13-36 ms) stopped the streams' first events
    (``gc.callbacks`` in the proxy process, 2026-12-07 23:44 UTC).

    Where full collections are held back (``memory.hold_full_collections``, the proxy
    process), run one first, if the collector has moved objects into the oldest generation
    since the last (``gc.get_count()[2]``: whatever traffic left them, exchanges or not); and
    one with requests in flight once the proxy has not been idle for ``FULL_COLLECTION_MAX``
    seconds (a burst that follows a pause is not met by a collection)."""
    stats = state.stats
    seen = looked = stats.exchanges
    loop = asyncio.get_running_loop()
    calm_at = loop.time()  # the last collection, or the last look that found the proxy idle
    while True:
        await asyncio.sleep(IDLE_CHECK)
        idle = stats.in_flight == 0 and stats.exchanges == looked
        looked = stats.exchanges
        if idle:
            calm_at = loop.time()
        due = idle or loop.time() - calm_at >= FULL_COLLECTION_MAX
        if due and full_collections_held() and gc.get_count()[2] > 0:
            began = time.perf_counter()
            gc.collect()
            stats.full_collections += 1
            if not idle:
                stats.full_collections_busy += 1
            stats.full_collection_ms += (time.perf_counter() - began) * 1000
            calm_at = loop.time()
        if idle and stats.exchanges != seen:
            seen = stats.exchanges
            await asyncio.to_thread(release_free_heap)  # ctypes lets go of the GIL: the loop
            # goes on serving (a fragmented 200 MB heap took 38 ms to trim)


class Server:
    """A running otelproxy: ``await start()``, ``port``, ``await stop()``."""

    def __init__(self, config: Config, recorder: Recorder | Pipeline | None = None) -> None:
        """``recorder``: where finished exchanges go; by default a ``Recorder`` process. An
        in-process ``Pipeline`` (``recorder.build_pipeline``) also works, e.g. to add a sink."""
        self.config = config
        with contextlib.suppress(OSError):  # the recorder reports it and keeps trying
            config.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pipeline = recorder if recorder is not None else Recorder(config)
        self.state = ProxyState(config, Upstream(config), self.pipeline)
        self.app = build_app(self.state)
        self.app.cleanup_ctx.append(_lifecycle)
        # The runner's server dispatches requests to the app; connections are accepted and
        # served by otelproxy.listener (its ClientConnection carries the handler options).
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True,
            # Server.stop() has waited for the grace period and cut what was left; what remains
            # for aiohttp's own shutdown is closing idle connections.
            shutdown_timeout=CLOSE_TIMEOUT,
        )
        self._listener: Listener | None = None
        self.port = config.port

    async def start(self) -> None:
        await self._runner.setup()
        assert self._runner.server is not None
        self._listener = Listener(self.config, self.state.stats, self._runner.server)
        await self._listener.start()
        self.port = self._listener.port

    async def stop(self) -> None:
        """Stop accepting, give the requests in flight ``grace_period`` seconds in all, cut the
        ones still running (recorded ``shutdown_cut``), then close and flush the record."""
        self.state.stats.shutting_down = True
        if self._listener is not None:
            self._listener.close()
        if self._runner.server is not None:
            self._runner.server.pre_shutdown()  # idle keep-alive connections close now
        await self._drain(self.config.grace_period)
        await self._runner.cleanup()

    async def _drain(self, grace: float) -> None:
        in_flight = self.state.requests_in_flight
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while in_flight and (remaining := deadline - loop.time()) > 0:
            # again if a kept-alive connection started another request meanwhile
            await asyncio.wait(list(in_flight), timeout=remaining)
        if not in_flight:
            return
        log.warning("shutdown: grace period of %g s over, cutting %d request(s) in flight",
                    grace, len(in_flight))
        cut = list(in_flight.items())
        for task, _ in cut:
            self.state.cut_for_shutdown.add(task)
            task.cancel()
        await asyncio.wait([task for task, _ in cut], timeout=CLOSE_TIMEOUT)
        for _, request in cut:
            if request.transport is not None:
                request.transport.close()


def _report_limits(config: Config) -> None:
    files = open_files.soft_limit()
    log.info("open-file limit %d: up to %d client and %d upstream connections", files,
             config.max_client_connections, config.max_connections)
    if config.max_client_connections + config.max_connections > files - open_files.RESERVED:
        log.warning("--max-client-connections + --max-connections (%d) exceed what the "
                    "open-file limit of %d carries: streams may fail with 502 under load",
                    config.max_client_connections + config.max_connections, files)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain streams in flight, flush the record and return 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before anything can announce the port
        loop.add_signal_handler(sig, stop.set)
    server = Server(config)
    try:
        await server.start()
    except BaseException:  # e.g. the port is taken: close what start() opened, then report
        await server.stop()
        raise
    hold_full_collections()  # this process is the proxy's own: its collector waits for idle
    log.info("otelproxy listening on http://%s:%d, recording to %s", config.host, server.port,
             config.log_dir)
    _report_limits(config)
    await stop.wait()
    log.info("shutting down: waiting up to %g s for %d stream(s) in flight",
             config.grace_period, server.state.stats.in_flight)
    await server.stop()
    log.info("stopped")
    return 0
