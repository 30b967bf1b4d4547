"""The benchmark's own servers, each run as its own process:
``python -m benchmarks.servers {upstream,bare,otlp} --port N``.

upstream   a fake Anthropic API: ``POST /v1/messages`` answers a short JSON message, or with
           ``"stream": true`` the 150-event answer of ``benchmarks.traffic`` (the number of
           deltas and their spacing can be set per request: ``x-bench-deltas``,
           ``x-bench-interval-ms``; with ``x-bench-stamp`` each delta's text is the time it
           was written, ``traffic.stamped_delta``); ``GET /stats`` counts what it sent;
           ``POST /collector?hold=1`` collects its garbage and holds its collector until
           ``?hold=0`` (the load generator's ``Control.measuring``: the upstream's pacing is
           every target's, and a collection in one round's streams moved only that round's).
bare       the reference: otelproxy's forwarding without the record. Same upstream seam
           (``otelproxy.upstream``: one shared ``ClientSession``, same connector, timeouts and
           header filtering), same body read (the pieces as received, joined only when
           there are several) and ``readany()`` -> ``write()`` response loop; no
           ``Exchange``, no timings, no recorder.
relay      the floor of any proxy: a TCP relay (bytes in, bytes out, nothing parsed) to the
           upstream, on the same event loop; what a hop through a process on another CPU costs
           by itself (a wake-up on each side, the scheduler of that CPU).
otlp       a loopback OTLP/HTTP receiver on Seq's paths; answers 200 and counts spans (SERVER
           spans apart, also by ``service.name``) and log records (``GET /stats``) by decoding
           the protobuf with ``opentelemetry-proto`` when it is installed.

Only 127.0.0.1 is served. uvloop runs every server when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from benchmarks import traffic

HOST = "127.0.0.1"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop when it is installed."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def serve(app: web.Application, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=2048).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _app(path: str, post: Handler, stats: Handler) -> web.Application:
    """An app answering POST ``path`` and ``GET /stats`` (what it counted so far)."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(path, post)
    app.router.add_get("/stats", stats)
    return app


# -- the fake upstream ---------------------------------------------------------------------------


class FakeAnthropic:
    """Answers as fast as it can; a stream follows an absolute schedule."""

    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.deltas_sent = 0
        self.head = traffic.stream_head()
        self.deltas = [traffic.delta_event(i) for i in range(traffic.DELTA_COUNT)]
        self.answer = traffic.json_answer()

    def app(self) -> web.Application:
        app = _app("/v1/messages", self.messages, self.stats)
        app.router.add_post("/collector", self.collector)
        return app

    async def collector(self, request: web.Request) -> web.Response:
        gc.collect()
        if request.query.get("hold") == "1":
            gc.disable()
        else:
            gc.enable()
        return web.json_response({"enabled": gc.isenabled()})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "streams": self.streams,
                                  "deltas_sent": self.deltas_sent})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if b'"stream":true' not in body:
            return web.Response(body=self.answer, content_type="application/json",
                                headers={"request-id": "req_bench"})
        self.streams += 1
        deltas = min(int(request.headers.get("x-bench-deltas", traffic.DELTA_COUNT)),
                     traffic.DELTA_COUNT)
        interval = float(request.headers.get("x-bench-interval-ms", "0")) / 1000
        stamped = traffic.STAMP_HEADER in request.headers
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "request-id": "req_bench"})
        await response.prepare(request)
        for event in self.head:
            await response.write(event)
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for index in range(deltas):
            if interval:
                delay = begin + (index + 1) * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await response.write(traffic.stamped_delta(time.monotonic_ns()) if stamped
                                 else self.deltas[index])
            self.deltas_sent += 1
        await response.write(traffic.stream_tail(deltas))
        await response.write_eof()
        return response


# -- the bare pass-through -----------------------------------------------------------------------


