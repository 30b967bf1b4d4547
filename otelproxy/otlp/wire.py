"""OTLP protobuf, written directly: spans, log records and the export requests that carry them.

The SDK's path (build ``Span``/``LogRecord`` objects, validate their attributes, convert them to
``opentelemetry-proto`` messages, serialize) costs about six times the CPU of this one for the
same messages (``benchmarks/otel_packages.py``; figures in the README). The sink knows its
attributes' types up front and shares one set of attributes between the span and both log
records, so it writes the wire format itself: each attribute is encoded once, each span and log
record becomes ``bytes`` as soon as it is built, and a batch is those bytes joined under one
resource and scope. ``tests/test_otlp_wire.py`` decodes everything written here with
``opentelemetry-proto``.

Field numbers are those of ``opentelemetry/proto/{common,resource,trace,logs}/v1/*.proto`` and
the ``collector`` service requests. Only what otelproxy emits is written: string, bool, int,
double and array attribute values; spans with events and a status; log records with a string
body. Empty and zero fields are left out, as protobuf does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry.util.types import AttributeValue

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_VARINTS: Final = tuple(bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7))
                        for n in range(1 << 14))
_KEY_CACHE_SIZE: Final = 4096
_keys: dict[str, bytes] = {}
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack

# -- tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)
# AnyValue
_STRING_VALUE: Final = b"\x0a"
_BOOL_TRUE: Final = b"\x10\x01"
_BOOL_FALSE: Final = b"\x10\x00"
_INT_VALUE: Final = b"\x18"
_DOUBLE_VALUE: Final = b"\x21"
_ARRAY_VALUE: Final = b"\x2a"
# KeyValue, ArrayValue
_KEY: Final = b"\x0a"
_VALUE: Final = b"\x12"
_ARRAY_ITEM: Final = b"\x0a"
# An ArrayValue item holding an int below 0x80 (one varint byte) or 0x4000 (two): tag, length,
# then the AnyValue's int tag; the varint follows.
_SMALL_INT_ITEM: Final = _ARRAY_ITEM + b"\x02" + _INT_VALUE
_INT_ITEM: Final = _ARRAY_ITEM + b"\x03" + _INT_VALUE
# Span
_SPAN_TRACE_ID: Final = b"\x0a"
_SPAN_SPAN_ID: Final = b"\x12"
_SPAN_TRACE_STATE: Final = b"\x1a"
_SPAN_PARENT_ID: Final = b"\x22"
_SPAN_NAME: Final = b"\x2a"
_SPAN_KIND: Final = b"\x30"
_SPAN_START: Final = b"\x39"
_SPAN_END: Final = b"\x41"
_SPAN_ATTRIBUTE: Final = b"\x4a"
_SPAN_EVENT: Final = b"\x5a"
_SPAN_STATUS: Final = b"\x7a"
_SPAN_FLAGS: Final = b"\x85\x01"  # field 16, fixed32
_EVENT_TIME: Final = b"\x09"
_EVENT_NAME: Final = b"\x12"
_EVENT_ATTRIBUTE: Final = b"\x1a"
_STATUS_MESSAGE: Final = b"\x12"
_STATUS_CODE: Final = b"\x18"
# LogRecord
_LOG_TIME: Final = b"\x09"
_LOG_SEVERITY_NUMBER: Final = b"\x10"
_LOG_SEVERITY_TEXT: Final = b"\x1a"
_LOG_BODY: Final = b"\x2a"
_LOG_ATTRIBUTE: Final = b"\x32"
_LOG_FLAGS: Final = b"\x45"
_LOG_TRACE_ID: Final = b"\x4a"
_LOG_SPAN_ID: Final = b"\x52"
_LOG_OBSERVED_TIME: Final = b"\x59"
_LOG_EVENT_NAME: Final = b"\x62"
# Resource, InstrumentationScope, Resource{Spans,Logs}, Scope{Spans,Logs}, Export*ServiceRequest
_RESOURCE_ATTRIBUTE: Final = b"\x0a"
_SCOPE_NAME: Final = b"\x0a"
_SCOPE_VERSION: Final = b"\x12"
_RESOURCE: Final = b"\x0a"
_SCOPE_ITEMS: Final = b"\x12"  # ResourceSpans.scope_spans / ResourceLogs.scope_logs
_SCOPE: Final = b"\x0a"
_ITEM: Final = b"\x12"  # ScopeSpans.spans / ScopeLogs.log_records
_RESOURCE_ITEMS: Final = b"\x0a"  # ExportTraceServiceRequest.resource_spans / …Logs…

_SAMPLED: Final = 0x01

SPAN_KIND_SERVER: Final = 2
SPAN_KIND_CLIENT: Final = 3
STATUS_CODE_ERROR: Final = 2


def varint(value: int) -> bytes:
    """An unsigned varint; negative numbers as their 64-bit two's complement (protobuf int64)."""
    if 0 <= value < 0x4000:
        return _VARINTS[value]
    value &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    size = len(payload)
    return tag + (_VARINTS[size] if size < 0x4000 else varint(size)) + payload


