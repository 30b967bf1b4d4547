"""OpenTelemetry export (to Seq): one span and two log records per exchange.

The local JSONL + SQLite record is the complete copy; this sink is the live, searchable view.
It is built *after* the exchange, from the finished ``Record``, on this sink's own worker thread
inside the recorder process (``otelproxy.recorder``), never in the proxy's process:

    pipeline ──submit()──► [bounded queue] ──otlp thread──► span(s) + 2 log records, encoded
                                                                    │ (otelproxy.otlp_wire)
                                                                    ▼ one exporter thread per
                                                                      signal, bounded, batched
                                                     OTLP/HTTP protobuf ──► Seq /ingest/otlp/v1/…

The wire format is written directly (``otelproxy.otlp_wire``) instead of through the SDK's span
and log objects and its encoder: the same messages for about an eighth of the CPU (measured
in-process on benchmark-shaped exchanges: ~0.12 ms against ~0.94 ms per exchange). The SDK
still gives the resource (``Resource.create``: ``OTEL_RESOURCE_ATTRIBUTES``, ``telemetry.sdk.*``)
and the W3C propagator; the exporters follow its batch processor and OTLP/HTTP exporter.

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
``session.id``, ``session.seq``, ``session.kind`` (``conversation|branch|session_fork|subagent|
fork_subagent``), ``session.parent_id`` + ``session.fork.from_seq`` (the linked session and its
turn: branches, forks and subagents only), ``session.compaction`` (``request|compacted|
history_rewritten``, on those turns only), ``gen_ai.conversation.id`` (= session.id),
``client.session_id`` (``X-Claude-Code-Session-Id``), ``gen_ai.agent.id``
(``x-claude-code-agent-id``: a subagent's turns), ``proxy.agent.parent_id`` (the agent that
spawned it, when not the main thread),
``proxy.exchange.id``; ``http.request.method``, ``url.path`` (the upstream path), ``url.query``,
``http.response.status_code``, ``server.address``/``server.port`` (the upstream, as in the GenAI
conventions), ``user_agent.original``; ``gen_ai.provider.name``, ``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.request.stream``, ``gen_ai.response.model``,
``gen_ai.response.id``, ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.usage.cache_creation.input_tokens``; ``proxy.ttfb_ms``, ``proxy.total_ms``,
``proxy.overhead_ms``, ``proxy.outcome`` (``complete|client_aborted|upstream_aborted|
upstream_error|shutdown_cut``, or ``rejected`` for a request the proxy refused), ``error.type``
(on errors), ``http.request.body.size``, ``http.response.body.size`` (bytes on the wire); for
streams ``stream.chunk_count`` and ``stream.chunk_offsets_ms`` (ms from the request's arrival to
each SSE event, the same events as the local record's ``chunks``).
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
propagator), and no global tracer/logger provider or propagator is installed: this module
writes its spans and log records itself.

Never in the way. ``submit`` only enqueues (drops counted when full). Each signal's exporter
has a bounded queue of encoded items; before queueing, the sink checks that both have room
and otherwise drops the exchange and counts it, so nothing is evicted silently. A batch leaves
when ``max_export_batch_size`` items wait, ``schedule_delay`` after the first, on flush and at
shutdown; a POST is retried on 429/502/503/504 and connection errors with exponential backoff
(``Retry-After`` honoured) until the export timeout. Failed exports (Seq down, slow, 5xx) are
counted. Counters appear on ``/healthz`` (``otlp_*``), and so does the export's health
(``export_status``: ``failing`` from the moment an attempt fails or has waited ``SLOW_EXPORT_S``
for an answer, until one goes through; ``export_last_error``); losses are reported as one WARN
line at most once a minute (with the last error). ``flush`` is bounded by its timeout;
``shutdown`` by ``--otlp-shutdown-timeout`` too, and what it abandons is counted as not
exported and reported in one line.

Configuration (``resolve``): ``--seq-url URL`` → ``URL/ingest/otlp/v1/{traces,logs}`` (it wins
over every ``OTEL_EXPORTER_OTLP_*ENDPOINT``), ``--seq-api-key`` → header ``X-Seq-ApiKey`` (wins
over the same header from ``OTEL_EXPORTER_OTLP_HEADERS``). Otherwise the standard variables:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``, ``/v1/logs``), the per-signal
``OTEL_EXPORTER_OTLP_{TRACES,LOGS}_ENDPOINT`` (used as given), ``…[_{SIGNAL}]_HEADERS``,
``…[_{SIGNAL}]_PROTOCOL`` (only ``http/protobuf``: Seq accepts nothing else),
``OTEL_EXPORTER_OTLP_TIMEOUT`` (seconds, as the Python SDK reads it; default 10, which bounds
every export), ``OTEL_EXPORTER_OTLP_COMPRESSION``, ``…[_{SIGNAL}]_CERTIFICATE`` (CA file for
an https endpoint), ``…[_{SIGNAL}]_CLIENT_CERTIFICATE`` + ``…_CLIENT_KEY`` (mutual TLS),
``OTEL_SERVICE_NAME`` (default ``otelproxy``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*`` / ``OTEL_BLRP_*`` (the log batch size defaults to
64 instead of 512 so a batch of records with 64 KiB bodies stays under Seq's request limit;
``…_EXPORT_TIMEOUT`` cuts the time a batch's attempts may take when shorter than the exporter
timeout),
``OTEL_{TRACES,LOGS}_EXPORTER=none`` and ``OTEL_SDK_DISABLED=true``. Nothing configured → no
sink, nothing tried. Header values (the API key) are never logged.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import math
import queue
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import orjson
import requests
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import AttributeValue

from otelproxy import __version__, otlp_wire
from otelproxy.config import PROVIDERS, Config
from otelproxy.errors import ConfigError
from otelproxy.pipeline import Sink, Worker
from otelproxy.record import Outcome, Record
from otelproxy.redact import redact_bytes, redact_text

log = logging.getLogger("otelproxy.otlp")

Attributes = dict[str, AttributeValue]

SIGNALS: Final = ("traces", "logs")
SEQ_INGEST_PATH: Final = "/ingest/otlp"
DEFAULT_SERVICE_NAME: Final = "otelproxy"
DEFAULT_TIMEOUT_S: Final = 10.0
MAX_CHUNK_OFFSETS: Final = 8192
"""``stream.chunk_offsets_ms`` keeps the first this many chunks (``….truncated`` beside it)."""
WARN_INTERVAL_S: Final = 60.0
SLOW_EXPORT_S: Final = 0.75
"""An export unanswered for this long counts as failing (``export_status``) while it waits."""
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
_ABORTS: Final = frozenset({Outcome.CLIENT_ABORTED, Outcome.UPSTREAM_ABORTED,
                            Outcome.UPSTREAM_ERROR, Outcome.SHUTDOWN_CUT})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_PROPAGATOR: Final = TraceContextTextMapPropagator()
COMPRESSIONS: Final = ("none", "gzip", "deflate")
RETRYABLE_STATUSES: Final = frozenset({429, 502, 503, 504})
EXPORT_ATTEMPTS: Final = 6
"""A batch is sent at most this many times (and never past the export timeout)."""
SEVERITY_INFO: Final = 9
SEVERITY_WARN: Final = 13
SEVERITY_ERROR: Final = 17
"""OTLP ``SeverityNumber`` values."""


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSettings:
    """One batch processor's knobs (``OTEL_BSP_*`` for spans, ``OTEL_BLRP_*`` for logs)."""

    schedule_delay_ms: int
    max_queue_size: int
    max_export_batch_size: int
    export_timeout_ms: int


