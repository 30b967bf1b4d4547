"""OpenTelemetry export (to Seq): one span and two log records per exchange.

The local JSONL + SQLite record is the complete copy; this sink is the live, searchable view.
It is built *after* the exchange, from the finished ``Record``, on this sink's own worker thread
inside the recorder process (``otelproxy.recorder``), never in the proxy's process:

    pipeline ──submit()──► [bounded queue] ──otlp thread──► span + 2 log records
                                                                    │ SDK batch processors
                                                                    ▼ (own threads, bounded)
                                                     OTLP/HTTP protobuf ──► Seq /ingest/otlp/v1/…

Per exchange:

- a SERVER span from the request's arrival to the last byte sent back (explicit start/end
  timestamps, converted from the exchange's monotonic clock), named ``chat {model}`` for a
  session-tracked LLM call and ``{METHOD} {route}`` otherwise (ids in the path become ``{id}``);
  status ERROR for 5xx, upstream errors and aborts. A child CLIENT span covers the upstream
  call. One span event per stream chunk only with ``otlp_chunk_events``.
- two log records in that span's context (so Seq links them to the trace): ``request`` and
  ``response``, each with a short string body (Seq's ``@Message``), severity INFO, WARN for 4xx,
  ERROR for 5xx and aborts. Bodies travel only on these records, each cut at ``otlp_max_body``
  bytes with ``<name>.truncated = true`` beside it, so an event stays under Seq's size limit
  however long a conversation grows. Bodies and headers come from the ``Record``, which is
  already redacted; the exchange's raw headers are read for ``traceparent`` only.

Attributes (names are a contract). On the span and both records, when known:
``session.id``, ``session.seq``, ``session.parent_id`` + ``session.fork.from_seq`` (forks only),
``gen_ai.conversation.id`` (= session.id), ``client.session_id`` (``X-Claude-Code-Session-Id``),
``proxy.exchange.id``; ``http.request.method``, ``url.path`` (the upstream path), ``url.query``,
``http.response.status_code``, ``server.address``/``server.port`` (the upstream, as in the GenAI
conventions), ``user_agent.original``; ``gen_ai.provider.name``, ``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.request.stream``, ``gen_ai.response.model``,
``gen_ai.response.id``, ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.usage.cache_creation.input_tokens``; ``proxy.ttfb_ms``, ``proxy.total_ms``,
``proxy.overhead_ms``, ``proxy.outcome`` (``complete|client_aborted|upstream_aborted|
upstream_error``, or ``rejected`` for a request the proxy refused), ``error.type`` (on errors),
``http.request.body.size``, ``http.response.body.size`` (bytes on the wire); for streams
``stream.chunk_count`` and ``stream.chunk_offsets_ms`` (ms from the request's arrival to each
SSE event, the same events as the local record's ``chunks``).
Only on ``request``: ``http.request.header.<name>``, and for a tracked call
``gen_ai.input.messages.new`` (JSON of the messages added since the session's previous turn)
and ``gen_ai.system_instructions.sha256``, otherwise ``http.request.body.content``.
Only on ``response``: ``http.response.header.<name>``, and for a tracked call
``gen_ai.output.messages`` (JSON array holding the reassembled assistant message), otherwise
``http.response.body.content``; ``proxy.error`` when the exchange failed. ``proxy.record``
(``request``/``response``) tells the two apart in Seq. Header values are plain strings (repeats
joined by ``, ``) so Seq filters on them directly.

Propagation. A ``traceparent`` sent by the client is extracted with the W3C propagator and the
span joins the client's trace. Nothing is ever injected: the proxy forwards the client's bytes
and headers unchanged, so the aiohttp-client instrumentation is deliberately *not* enabled on
the upstream session (it injects ``traceparent`` into every outgoing request through the global
propagator), and no global tracer/logger provider or propagator is installed. This module uses
its own ``TracerProvider`` and ``LoggerProvider``.

Never in the way. ``submit`` only enqueues (drops counted when full). The SDK's batch
processors export; before handing telemetry over, the sink checks that their queues have room
(counting what is in flight) and otherwise drops the exchange and counts it, so nothing is
evicted silently. Failed exports (Seq down, slow, 5xx — the exporter retries 429/502/503/504
until its timeout) are counted too. Counters appear on ``/healthz`` (``otlp_*``), losses are
reported as one WARN line at most once a minute, and the SDK's own per-batch error lines are
rate-limited to one per minute per logger. ``flush``/``shutdown`` are bounded by their timeout.

Configuration (``resolve``): ``--seq-url URL`` → ``URL/ingest/otlp/v1/{traces,logs}`` (it wins
over every ``OTEL_EXPORTER_OTLP_*ENDPOINT``), ``--seq-api-key`` → header ``X-Seq-ApiKey`` (wins
over the same header from ``OTEL_EXPORTER_OTLP_HEADERS``). Otherwise the standard variables:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``, ``/v1/logs``), the per-signal
``OTEL_EXPORTER_OTLP_{TRACES,LOGS}_ENDPOINT`` (used as given), ``…[_{SIGNAL}]_HEADERS``,
``…[_{SIGNAL}]_PROTOCOL`` (only ``http/protobuf``: Seq accepts nothing else),
``OTEL_EXPORTER_OTLP_TIMEOUT`` (seconds, as the Python SDK reads it; default 10, which bounds
every export), ``OTEL_EXPORTER_OTLP_COMPRESSION``, ``OTEL_SERVICE_NAME`` (default ``otelproxy``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*`` / ``OTEL_BLRP_*`` (the log batch size defaults to
64 instead of 512 so a batch of records with 64 KiB bodies stays under Seq's request limit),
``OTEL_{TRACES,LOGS}_EXPORTER=none`` and ``OTEL_SDK_DISABLED=true``. Nothing configured → no
sink, nothing tried. Header values (the API key) are never logged.
"""