def any_value(value: AttributeValue) -> bytes:
    """An ``AnyValue`` message (``bool`` before ``int``: a bool is an int in Python)."""
    if isinstance(value, str):
        return field(_STRING_VALUE, value.encode("utf-8", "surrogatepass"))
    if value is True:
        return _BOOL_TRUE
    if value is False:
        return _BOOL_FALSE
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            return _INT_VALUE + varint(value)
        return field(_STRING_VALUE, str(value).encode())  # beyond int64: kept exact, as text
    if isinstance(value, float):
        return _DOUBLE_VALUE + _double(value)
    if isinstance(value, (list, tuple)):
        # Small non-negative ints (a stream's chunk offsets: 150 or more) framed inline: a
        # third of the cost of a call per item.
        return field(_ARRAY_VALUE, b"".join([
            (_SMALL_INT_ITEM if item < 0x80 else _INT_ITEM) + _VARINTS[item]
            if type(item) is int and 0 <= item < 0x4000 else field(_ARRAY_ITEM, any_value(item))
            for item in value]))
    raise TypeError(f"unsupported attribute value type {type(value).__name__}")


def key_values(attributes: Mapping[str, AttributeValue]) -> list[bytes]:
    """Each attribute as an encoded ``KeyValue`` message (no field tag yet), ``None`` skipped.

    The hot loop of the sink: keys are encoded once per process (a bounded cache)."""
    out = []
    for key, value in attributes.items():
        if value is None:
            continue
        encoded_key = _keys.get(key)
        if encoded_key is None:
            encoded_key = field(_KEY, key.encode())
            if len(_keys) < _KEY_CACHE_SIZE:
                _keys[key] = encoded_key
        if type(value) is str:  # most attributes: any_value's first case, without the calls
            data = value.encode("utf-8", "surrogatepass")
            size = len(data)
            encoded = _STRING_VALUE + (_VARINTS[size] if size < 0x4000 else varint(size)) + data
        else:
            encoded = any_value(value)
        size = len(encoded)
        out.append(encoded_key + _VALUE + (_VARINTS[size] if size < 0x4000 else varint(size))
                   + encoded)
    return out


def span_attributes(key_value_messages: Iterable[bytes]) -> bytes:
    """``KeyValue`` messages (from ``key_values``) as the attributes field of a ``Span``."""
    return _repeated(_SPAN_ATTRIBUTE, key_value_messages)


def log_attributes(key_value_messages: Iterable[bytes]) -> bytes:
    """``KeyValue`` messages (from ``key_values``) as the attributes field of a ``LogRecord``."""
    return _repeated(_LOG_ATTRIBUTE, key_value_messages)


def _repeated(tag: bytes, messages: Iterable[bytes]) -> bytes:
    return b"".join([tag + (_VARINTS[len(message)] if len(message) < 0x4000
                            else varint(len(message))) + message for message in messages])


@dataclass(frozen=True, slots=True)
class SpanContext:
    """Who a span is: 16-byte trace id, 8-byte span id, W3C trace state. Every span otelproxy
    writes is exported, so its trace flags are always "sampled" (01)."""

    trace_id: bytes
    span_id: bytes
    trace_state: str = ""


