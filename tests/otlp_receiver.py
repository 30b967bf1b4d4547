"""A real OTLP/HTTP receiver on Seq's ingestion paths, for the export tests.

It behaves like Seq's ingestion endpoint as far as otelproxy can tell (DESIGN.md §5):
``POST /ingest/otlp/v1/logs`` and ``/ingest/otlp/v1/traces``, http/protobuf only (anything but
``application/x-protobuf`` is refused with 415), the API key in ``X-Seq-ApiKey`` (401 when
missing or wrong), gzip/deflate request bodies accepted (``ExportRequest.size`` is the decoded
size; the ``Content-Length`` header gives the size on the wire). Bodies are decoded with
``opentelemetry-proto`` and flattened into ``SpanData`` / ``LogData`` with plain Python values.

    with OtlpReceiver(api_key="k") as seq:
        proxy = RunningProxy(fake, log_dir, seq_url=seq.url, seq_api_key="k")
        ...
        span = seq.wait_for_spans(1)[0]

``delay`` (seconds before answering) and ``status`` (answer this instead of 200) can be changed
at any time to play a slow or failing Seq; ``answers`` lists statuses for the next exports, one
each, before ``status`` applies again, and ``retry_after`` is sent with every refusal;
``keepalive_timeout`` closes idle client connections sooner (a server dropping a kept
connection); ``unused_url()`` names a port where nobody listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.fake_upstream import LoopThread

LOGS_PATH = "/ingest/otlp/v1/logs"
TRACES_PATH = "/ingest/otlp/v1/traces"
PROTOBUF = "application/x-protobuf"


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value (arrays → lists, kvlists → dicts)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        out[pair.key] = any_value(pair.value)
    return out


@dataclass
class SpanData:
    """One received span, flattened."""

    name: str
    kind: int
    """``Span.SpanKind`` number: 2 SERVER, 3 CLIENT."""
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    """``Status.StatusCode`` number: 0 UNSET, 1 OK, 2 ERROR."""
    status_message: str
    events: list[dict[str, Any]]
    resource: dict[str, Any]
    size: int
    """Serialized size of the span message in bytes."""


@dataclass
class LogData:
    """One received log record, flattened."""

    time_ns: int
    severity_number: int
    severity_text: str
    body: Any
    attributes: dict[str, Any]
    trace_id: str
    span_id: str
    event_name: str
    resource: dict[str, Any]
    size: int
    """Serialized size of the log record message in bytes."""


@dataclass
class ExportRequest:
    """One POST as received (accepted or not)."""

    path: str
    status: int
    headers: dict[str, str]
    size: int
    at: float = field(default_factory=time.monotonic)
    """When it was answered (``time.monotonic()``)."""
    client_port: int = 0
    """The client's port: POSTs on one kept-alive connection share it."""


@dataclass
class OtlpReceiver:
    """An aiohttp OTLP/HTTP server on a ``LoopThread``; see the module docstring."""

    api_key: str = "seq-test-api-key"
    delay: float = 0.0
    status: int = 200
    answers: list[int] = field(default_factory=list)
    retry_after: str | None = None
    ssl_context: ssl.SSLContext | None = None
    """Serve https with this context."""
    keepalive_timeout: float = 75.0
    """An idle client connection is closed after this many seconds (aiohttp's default)."""
    url: str = ""
    port: int = 0
    requests: list[ExportRequest] = field(default_factory=list)
    waiting: int = 0
    """Exports being held back by ``delay`` right now."""
    _spans: list[SpanData] = field(default_factory=list)
    _logs: list[LogData] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: LoopThread | None = None
    _runner: web.AppRunner | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = LoopThread()
        self._loop.start()
        self.port = self._loop.run(self._serve())
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    async def _serve(self) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2,
                                     handler_cancellation=True,
                                     keepalive_timeout=self.keepalive_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        addresses = self._runner.addresses
        return int(addresses[0][1])

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):  # best effort at teardown
                loop.run(runner.cleanup(), timeout=10)
        loop.stop()

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ------------------------------------------------------------------------------

    def spans(self) -> list[SpanData]:
        with self._lock:
            return list(self._spans)

    def logs(self) -> list[LogData]:
        with self._lock:
            return list(self._logs)

    def accepted(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path == path and r.status == 200)

    def wait_for_spans(self, count: int, timeout: float = 15.0) -> list[SpanData]:
        """At least ``count`` spans, waiting up to ``timeout`` seconds for them."""
        deadline = time.monotonic() + timeout
        while len(spans := self.spans()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} span(s), received {len(spans)}")
            time.sleep(0.02)
        return spans

    def wait_for_logs(self, count: int, timeout: float = 15.0) -> list[LogData]:
        """At least ``count`` log records, waiting up to ``timeout`` seconds for them."""
        deadline = time.monotonic() + timeout
        while len(logs := self.logs()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} log record(s), received {len(logs)}")
            time.sleep(0.02)
        return logs

    # -- the endpoint ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        status = self._check(request)
        body = b""
        if status == 200:
            body = await request.read()  # aiohttp decodes a gzip/deflate Content-Encoding
            if self.delay > 0:
                self.waiting += 1
                try:
                    await asyncio.sleep(self.delay)
                finally:
                    self.waiting -= 1
            with self._lock:
                status = self.answers.pop(0) if self.answers else self.status
        with self._lock:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.requests.append(ExportRequest(request.path, status, dict(request.headers),
                                               len(body), client_port=peer[1] if peer else 0))
        if status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.Response(status=status, text=f"refused with {status}", headers=headers)
        if request.path == TRACES_PATH:
            self._store_traces(ExportTraceServiceRequest.FromString(body))
            answer = ExportTraceServiceResponse().SerializeToString()
        else:
            self._store_logs(ExportLogsServiceRequest.FromString(body))
            answer = ExportLogsServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type=PROTOBUF)

    def _check(self, request: web.Request) -> int:
        if request.path not in (LOGS_PATH, TRACES_PATH):
            return 404
        if request.method != "POST":
            return 405
        if request.headers.get("Content-Type", "").split(";")[0].strip().lower() != PROTOBUF:
            return 415
        if request.headers.get("X-Seq-ApiKey") != self.api_key:
            return 401
        return 200

    def _store_traces(self, message: ExportTraceServiceRequest) -> None:
        received: list[SpanData] = []
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(SpanData(
                        name=span.name, kind=span.kind, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                        attributes=attributes(span.attributes), status_code=span.status.code,
                        status_message=span.status.message,
                        events=[{"name": e.name, "time_ns": e.time_unix_nano,
                                 **attributes(e.attributes)} for e in span.events],
                        resource=resource, size=span.ByteSize(),
                    ))
        with self._lock:
            self._spans.extend(received)

    def _store_logs(self, message: ExportLogsServiceRequest) -> None:
        received: list[LogData] = []
        for resource_logs in message.resource_logs:
            resource = attributes(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    received.append(LogData(
                        time_ns=record.time_unix_nano, severity_number=record.severity_number,
                        severity_text=record.severity_text, body=any_value(record.body),
                        attributes=attributes(record.attributes),
                        trace_id=record.trace_id.hex(), span_id=record.span_id.hex(),
                        event_name=record.event_name, resource=resource,
                        size=record.ByteSize(),
                    ))
        with self._lock:
            self._logs.extend(received)


def unused_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