from __future__ import annotations

import codecs
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import orjson
from opentelemetry import trace
from opentelemetry._logs import Logger, SeverityNumber
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LogRecordLimits, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import AttributeValue

from otelproxy import __version__
from otelproxy.config import PROVIDERS, Config
from otelproxy.errors import ConfigError
from otelproxy.pipeline import Sink, Worker
from otelproxy.record import Outcome, Record

log = logging.getLogger("otelproxy.otlp")

Attributes = dict[str, AttributeValue]

SIGNALS: Final = ("traces", "logs")
SEQ_INGEST_PATH: Final = "/ingest/otlp"
DEFAULT_SERVICE_NAME: Final = "otelproxy"
DEFAULT_TIMEOUT_S: Final = 10.0
MAX_CHUNK_OFFSETS: Final = 8192
"""``stream.chunk_offsets_ms`` keeps the first this many chunks (``….truncated`` beside it)."""
WARN_INTERVAL_S: Final = 60.0
_ABORTS: Final = frozenset({Outcome.CLIENT_ABORTED, Outcome.UPSTREAM_ABORTED,
                            Outcome.UPSTREAM_ERROR})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_SDK_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk._shared_internal",
)


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSettings:
    """One batch processor's knobs (``OTEL_BSP_*`` for spans, ``OTEL_BLRP_*`` for logs)."""

    schedule_delay_ms: int
    max_queue_size: int
    max_export_batch_size: int
    export_timeout_ms: int


