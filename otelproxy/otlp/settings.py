"""OTLP export settings: what ``--seq-url``/``--seq-api-key`` and the OpenTelemetry environment
ask for, resolved once into a frozen ``ExportSettings`` (or None: nothing configured, no export).

``resolve``: ``--seq-url URL`` → ``URL/ingest/otlp/v1/{traces,logs}`` (it wins over every
``OTEL_EXPORTER_OTLP_*ENDPOINT``), ``--seq-api-key`` → header ``X-Seq-ApiKey`` (wins over the
same header from ``OTEL_EXPORTER_OTLP_HEADERS``). Otherwise the standard variables:
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
sink, nothing tried. Header values (the API key) are never logged. A bad value is a
``ConfigError`` (one line, exit code 2).

The proxy process resolves the settings too (a bad value fails at start, not in the recorder),
so this module imports nothing heavy: not the exporter (``http.client``, ``ssl``), not the
OpenTelemetry SDK.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

from opentelemetry.util.re import parse_env_headers

from otelproxy import __version__
from otelproxy.config import Config
from otelproxy.errors import ConfigError
from otelproxy.otlp import GENERIC_ENDPOINT, SIGNAL_ENDPOINTS

log = logging.getLogger("otelproxy.otlp")

SIGNALS: Final = ("traces", "logs")
SEQ_INGEST_PATH: Final = "/ingest/otlp"
DEFAULT_SERVICE_NAME: Final = "otelproxy"
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
COMPRESSIONS: Final = ("none", "gzip", "deflate")


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
    elif specific := env.get(SIGNAL_ENDPOINTS[signal], "").strip():
        url, what = specific, SIGNAL_ENDPOINTS[signal]
    elif generic := env.get(GENERIC_ENDPOINT, "").strip():
        url, what = f"{generic.rstrip('/')}/v1/{signal}", GENERIC_ENDPOINT
    else:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ConfigError(f"{what}: malformed URL ({exc})") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
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


def safe_url(url: str | None) -> str:
    """An endpoint for a log line: no userinfo, no query."""
    if url is None:
        return "off"
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="", fragment="").geturl()