def span(context: SpanContext, parent_span_id: bytes | None, name: str, kind: int,
         start_ns: int, end_ns: int, attributes: bytes, events: Sequence[bytes] = (),
         error: str | None = None, parent_is_remote: bool = False) -> bytes:
    """A ``Span`` message. ``attributes`` come from ``span_attributes``; ``events`` from
    ``event``; ``error`` (a message, possibly empty) sets status ERROR."""
    parts = [_SPAN_TRACE_ID, b"\x10", context.trace_id, _SPAN_SPAN_ID, b"\x08", context.span_id]
    if context.trace_state:
        parts.append(field(_SPAN_TRACE_STATE, context.trace_state.encode()))
    if parent_span_id:
        parts += (_SPAN_PARENT_ID, b"\x08", parent_span_id)
    parts += (field(_SPAN_NAME, name.encode()), _SPAN_KIND, varint(kind),
              _SPAN_START, _fixed64(start_ns), _SPAN_END, _fixed64(end_ns),
              attributes, _repeated(_SPAN_EVENT, events))
    if error is not None:
        status = field(_STATUS_MESSAGE, error.encode()) if error else b""
        parts.append(field(_SPAN_STATUS, status + _STATUS_CODE + varint(STATUS_CODE_ERROR)))
    # SpanFlags: the W3C trace flags (sampled), plus "whether the parent is remote is known"
    # (0x100) and "it is" (0x200), as the SDK's encoder writes them.
    parts += (_SPAN_FLAGS, _fixed32(_SAMPLED | 0x100 | (0x200 if parent_is_remote else 0)))
    return b"".join(parts)


def event(time_ns: int, name: str, attributes: Sequence[bytes]) -> bytes:
    """A ``Span.Event`` message."""
    return (_EVENT_TIME + _fixed64(time_ns) + field(_EVENT_NAME, name.encode())
            + _repeated(_EVENT_ATTRIBUTE, attributes))


def log_record(context: SpanContext, time_ns: int, observed_ns: int, severity_number: int,
               severity_text: str, body: str, attributes: bytes, event_name: str = "") -> bytes:
    """A ``LogRecord`` message in ``context`` (so Seq links it to the span) with a string body;
    ``attributes`` come from ``log_attributes``."""
    parts = [_LOG_TIME, _fixed64(time_ns), _LOG_SEVERITY_NUMBER, varint(severity_number),
             field(_LOG_SEVERITY_TEXT, severity_text.encode()),
             field(_LOG_BODY, field(_STRING_VALUE, body.encode("utf-8", "surrogatepass"))),
             attributes,
             _LOG_FLAGS, _fixed32(_SAMPLED),
             _LOG_TRACE_ID, b"\x10", context.trace_id, _LOG_SPAN_ID, b"\x08", context.span_id,
             _LOG_OBSERVED_TIME, _fixed64(observed_ns)]
    if event_name:
        parts.append(field(_LOG_EVENT_NAME, event_name.encode()))
    return b"".join(parts)


class Envelope:
    """One resource and one instrumentation scope, encoded once; wraps batches of spans or log
    records into an ``ExportTraceServiceRequest`` / ``ExportLogsServiceRequest`` (the two have
    the same shape: request → resource_* → scope_* → items)."""

    def __init__(self, resource: Mapping[str, AttributeValue], scope_name: str,
                 scope_version: str) -> None:
        self._resource = field(_RESOURCE, _repeated(_RESOURCE_ATTRIBUTE, key_values(resource)))
        self._scope = field(_SCOPE, field(_SCOPE_NAME, scope_name.encode())
                            + field(_SCOPE_VERSION, scope_version.encode()))

    @staticmethod
    def item(message: bytes) -> bytes:
        """A span or log record, framed as one item of a scope (what ``request`` joins)."""
        return field(_ITEM, message)

    def request(self, items: Iterable[bytes]) -> bytes:
        """The export request carrying ``items`` (each from ``item``)."""
        scoped = field(_SCOPE_ITEMS, self._scope + b"".join(items))
        return field(_RESOURCE_ITEMS, self._resource + scoped)