@dataclass(frozen=True)
class ExportSettings:
    """Where and how to export; built once by ``resolve``. ``headers`` hold the API key."""

    traces_endpoint: str | None
    logs_endpoint: str | None
    traces_headers: Mapping[str, str] = field(repr=False)
    logs_headers: Mapping[str, str] = field(repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: Compression = Compression.NoCompression
    resource: Mapping[str, str] = field(default_factory=dict)
    spans: BatchSettings = BatchSettings(5000, 2048, 512, 30000)
    logs: BatchSettings = BatchSettings(1000, 2048, 64, 30000)
    max_body: int = 64 * 1024
    chunk_events: bool = False


def resolve(config: Config, env: Mapping[str, str]) -> ExportSettings | None:
    """The export settings from config + OTel environment, or None when nothing is configured."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoints = {signal: _endpoint(config, env, signal) for signal in SIGNALS}
    if not any(endpoints.values()):
        if config.seq_api_key:
            log.warning("a Seq API key is configured but no endpoint (--seq-url or "
                        "OTEL_EXPORTER_OTLP_ENDPOINT): OTLP export is off")
        return None
    for signal in SIGNALS:
        protocol = _signal_env(env, signal, "PROTOCOL")
        if endpoints[signal] and protocol and protocol.strip().lower() != "http/protobuf":
            raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported "
                              "(otelproxy exports http/protobuf, the only protocol Seq accepts)")
    headers = {signal: _headers(config, env, signal) for signal in SIGNALS}
    return ExportSettings(
        traces_endpoint=endpoints["traces"],
        logs_endpoint=endpoints["logs"],
        traces_headers=headers["traces"],
        logs_headers=headers["logs"],
        timeout_s=_timeout(env),
        compression=_compression(env),
        resource=_resource(env),
        spans=_batch(env, "OTEL_BSP", BatchSettings(5000, 2048, 512, 30000)),
        logs=_batch(env, "OTEL_BLRP", BatchSettings(1000, 2048, 64, 30000)),
        max_body=config.otlp_max_body,
        chunk_events=config.otlp_chunk_events,
    )


def seq_ingest_base(seq_url: str) -> str:
    """``http://seq:5341`` → ``http://seq:5341/ingest/otlp`` (kept when already there)."""
    base = seq_url.rstrip("/")
    return base if base.endswith(SEQ_INGEST_PATH) else base + SEQ_INGEST_PATH


def _signal_env(env: Mapping[str, str], signal: str, suffix: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_{SIGNAL}_{suffix}``, else ``OTEL_EXPORTER_OTLP_{suffix}``."""
    for key in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
        value = env.get(key, "").strip()
        if value:
            return value
    return None


def _endpoint(config: Config, env: Mapping[str, str], signal: str) -> str | None:
    if env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower() == "none":
        return None
    if config.seq_url:
        url = f"{seq_ingest_base(config.seq_url)}/v1/{signal}"
        what = "seq_url"
    elif specific := env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip():
        url, what = specific, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
    elif generic := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        url, what = f"{generic.rstrip('/')}/v1/{signal}", "OTEL_EXPORTER_OTLP_ENDPOINT"
    else:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ConfigError(f"{what}: malformed URL ({exc})") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"{what}: expected an http(s)://host[:port]/… URL")
    return url


def _headers(config: Config, env: Mapping[str, str], signal: str) -> dict[str, str]:
    raw = env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_HEADERS", "").strip()
    raw = raw or env.get("OTEL_EXPORTER_OTLP_HEADERS", "")
    headers = dict(parse_env_headers(raw, liberal=True))
    if config.seq_api_key:
        headers["x-seq-apikey"] = config.seq_api_key
    return headers


def _timeout(env: Mapping[str, str]) -> float:
    raw = env.get("OTEL_EXPORTER_OTLP_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT: expected seconds, got {raw!r}") from None
    if not 0 < value <= 600:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT: {value} is out of range (0..600 s)")
    return value


def _compression(env: Mapping[str, str]) -> Compression:
    raw = (env.get("OTEL_EXPORTER_OTLP_COMPRESSION", "").strip() or "none").lower()
    try:
        return Compression(raw)
    except ValueError:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION: expected gzip|deflate|none, "
                          f"got {raw!r}") from None


def _resource(env: Mapping[str, str]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[unquote(key.strip())] = unquote(value.strip())
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        attributes["service.name"] = service
    attributes.setdefault("service.name", DEFAULT_SERVICE_NAME)
    attributes.setdefault("service.version", __version__)
    return attributes


def _batch(env: Mapping[str, str], prefix: str, default: BatchSettings) -> BatchSettings:
    def number(suffix: str, fallback: int) -> int:
        key = f"{prefix}_{suffix}"
        raw = env.get(key, "").strip()
        if not raw:
            return fallback
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
        return value

    settings = BatchSettings(
        schedule_delay_ms=number("SCHEDULE_DELAY", default.schedule_delay_ms),
        max_queue_size=number("MAX_QUEUE_SIZE", default.max_queue_size),
        max_export_batch_size=number("MAX_EXPORT_BATCH_SIZE", default.max_export_batch_size),
        export_timeout_ms=number("EXPORT_TIMEOUT", default.export_timeout_ms),
    )
    if settings.max_export_batch_size > settings.max_queue_size:
        settings = BatchSettings(settings.schedule_delay_ms, settings.max_queue_size,
                                 settings.max_queue_size, settings.export_timeout_ms)
    return settings


def build_sink(config: Config, env: Mapping[str, str]) -> Sink | None:
    """The OTLP sink when export is configured (``--seq-url`` or ``OTEL_EXPORTER_OTLP_*``)."""
    settings = resolve(config, env)
    if settings is None:
        return None
    sink = OtlpSink(settings)
    sink.start()
    log.info("exporting OTLP (http/protobuf): traces → %s, logs → %s, service %s",
             _safe_url(settings.traces_endpoint), _safe_url(settings.logs_endpoint),
             settings.resource["service.name"])
    return sink


def _safe_url(url: str | None) -> str:
    """An endpoint for a log line: no userinfo, no query."""
    if url is None:
        return "off"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


# -- what an exchange becomes (pure functions of the record) ------------------------------------


def header_value(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    lower = name.lower()
    return next((value for key, value in headers if key.lower() == lower), None)


def route(path: str) -> str:
    """A low-cardinality route: path segments that look like ids become ``{id}``."""
    segments = path.split("?", 1)[0].split("/")
    return "/".join(seg if _is_static(seg) else "{id}" for seg in segments)


def _is_static(segment: str) -> bool:
    if segment == "" or (segment[:1] == "v" and segment[1:].isdigit()):
        return True
    return (len(segment) <= 40 and segment.replace("_", "").replace("-", "").isalpha()
            and segment.islower())


def span_name(record: Record) -> str:
    """``chat {model}`` for a tracked LLM call, ``{METHOD} {route}`` otherwise."""
    exchange = record.exchange
    parsed = record.parsed
    if parsed.tracked and parsed.operation:
        return f"{parsed.operation} {parsed.model}" if parsed.model else parsed.operation
    if exchange.outcome is Outcome.REJECTED:
        return exchange.method  # no route: the path named nothing we forward to
    return f"{exchange.method} {route(exchange.path)}"


def is_error(record: Record) -> bool:
    """5xx, upstream errors and aborts."""
    exchange = record.exchange
    return exchange.outcome in _ABORTS or (exchange.status or 0) >= 500


def severity(record: Record) -> tuple[SeverityNumber, str]:
    """INFO; WARN for 4xx; ERROR for 5xx, upstream errors and aborts."""
    if is_error(record):
        return SeverityNumber.ERROR, "ERROR"
    if 400 <= (record.exchange.status or 0) < 500:
        return SeverityNumber.WARN, "WARN"
    return SeverityNumber.INFO, "INFO"


def error_type(record: Record) -> str | None:
    exchange = record.exchange
    if exchange.outcome in _ABORTS:
        return str(exchange.outcome)
    if (exchange.status or 0) >= 500:
        return str(exchange.status)
    return None


def wall_ns(record: Record, monotonic_ns: int | None) -> int:
    """An exchange's monotonic timestamp as nanoseconds since the epoch."""
    exchange = record.exchange
    base = int(exchange.started_wall * 1e9)
    return base + ((monotonic_ns or exchange.started_ns) - exchange.started_ns)


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _origin(upstream_url: str) -> tuple[str | None, int | None]:
    if not upstream_url:
        return None, None
    parts = urlsplit(upstream_url)
    return parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme)


def _put(attributes: Attributes, key: str, value: AttributeValue | None) -> None:
    if value is not None:
        attributes[key] = value


def common_attributes(record: Record) -> Attributes:
    """Attributes on the span and on both log records."""
    exchange = record.exchange
    parsed = record.parsed
    session = record.session
    out: Attributes = {}
    if session is not None:
        out["session.id"] = session.id
        out["session.seq"] = session.seq
        out["gen_ai.conversation.id"] = session.id
        if session.parent_id is not None:
            out["session.parent_id"] = session.parent_id
            _put(out, "session.fork.from_seq", session.fork_from_seq)
    client_session = session.client_session_id if session is not None else None
    client_session = client_session or header_value(record.request_headers,
                                                    "x-claude-code-session-id")
    _put(out, "client.session_id", client_session)
    out["proxy.exchange.id"] = exchange.id

    out["http.request.method"] = exchange.method
    out["url.path"] = exchange.path
    if exchange.query:
        out["url.query"] = exchange.query  # redacted by the Redact processor
    _put(out, "http.response.status_code", exchange.status)
    host, port = _origin(exchange.upstream_url)
    _put(out, "server.address", host)
    _put(out, "server.port", port)
    _put(out, "user_agent.original", header_value(record.request_headers, "user-agent"))

    if exchange.provider in PROVIDERS:
        out["gen_ai.provider.name"] = exchange.provider
    _put(out, "gen_ai.operation.name", parsed.operation)
    _put(out, "gen_ai.request.model", parsed.model)
    _put(out, "gen_ai.request.stream", parsed.stream)
    _put(out, "gen_ai.response.model", parsed.response_model)
    _put(out, "gen_ai.response.id", parsed.response_id)
    if parsed.finish_reasons:
        out["gen_ai.response.finish_reasons"] = list(parsed.finish_reasons)
    usage = parsed.usage
    _put(out, "gen_ai.usage.input_tokens", usage.input_tokens)
    _put(out, "gen_ai.usage.output_tokens", usage.output_tokens)
    _put(out, "gen_ai.usage.cache_read.input_tokens", usage.cache_read_input_tokens)
    _put(out, "gen_ai.usage.cache_creation.input_tokens", usage.cache_creation_input_tokens)

    first_ns = exchange.chunks[0][0] if exchange.chunks else exchange.headers_ns
    if first_ns is not None:
        out["proxy.ttfb_ms"] = _ms(first_ns - exchange.started_ns)
    finished = exchange.finished_ns or exchange.started_ns
    out["proxy.total_ms"] = _ms(finished - exchange.started_ns)
    out["proxy.overhead_ms"] = _ms(exchange.proxy_ns)
    out["proxy.outcome"] = str(exchange.outcome)
    _put(out, "error.type", error_type(record))
    out["http.request.body.size"] = len(exchange.request_body)
    out["http.response.body.size"] = exchange.response_size

    if record.streaming:
        offsets = [int((event.ns - exchange.started_ns) // 1_000_000) for event in record.events]
        out["stream.chunk_count"] = len(offsets)
        out["stream.chunk_offsets_ms"] = offsets[:MAX_CHUNK_OFFSETS]
        if len(offsets) > MAX_CHUNK_OFFSETS:
            out["stream.chunk_offsets_ms.truncated"] = True
    return out


def header_attributes(prefix: str, headers: Sequence[tuple[str, str]]) -> Attributes:
    """``{prefix}.{lower-case name}`` → the (already obfuscated) value; repeats joined by ``, ``.

    A plain string rather than semconv's string array: Seq filters on it directly
    (``http.response.header.'request-id' = '…'``) and it is cheaper to validate and encode.
    """
    out: dict[str, str] = {}
    for name, value in headers:
        key = f"{prefix}.{name.lower()}"
        out[key] = f"{out[key]}, {value}" if key in out else value
    return dict(out)


def _json_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # e.g. an integer beyond 64 bits in a client's JSON
        return json.dumps(value, ensure_ascii=False, default=str).encode()


def put_body(attributes: Attributes, key: str, data: bytes, limit: int) -> None:
    """``key`` = the body as text, cut at ``limit`` bytes with ``key.truncated = true`` beside."""
    if len(data) <= limit:
        attributes[key] = data.decode("utf-8", "replace")
        return
    # An incremental decoder holds back a character the cut split in two.
    attributes[key] = codecs.getincrementaldecoder("utf-8")("replace").decode(data[:limit])
    attributes[f"{key}.truncated"] = True


def request_record_attributes(record: Record, max_body: int) -> Attributes:
    """What only the ``request`` log record carries: request headers and body."""
    parsed = record.parsed
    session = record.session
    out = header_attributes("http.request.header", record.request_headers)
    if parsed.tracked:
        new_messages = session.new_messages if session is not None else None
        if new_messages is None:
            new_messages = parsed.messages  # no history known: the whole conversation is new
        if new_messages is not None:
            put_body(out, "gen_ai.input.messages.new", _json_bytes(new_messages), max_body)
        if session is not None:
            _put(out, "gen_ai.system_instructions.sha256", session.system_sha256)
    elif record.request_body:
        put_body(out, "http.request.body.content", record.request_body, max_body)
    return out


def response_record_attributes(record: Record, max_body: int) -> Attributes:
    """What only the ``response`` log record carries: response headers and body."""
    parsed = record.parsed
    out = header_attributes("http.response.header", record.response_headers)
    if parsed.tracked and parsed.output_message is not None:
        put_body(out, "gen_ai.output.messages", _json_bytes([parsed.output_message]), max_body)
    elif record.response_body:
        put_body(out, "http.response.body.content", record.response_body, max_body)
    if record.exchange.error:
        out["proxy.error"] = record.exchange.error
    return out


def request_summary(record: Record) -> str:
    """``POST /v1/messages claude-x session 20260113-102345-ab12 #3``."""
    exchange = record.exchange
    parts = [exchange.method, exchange.path]
    if record.parsed.model:
        parts.append(record.parsed.model)
    if record.session is not None:
        parts.append(f"session {record.session.id} #{record.session.seq}")
    return " ".join(parts)


def response_summary(record: Record) -> str:
    """``POST /v1/messages 200 claude-x 1.8 s in=1200 out=310``."""
    exchange = record.exchange
    parsed = record.parsed
    parts = [exchange.method, exchange.path, str(exchange.status or "-")]
    model = parsed.response_model or parsed.model
    if model:
        parts.append(model)
    finished = exchange.finished_ns or exchange.started_ns
    parts.append(f"{(finished - exchange.started_ns) / 1e9:.1f} s")
    if parsed.usage.input_tokens is not None:
        parts.append(f"in={parsed.usage.input_tokens}")
    if parsed.usage.output_tokens is not None:
        parts.append(f"out={parsed.usage.output_tokens}")
    if exchange.outcome is not Outcome.COMPLETE:
        parts.append(str(exchange.outcome))
    return " ".join(parts)


def _client_carrier(record: Record) -> dict[str, list[str]]:
    """The client's raw request headers, for extracting ``traceparent``/``tracestate`` only."""
    carrier: dict[str, list[str]] = {}
    for name, value in record.exchange.request_headers:
        lower = name.lower()
        if lower in ("traceparent", "tracestate"):
            carrier.setdefault(lower, []).append(value)
    return carrier


# -- the sink -------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Telemetry handed to the SDK and not yet through an export, per signal; and the losses."""

    capacity: dict[str, int]
    outstanding: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    exported: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    dropped: int = 0
    """Exchanges not handed to the SDK: our queue or the SDK's queues were full."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, wanted: Mapping[str, int]) -> bool:
        """Claim room in the SDK queues for one exchange's telemetry, or count a drop."""
        with self.lock:
            if any(self.outstanding[s] + n > self.capacity[s] for s, n in wanted.items()):
                self.dropped += 1
                return False
            for signal, count in wanted.items():
                self.outstanding[signal] += count
            return True

    def done(self, signal: str, count: int, ok: bool) -> None:
        with self.lock:
            self.outstanding[signal] -= count
            (self.exported if ok else self.failed)[signal] += count

    def drop(self) -> None:
        with self.lock:
            self.dropped += 1

    def losses(self) -> tuple[int, int]:
        with self.lock:
            return self.dropped, sum(self.failed.values())


class _Counting:
    """What both counting exporters share: delegate to the OTLP exporter, count what was
    delivered and what was lost, report losses, and stop only once."""

    def __init__(self, inner: OTLPSpanExporter | OTLPLogExporter, signal: str, tally: _Tally,
                 report: Callable[[], None]) -> None:
        self.inner = inner
        self._signal = signal
        self._tally = tally
        self._report = report
        self._closed = False

    def _export(self, batch: Sequence[Any], success: Any, failure: Any) -> Any:
        result = failure
        try:
            result = self.inner.export(batch)
        finally:
            self._tally.done(self._signal, len(batch), result is success)
            if result is not success:
                self._report()
        return result

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.inner.shutdown()  # type: ignore[no-untyped-call]

    abort = shutdown
    """Stop now: pending retries give up, later exports fail at once."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _CountingSpanExporter(_Counting, SpanExporter):
    def __init__(self, inner: OTLPSpanExporter, tally: _Tally, report: Callable[[], None]) -> None:
        super().__init__(inner, "traces", tally, report)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result: SpanExportResult = self._export(
            spans, SpanExportResult.SUCCESS, SpanExportResult.FAILURE)
        return result


class _CountingLogExporter(_Counting, LogRecordExporter):
    def __init__(self, inner: OTLPLogExporter, tally: _Tally, report: Callable[[], None]) -> None:
        super().__init__(inner, "logs", tally, report)

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        result: LogRecordExportResult = self._export(
            batch, LogRecordExportResult.SUCCESS, LogRecordExportResult.FAILURE)
        return result


class _OncePerInterval(logging.Filter):
    """Lets one record per logger and level through per interval (the SDK logs every batch)."""

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno)
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return False
            self._last[key] = now
            return True


def _quiet_sdk_loggers() -> None:
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerInterval) for f in logger.filters):
            logger.addFilter(_OncePerInterval())


def _run_bounded(what: str, action: Callable[[], bool], timeout: float) -> bool:
    """Run ``action`` on a daemon thread; its result if it finished in time, else False."""
    outcome: list[bool] = []

    def target() -> None:
        try:
            outcome.append(action())
        except Exception as exc:
            log.error("OTLP %s failed: %s", what, exc)
            outcome.append(False)

    thread = threading.Thread(target=target, name=f"otelproxy-otlp-{what}", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    return bool(outcome) and outcome[0]


class OtlpSink(Worker):
    """Sink turning each record into a span and two log records for the OTel batch exporters."""

    def __init__(self, settings: ExportSettings, maxsize: int = 2048) -> None:
        super().__init__("otlp", maxsize)
        self.settings = settings
        self._tally = _Tally({"traces": settings.spans.max_queue_size,
                              "logs": settings.logs.max_queue_size})
        self._warn_lock = threading.Lock()
        self._last_warn = -WARN_INTERVAL_S
        self._warned_losses = 0
        self._span_exporter: _CountingSpanExporter | None = None
        self._log_exporter: _CountingLogExporter | None = None
        resource = Resource.create(dict(settings.resource))
        _quiet_sdk_loggers()

        self.tracer_provider = TracerProvider(
            sampler=ALWAYS_ON, resource=resource, shutdown_on_exit=False,
            span_limits=SpanLimits(max_span_attributes=512, max_events=MAX_CHUNK_OFFSETS + 16,
                                   max_attributes=512),
        )
        if settings.traces_endpoint:
            self._span_exporter = _CountingSpanExporter(
                OTLPSpanExporter(endpoint=settings.traces_endpoint,
                                 headers=dict(settings.traces_headers),
                                 timeout=settings.timeout_s, compression=settings.compression),
                self._tally, self._report_losses)
            batch = settings.spans
            self.tracer_provider.add_span_processor(BatchSpanProcessor(
                self._span_exporter, max_queue_size=batch.max_queue_size,
                schedule_delay_millis=batch.schedule_delay_ms,
                max_export_batch_size=batch.max_export_batch_size,
                export_timeout_millis=batch.export_timeout_ms))
        self.tracer = self.tracer_provider.get_tracer("otelproxy", __version__)

        self.logger_provider = LoggerProvider(
            resource=resource, shutdown_on_exit=False,
            log_record_limits=LogRecordLimits(max_attributes=512),
        )
        if settings.logs_endpoint:
            self._log_exporter = _CountingLogExporter(
                OTLPLogExporter(endpoint=settings.logs_endpoint,
                                headers=dict(settings.logs_headers),
                                timeout=settings.timeout_s, compression=settings.compression),
                self._tally, self._report_losses)
            batch = settings.logs
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(
                self._log_exporter, max_queue_size=batch.max_queue_size,
                schedule_delay_millis=batch.schedule_delay_ms,
                max_export_batch_size=batch.max_export_batch_size,
                export_timeout_millis=batch.export_timeout_ms))
        self.logger: Logger = self.logger_provider.get_logger("otelproxy", __version__)

    # -- Sink protocol ---------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Enqueue without blocking; a full queue drops the exchange (counted, reported)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:  # not ``Worker.put``: its error line per 100 drops is too chatty here
            self._tally.drop()
            self._report_losses()

    def counters(self) -> dict[str, int]:
        tally = self._tally
        with tally.lock:
            return {
                "otlp_exported_spans": tally.exported["traces"],
                "otlp_exported_logs": tally.exported["logs"],
                "otlp_export_failed": sum(tally.failed.values()),
                "otlp_dropped": tally.dropped,
                "otlp_pending": self.pending + sum(tally.outstanding.values()),
                "otlp_errors": self.failures.total,
            }

    def flush(self, timeout: float) -> bool:
        """Hand everything queued to the SDK and let it export, within ``timeout``."""
        deadline = time.monotonic() + timeout
        handed = super().flush(timeout)
        exported = _run_bounded("flush", self._force_flush, deadline - time.monotonic())
        return handed and exported

    def shutdown(self, timeout: float) -> bool:
        """Flush within ``timeout``, then stop the exporters (abandoning what is left)."""
        deadline = time.monotonic() + timeout
        done = super().shutdown(timeout)  # our queue drained, SDK flushed (see ``flush``)
        if not done:
            for exporter in (self._span_exporter, self._log_exporter):
                if exporter is not None:
                    exporter.abort()
        closed = _run_bounded("shutdown", self._close_providers,
                              max(0.1, deadline - time.monotonic()))
        dropped, failed = self._tally.losses()
        with self._tally.lock:
            undelivered = sum(self._tally.outstanding.values())
        if dropped or failed or undelivered:
            log.warning("OTLP export stopped: %d exchange(s) dropped, %d span(s)/log record(s) "
                        "failed to export, %d not delivered at shutdown",
                        dropped, failed, undelivered)
        return done and closed

    def _force_flush(self) -> bool:
        traces = self.tracer_provider.force_flush()
        return self.logger_provider.force_flush() and traces

    def _close_providers(self) -> bool:
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()
        return True

    def _report_losses(self) -> None:
        """One WARN line at most once a minute while telemetry is being lost."""
        dropped, failed = self._tally.losses()
        now = time.monotonic()
        with self._warn_lock:
            if dropped + failed == self._warned_losses or now - self._last_warn < WARN_INTERVAL_S:
                return
            self._warned_losses = dropped + failed
            self._last_warn = now
        log.warning("OTLP export to %s is losing telemetry: %d exchange(s) dropped (queue full), "
                    "%d span(s)/log record(s) failed to export so far (the local record is "
                    "complete)", _safe_url(self.settings.logs_endpoint
                                           or self.settings.traces_endpoint), dropped, failed)

    # -- on the worker thread --------------------------------------------------------------------

    def handle(self, item: object) -> None:
        assert isinstance(item, Record)
        self.emit(item)

    def emit(self, record: Record) -> None:
        """Build and hand over the span(s) and the two log records of one exchange."""
        exchange = record.exchange
        settings = self.settings
        # Everything that could raise on odd input is computed before claiming queue room.
        common = common_attributes(record)
        request_attributes = {**common, "proxy.record": "request",
                              **request_record_attributes(record, settings.max_body)}
        response_attributes = {**common, "proxy.record": "response",
                               **response_record_attributes(record, settings.max_body)}
        start_ns = wall_ns(record, exchange.started_ns)
        end_ns = wall_ns(record, exchange.finished_ns)
        parent = _PROPAGATOR.extract(_client_carrier(record), context=Context())
        number, text = severity(record)

        client_span = exchange.forwarded_ns is not None and exchange.outcome is not Outcome.REJECTED
        wanted: dict[str, int] = {}
        if self._span_exporter is not None:
            wanted["traces"] = 2 if client_span else 1
        if self._log_exporter is not None:
            wanted["logs"] = 2
        if not self._tally.reserve(wanted):
            self._report_losses()
            return

        span = self.tracer.start_span(span_name(record), context=parent, kind=SpanKind.SERVER,
                                      attributes=common, start_time=start_ns)
        context = trace.set_span_in_context(span, parent)
        if client_span:
            self._client_span(record, context)
        if settings.chunk_events and record.streaming:
            for index, event in enumerate(record.events[:MAX_CHUNK_OFFSETS]):
                span.add_event("stream.chunk", {
                    "stream.chunk.index": index,
                    "stream.chunk.offset_ms": _ms(event.ns - exchange.started_ns),
                    "stream.chunk.size": len(event.raw),
                }, timestamp=wall_ns(record, event.ns))
        if is_error(record):
            span.set_status(Status(StatusCode.ERROR, exchange.error or f"HTTP {exchange.status}"))
        span.end(end_time=end_ns)

        now = time.time_ns()
        self.logger.emit(timestamp=start_ns, observed_timestamp=now, context=context,
                         severity_number=number, severity_text=text,
                         body=request_summary(record), event_name="request",
                         attributes=request_attributes)
        self.logger.emit(timestamp=end_ns, observed_timestamp=now, context=context,
                         severity_number=number, severity_text=text,
                         body=response_summary(record), event_name="response",
                         attributes=response_attributes)

    def _client_span(self, record: Record, context: Context) -> None:
        """The upstream call, as a child CLIENT span (nothing was injected into it)."""
        exchange = record.exchange
        host, port = _origin(exchange.upstream_url)
        query = f"?{exchange.query}" if exchange.query else ""
        attributes: Attributes = {
            "http.request.method": exchange.method,
            "url.full": f"{exchange.upstream_url}{exchange.path}{query}",
            "proxy.exchange.id": exchange.id,
        }
        _put(attributes, "server.address", host)
        _put(attributes, "server.port", port)
        if not exchange.generated_response:
            _put(attributes, "http.response.status_code", exchange.status)
        upstream_failed = exchange.outcome in (Outcome.UPSTREAM_ERROR, Outcome.UPSTREAM_ABORTED)
        failed = upstream_failed or (not exchange.generated_response
                                     and (exchange.status or 0) >= 500)
        if failed:
            attributes["error.type"] = (str(exchange.outcome) if upstream_failed
                                        else str(exchange.status))
        span = self.tracer.start_span(f"{exchange.method} {route(exchange.path)}",
                                      context=context, kind=SpanKind.CLIENT,
                                      attributes=attributes,
                                      start_time=wall_ns(record, exchange.forwarded_ns))
        if failed:
            span.set_status(Status(StatusCode.ERROR, exchange.error or f"HTTP {exchange.status}"))
        span.end(end_time=wall_ns(record, exchange.finished_ns))