class BarePassThrough:
    """``/{provider}/{host:port}/{path}`` forwarded to ``http://{host:port}/{path}``."""

    async def start(self, app: web.Application) -> AsyncIterator[None]:
        from otelproxy import config as config_module
        from otelproxy.upstream import Upstream

        self.upstream = Upstream(config_module.build({}, list(config_module.DEFAULT_UPSTREAMS)))
        await self.upstream.start()
        yield
        await self.upstream.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024 + 1)
        app.cleanup_ctx.append(self.start)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.StreamResponse:
        from otelproxy.upstream import request_headers, response_headers

        raw_path, _, query = request.raw_path.partition("?")
        segments = raw_path.split("/", 3)  # "", provider, host:port, rest
        if len(segments) < 4:
            return web.Response(status=404)
        url = f"http://{segments[2]}/{segments[3]}" + ("?" + query if query else "")
        parts = [chunk async for chunk in request.content.iter_any()]
        body = parts[0] if len(parts) == 1 else b"".join(parts)  # as otelproxy reads it
        headers = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                   for k, v in request.raw_headers]
        upstream = await self.upstream.send(request.method, url, request_headers(headers),
                                            body)
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason,
                headers=response_headers([
                    (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                    for k, v in upstream.raw_headers]))
            await response.prepare(request)
            reader = upstream.content
            while True:
                data = await reader.readany()
                if not data:
                    break
                await response.write(data)
            await response.write_eof()
        return response


# -- the TCP relay -------------------------------------------------------------------------------


class _Pipe(asyncio.Protocol):
    """One direction of a relayed connection: what arrives is written to ``peer`` at once;
    reading pauses while the peer's write buffer is full."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def relay(port: int, upstream_port: int) -> None:
    """Relay every connection on 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``."""
    loop = asyncio.get_running_loop()

    def accepted() -> _Pipe:
        client = _Pipe()

        async def connect() -> None:
            try:
                _, upstream = await loop.create_connection(_Pipe, HOST, upstream_port)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            client.peer, upstream.peer = upstream, client
            assert upstream.transport is not None
            for data in client.early:
                upstream.transport.write(data)
            client.early.clear()

        connecting.add(task := loop.create_task(connect()))
        task.add_done_callback(connecting.discard)
        return client

    connecting: set[asyncio.Task[None]] = set()
    server = await loop.create_server(accepted, HOST, port, backlog=2048)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


# -- the OTLP receiver ---------------------------------------------------------------------------


class OtlpReceiver:
    """Counts what otelproxy exports, as Seq would receive it."""

    def __init__(self) -> None:
        self.posts = {"logs": 0, "traces": 0}
        self.bytes = 0
        self.spans = 0
        self.server_spans = 0
        self.server_spans_by_service: dict[str, int] = {}
        """SERVER spans by the exporter's ``service.name`` (each target names itself)."""
        self.log_records = 0
        self.undecoded = 0
        try:
            from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        except ImportError:
            self.decodable = False
        else:
            self.decodable = True
            self.logs_request = logs_service_pb2.ExportLogsServiceRequest
            self.trace_request = trace_service_pb2.ExportTraceServiceRequest

    def app(self) -> web.Application:
        return _app("/ingest/otlp/v1/{signal:logs|traces}", self.ingest, self.stats)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "posts": self.posts, "bytes": self.bytes, "decoded": self.decodable,
            "spans": self.spans, "server_spans": self.server_spans,
            "server_spans_by_service": self.server_spans_by_service,
            "log_records": self.log_records, "undecoded_posts": self.undecoded})

    async def ingest(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp has undone any Content-Encoding
        signal_name = request.match_info["signal"]
        self.posts[signal_name] += 1
        self.bytes += len(body)
        if self.decodable:
            try:
                self.count(signal_name, body)
            except Exception:  # a payload we cannot read is counted, never fatal
                self.undecoded += 1
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    def count(self, signal_name: str, body: bytes) -> None:
        server = 2  # Span.SpanKind.SPAN_KIND_SERVER
        if signal_name == "traces":
            for resource in self.trace_request.FromString(body).resource_spans:
                service = next((kv.value.string_value for kv in resource.resource.attributes
                                if kv.key == "service.name"), "")
                for scope in resource.scope_spans:
                    self.spans += len(scope.spans)
                    servers = sum(span.kind == server for span in scope.spans)
                    self.server_spans += servers
                    self.server_spans_by_service[service] = (
                        self.server_spans_by_service.get(service, 0) + servers)
        else:
            for resource_logs in self.logs_request.FromString(body).resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    self.log_records += len(scope_logs.log_records)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.servers")
    parser.add_argument("role", choices=("upstream", "bare", "relay", "otlp"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, help="relay: where to relay to")
    args = parser.parse_args()
    if args.role == "relay":
        run(relay(args.port, args.upstream_port))
        return
    if args.role == "upstream":
        app = FakeAnthropic().app()
    elif args.role == "bare":
        app = BarePassThrough().app()
    else:
        app = OtlpReceiver().app()
    run(serve(app, args.port))


if __name__ == "__main__":
    main()
