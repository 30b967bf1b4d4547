"""What an exchange becomes in OTLP: pure functions of the finished ``Record`` (attributes, span
and log names, severity, summaries, the upstream CLIENT span), written as protobuf by
``otelproxy.otlp.wire``. ``encode`` is the whole of it; the export sends what it returns.

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
upstream_error|shutdown_cut|proxy_ended``, or ``rejected`` for a request the proxy refused),
``error.type`` (on errors), ``http.request.body.size``, ``http.response.body.size`` (bytes on
the wire); for streams ``stream.chunk_count`` and ``stream.chunk_offsets_ms`` (ms from the
request's arrival to each SSE event, the same events as the local record's ``chunks``).
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
The W3C propagator (``opentelemetry.trace``) is imported the first time a client sends a
``traceparent``.
"""

from __future__ import annotations

import codecs
import functools
import json
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import orjson
from opentelemetry.util.types import AttributeValue

from otelproxy.config import PROVIDERS
from otelproxy.otlp import wire
from otelproxy.otlp.settings import DEFAULT_PORTS, ExportSettings
from otelproxy.record import Outcome, Record
from otelproxy.redact import redact_bytes, redact_text

if TYPE_CHECKING:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Attributes = dict[str, AttributeValue]

MAX_CHUNK_OFFSETS: Final = 8192
"""``stream.chunk_offsets_ms`` keeps the first this many chunks (``….truncated`` beside it)."""
SEVERITY_INFO: Final = 9
SEVERITY_WARN: Final = 13
SEVERITY_ERROR: Final = 17
"""OTLP ``SeverityNumber`` values."""
_ABORTS: Final = frozenset({Outcome.CLIENT_ABORTED, Outcome.UPSTREAM_ABORTED,
                            Outcome.UPSTREAM_ERROR, Outcome.SHUTDOWN_CUT, Outcome.PROXY_ENDED})


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


@functools.lru_cache(maxsize=64)  # a proxy has a few upstreams; urlsplit twice an exchange
def _origin(upstream_url: str) -> tuple[str | None, int | None]:
    if not upstream_url:
        return None, None
    parts = urlsplit(upstream_url)
    return parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme)


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

    first_ns = exchange.first_byte_ns
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


@functools.cache
def _w3c_propagator() -> TraceContextTextMapPropagator:
    """The W3C trace-context propagator, made (and its module imported) on first use."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _client_parent(record: Record) -> tuple[bytes, bytes, str] | None:
    """The client's ``traceparent`` (and ``tracestate``), extracted with the W3C propagator, as
    (trace id, parent span id, trace state): our span joins that trace as a child of the
    client's span. None without a valid one."""
    carrier = _client_carrier(record)
    if not carrier:
        return None
    from opentelemetry import trace
    from opentelemetry.context import Context

    parent = trace.get_current_span(_w3c_propagator().extract(carrier, context=Context()))
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


def server_span_error(record: Record) -> str | None:
    """The SERVER span's status message when it is an error (``is_error``), else None."""
    exchange = record.exchange
    return (exchange.error or f"HTTP {exchange.status}") if is_error(record) else None


def has_client_span(record: Record) -> bool:
    """Whether the request went upstream, so the exchange has a CLIENT span."""
    exchange = record.exchange
    return exchange.forwarded_ns is not None and exchange.outcome is not Outcome.REJECTED


def client_span_attributes(record: Record) -> tuple[Attributes, str | None]:
    """The upstream CLIENT span's attributes and its status message when it failed."""
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
    return attributes, error


def client_span_name(record: Record) -> str:
    """``{METHOD} {route}`` of the upstream call."""
    return f"{record.exchange.method} {route(record.exchange.path)}"


def encode(record: Record, settings: ExportSettings) -> tuple[list[bytes], list[bytes]]:
    """One exchange as OTLP: its spans (SERVER, then the upstream CLIENT span when the request
    was forwarded) and its two log records, each encoded and framed for ``Envelope.request``."""
    exchange = record.exchange
    common = wire.key_values(common_attributes(record))
    start_ns = wall_ns(record, exchange.started_ns)
    end_ns = wall_ns(record, exchange.finished_ns)
    client = _client_parent(record)
    if client is None:
        server = wire.SpanContext(_new_id(128), _new_id(64))
        parent_id = None
    else:
        trace_id, parent_id, trace_state = client
        server = wire.SpanContext(trace_id, _new_id(64), trace_state)
    events: list[bytes] = []
    if settings.chunk_events and record.streaming:
        for index, event in enumerate(record.events[:MAX_CHUNK_OFFSETS]):
            events.append(wire.event(wall_ns(record, event.ns), "stream.chunk", wire.key_values({
                "stream.chunk.index": index,
                "stream.chunk.offset_ms": _ms(event.ns - exchange.started_ns),
                "stream.chunk.size": len(event.raw)})))
    spans = [wire.span(server, parent_id, span_name(record), wire.SPAN_KIND_SERVER, start_ns,
                       end_ns, wire.span_attributes(common), events, server_span_error(record),
                       parent_is_remote=client is not None)]
    if has_client_span(record):
        spans.append(_client_span(record, server))

    number, text = severity(record)
    now = time.time_ns()
    shared = wire.log_attributes(common)
    request = shared + wire.log_attributes(wire.key_values(
        {"proxy.record": "request", **request_record_attributes(record, settings.max_body)}))
    response = shared + wire.log_attributes(wire.key_values(
        {"proxy.record": "response", **response_record_attributes(record, settings.max_body)}))
    logs = [wire.log_record(server, start_ns, now, number, text, request_summary(record),
                            request, "request"),
            wire.log_record(server, end_ns, now, number, text, response_summary(record),
                            response, "response")]
    item = wire.Envelope.item
    return [item(span) for span in spans], [item(log) for log in logs]


def _client_span(record: Record, server: wire.SpanContext) -> bytes:
    """The upstream call, as a child CLIENT span (nothing was injected into it)."""
    exchange = record.exchange
    attributes, error = client_span_attributes(record)
    context = wire.SpanContext(server.trace_id, _new_id(64), server.trace_state)
    return wire.span(context, server.span_id, client_span_name(record), wire.SPAN_KIND_CLIENT,
                     wall_ns(record, exchange.forwarded_ns), wall_ns(record, exchange.finished_ns),
                     wire.span_attributes(wire.key_values(attributes)), (), error)