@dataclass(frozen=True)
class TlsFiles:
    """``OTEL_EXPORTER_OTLP[_{SIGNAL}]_CERTIFICATE`` / ``_CLIENT_CERTIFICATE`` / ``_CLIENT_KEY``."""

    ca_file: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class ExportSettings:
    """Where and how to export; built once by ``resolve``. ``headers`` hold the API key."""

    traces_endpoint: str | None
    logs_endpoint: str | None
    traces_headers: Mapping[str, str] = field(repr=False)
    logs_headers: Mapping[str, str] = field(repr=False)
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: str = "none"
    """``none``, ``gzip`` or ``deflate``."""
    tls: Mapping[str, TlsFiles] = field(default_factory=dict)
    """Per signal, when an ``…CERTIFICATE`` / ``…CLIENT_*`` variable names files."""
    resource: Mapping[str, str] = field(default_factory=dict)
    spans: BatchSettings = BatchSettings(5000, 2048, 512, 30000)
    logs: BatchSettings = BatchSettings(1000, 2048, 64, 30000)
    max_body: int = 64 * 1024
    chunk_events: bool = False
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    """At shutdown, how long what is still queued may take to export; the rest is counted as
    not exported."""


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
        tls={signal: tls for signal in SIGNALS if (tls := _tls(env, signal)) is not None},
        resource=_resource(env),
        spans=_batch(env, "OTEL_BSP", BatchSettings(5000, 2048, 512, 30000)),
        logs=_batch(env, "OTEL_BLRP", BatchSettings(1000, 2048, 64, 30000)),
        max_body=config.otlp_max_body,
        chunk_events=config.otlp_chunk_events,
        shutdown_timeout_s=config.otlp_shutdown_timeout,
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


def _tls(env: Mapping[str, str], signal: str) -> TlsFiles | None:
    files = TlsFiles(_signal_env(env, signal, "CERTIFICATE"),
                     _signal_env(env, signal, "CLIENT_CERTIFICATE"),
                     _signal_env(env, signal, "CLIENT_KEY"))
    if files == TlsFiles():
        return None
    if bool(files.client_certificate) != bool(files.client_key):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_{signal.upper()}_CLIENT_CERTIFICATE and "
                          "…_CLIENT_KEY go together (mutual TLS needs both)")
    return files


def _compression(env: Mapping[str, str]) -> str:
    raw = (env.get("OTEL_EXPORTER_OTLP_COMPRESSION", "").strip() or "none").lower()
    if raw not in COMPRESSIONS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION: expected gzip|deflate|none, "
                          f"got {raw!r}")
    return raw


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


def severity(record: Record) -> tuple[int, str]:
    """INFO; WARN for 4xx; ERROR for 5xx, upstream errors and aborts (OTLP severity numbers)."""
    if is_error(record):
        return SEVERITY_ERROR, "ERROR"
    if 400 <= (record.exchange.status or 0) < 500:
        return SEVERITY_WARN, "WARN"
    return SEVERITY_INFO, "INFO"


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
        out["session.kind"] = session.kind
        if session.parent_id is not None:
            out["session.parent_id"] = session.parent_id
            _put(out, "session.fork.from_seq", session.fork_from_seq)
        _put(out, "gen_ai.agent.id", session.agent_id)
        _put(out, "proxy.agent.parent_id", session.parent_agent_id)
        _put(out, "session.compaction", session.compaction)
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
    out["http.request.body.size"] = exchange.request_size
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
            put_body(out, "gen_ai.input.messages.new", redact_bytes(_json_bytes(new_messages)),
                     max_body)
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
        put_body(out, "gen_ai.output.messages",
                 redact_bytes(_json_bytes([parsed.output_message])), max_body)
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


def _client_parent(record: Record) -> tuple[bytes, bytes, str] | None:
    """The client's ``traceparent`` (and ``tracestate``), extracted with the W3C propagator, as
    (trace id, parent span id, trace state): our span joins that trace as a child of the
    client's span. None without a valid one."""
    carrier = _client_carrier(record)
    if not carrier:
        return None
    parent = trace.get_current_span(_PROPAGATOR.extract(carrier, context=Context()))
    context = parent.get_span_context()
    if not context.is_valid:
        return None
    # tracestate is the client's free text: obfuscated like every other header value.
    state = redact_text(context.trace_state.to_header()) if context.trace_state else ""
    return context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big"), state


def _new_id(bits: int) -> bytes:
    """A random non-zero trace (128 bits) or span (64 bits) id, as the SDK generates them."""
    while not (value := random.getrandbits(bits)):
        pass
    return value.to_bytes(bits // 8, "big")


def encode(record: Record, settings: ExportSettings) -> tuple[list[bytes], list[bytes]]:
    """One exchange as OTLP: its spans (SERVER, then the upstream CLIENT span when the request
    was forwarded) and its two log records, each encoded and framed for ``Envelope.request``."""
    exchange = record.exchange
    common = otlp_wire.key_values(common_attributes(record))
    start_ns = wall_ns(record, exchange.started_ns)
    end_ns = wall_ns(record, exchange.finished_ns)
    client = _client_parent(record)
    if client is None:
        server = otlp_wire.SpanContext(_new_id(128), _new_id(64))
        parent_id = None
    else:
        trace_id, parent_id, trace_state = client
        server = otlp_wire.SpanContext(trace_id, _new_id(64), trace_state)
    events: list[bytes] = []
    if settings.chunk_events and record.streaming:
        for index, event in enumerate(record.events[:MAX_CHUNK_OFFSETS]):
            events.append(otlp_wire.event(wall_ns(record, event.ns), "stream.chunk",
                                          otlp_wire.key_values({
                                              "stream.chunk.index": index,
                                              "stream.chunk.offset_ms": _ms(
                                                  event.ns - exchange.started_ns),
                                              "stream.chunk.size": len(event.raw)})))
    error = (exchange.error or f"HTTP {exchange.status}") if is_error(record) else None
    spans = [otlp_wire.span(server, parent_id, span_name(record), otlp_wire.SPAN_KIND_SERVER,
                            start_ns, end_ns, otlp_wire.span_attributes(common), events, error,
                            parent_is_remote=client is not None)]
    if exchange.forwarded_ns is not None and exchange.outcome is not Outcome.REJECTED:
        spans.append(_client_span(record, server))

    number, text = severity(record)
    now = time.time_ns()
    shared = otlp_wire.log_attributes(common)
    request = shared + otlp_wire.log_attributes(otlp_wire.key_values(
        {"proxy.record": "request", **request_record_attributes(record, settings.max_body)}))
    response = shared + otlp_wire.log_attributes(otlp_wire.key_values(
        {"proxy.record": "response", **response_record_attributes(record, settings.max_body)}))
    logs = [otlp_wire.log_record(server, start_ns, now, number, text, request_summary(record),
                                 request, "request"),
            otlp_wire.log_record(server, end_ns, now, number, text, response_summary(record),
                                 response, "response")]
    item = otlp_wire.Envelope.item
    return [item(span) for span in spans], [item(log) for log in logs]


def _client_span(record: Record, server: otlp_wire.SpanContext) -> bytes:
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
    error = None
    if failed:
        attributes["error.type"] = (str(exchange.outcome) if upstream_failed
                                    else str(exchange.status))
        error = exchange.error or f"HTTP {exchange.status}"
    context = otlp_wire.SpanContext(server.trace_id, _new_id(64), server.trace_state)
    return otlp_wire.span(context, server.span_id, f"{exchange.method} {route(exchange.path)}",
                          otlp_wire.SPAN_KIND_CLIENT, wall_ns(record, exchange.forwarded_ns),
                          wall_ns(record, exchange.finished_ns),
                          otlp_wire.span_attributes(otlp_wire.key_values(attributes)), (), error)


# -- export: batches of encoded telemetry over OTLP/HTTP ------------------------------------------


@dataclass
class _Tally:
    """Telemetry queued for export and not yet through it, per signal; and the losses."""

    capacity: dict[str, int]
    outstanding: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    exported: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    failed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SIGNALS, 0))
    dropped: int = 0
    """Exchanges never queued for export: the sink's queue or an exporter's queue was full,
    or the proxy stopped before they were encoded."""
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

    def drop(self, count: int = 1) -> None:
        with self.lock:
            self.dropped += count

    def close(self, unencoded: int) -> dict[str, int]:
        """At shutdown: what is still outstanding failed, ``unencoded`` exchanges were dropped;
        later results are ignored. Returns the outstanding counts per signal."""
        with self.lock:
            left = dict(self.outstanding)
            for signal, count in left.items():
                self.failed[signal] += count
                self.outstanding[signal] = 0
            self.dropped += unencoded
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
                 batch: BatchSettings, settings: ExportSettings, envelope: otlp_wire.Envelope,
                 tally: _Tally, report: Callable[[], None]) -> None:
        self.signal = signal
        self.endpoint = endpoint
        self.last_error: str | None = None
        self._failing = False
        """The last attempt failed (and none has succeeded since)."""
        self._posting_since: float | None = None
        self._headers = {"Content-Type": "application/x-protobuf", **headers}
        if settings.compression != "none":
            self._headers["Content-Encoding"] = settings.compression
        self._compression = settings.compression
        # A batch's attempts together: the exporter timeout, cut to the processor's own.
        self._timeout = min(settings.timeout_s, batch.export_timeout_ms / 1000)
        self._batch = batch
        self._envelope = envelope
        self._tally = tally
        self._report = report
        self._items: deque[bytes] = deque()
        self._sending = 0
        self._flushing = False
        self._stopping = False
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._session = requests.Session()
        # Given on every request: a session's own ``verify`` loses to REQUESTS_CA_BUNDLE.
        tls = settings.tls.get(signal, TlsFiles())
        self._verify: str | bool = tls.ca_file or True
        self._cert = ((tls.client_certificate, tls.client_key)
                      if tls.client_certificate and tls.client_key else None)
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
        self._session.close()
        return not self._thread.is_alive()

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
            response = self._session.post(self.endpoint, data=data, headers=self._headers,
                                          timeout=remaining, allow_redirects=False,
                                          verify=self._verify, cert=self._cert)
        except requests.ConnectionError as exc:  # refused, reset, DNS, connect timeout
            return f"connection failed ({type(exc).__name__})", True, None
        except requests.RequestException as exc:  # e.g. no answer in time
            return type(exc).__name__, False, None
        finally:
            self._posting_since = None
        with response:
            status = response.status_code
            if 200 <= status < 300:
                return None, False, None
            return (f"HTTP {status}", status in RETRYABLE_STATUSES,
                    _retry_after(response.headers.get("retry-after")))


class OtlpSink(Worker):
    """Sink turning each record into a span (two with the upstream call) and two log records,
    encoded on this worker's thread and exported in batches by one thread per signal."""

    def __init__(self, settings: ExportSettings, maxsize: int = 2048) -> None:
        super().__init__("otlp", maxsize)
        self.settings = settings
        self._tally = _Tally({"traces": settings.spans.max_queue_size,
                              "logs": settings.logs.max_queue_size})
        self._warn_lock = threading.Lock()
        self._last_warn = -WARN_INTERVAL_S
        self._warned_losses = 0
        envelope = otlp_wire.Envelope(Resource.create(dict(settings.resource)).attributes,
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
            for exporter in self._exporters.values():
                exporter.start()
        super().start()

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

    def export_status(self) -> dict[str, str | None]:
        """``export_status`` (``ok`` or ``failing``) and ``export_last_error`` (the trouble of
        a failing export, else the last error seen, if any) for ``/healthz``."""
        exporters = self._exporters.values()
        trouble = next((t for e in exporters if (t := e.trouble()) is not None), None)
        last = trouble or next((e.last_error for e in exporters if e.last_error), None)
        return {"export_status": "ok" if trouble is None else "failing",
                "export_last_error": last}

    def flush(self, timeout: float) -> bool:
        """Encode everything queued and let the exporters send it, within ``timeout``."""
        deadline = time.monotonic() + timeout
        done = super().flush(timeout)
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
        done = super().shutdown(budget)  # our queue drained, exporters flushed (``flush``)
        if not done:
            for exporter in self._exporters.values():
                exporter.abort()
        for exporter in self._exporters.values():
            done = exporter.stop(max(0.0, deadline - time.monotonic())) and done
        with self._queue.mutex:  # records the thread did not get to (no stop/flush markers)
            unencoded = sum(isinstance(item, Record) for item in self._queue.queue)
        left = self._tally.close(unencoded)
        dropped, failed = self._tally.losses()
        if unencoded or any(left.values()):
            errors = sorted({e.last_error for e in self._exporters.values() if e.last_error})
            log.warning("OTLP export stopped after %.1f s (shutdown budget %g s) with %d "
                        "span(s) and %d log record(s) unsent and %d exchange(s) not encoded; "
                        "in all %d exchange(s) dropped and %d span(s)/log record(s) not "
                        "exported%s", time.monotonic() - started, budget, left.get("traces", 0),
                        left.get("logs", 0), unencoded, dropped, failed,
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
                    "complete)", _safe_url(self.settings.logs_endpoint
                                           or self.settings.traces_endpoint), dropped, failed,
                    f" (last error: {', '.join(errors)})" if errors else "")

    # -- on the worker thread --------------------------------------------------------------------

    def handle(self, item: object) -> None:
        assert isinstance(item, Record)
        self.emit(item)

    def emit(self, record: Record) -> None:
        """Encode one exchange and queue it for export (or count it dropped when no room)."""
        spans, logs = encode(record, self.settings)  # may raise: before claiming queue room
        wanted = {signal: len(spans if signal == "traces" else logs)
                  for signal in self._exporters}
        if not self._tally.reserve(wanted):
            self._report_losses()
            return
        for signal, exporter in self._exporters.items():
            exporter.add(spans if signal == "traces" else logs)
