"""The processors every record goes through, in this order (see ``default_processors``).

1. ``Redact``: obfuscate secrets in headers, query and bodies (``otelproxy.redact``).
2. ``DecodeBody``: undo ``content-encoding`` on a copy of the response and, for
   ``text/event-stream``, split it into SSE events, each stamped with the arrival time of the
   network chunk that completed it.
3. ``ProviderParse``: provider knowledge — model, stream flag, messages, the reassembled
   assistant message, usage, finish reasons (``otelproxy.providers``).
4. the session processor (``otelproxy.sessions``), which needs 3.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import orjson

from otelproxy.providers import anthropic, openai
from otelproxy.record import Event, Record
from otelproxy.redact import redact_bytes, redact_headers, redact_text

try:
    import brotli
except ImportError:  # pragma: no cover - brotli is a declared dependency
    brotli = None


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """First value of a header, case-insensitively."""
    lower = name.lower()
    for key, value in headers:
        if key.lower() == lower:
            return value
    return None


class Redact:
    name = "redact"

    def __call__(self, record: Record) -> None:
        exchange = record.exchange
        record.request_headers = redact_headers(exchange.request_headers)
        record.response_headers = redact_headers(exchange.response_headers)
        record.request_body = redact_bytes(exchange.request_body)
        exchange.query = redact_text(exchange.query)
        if exchange.error:
            exchange.error = redact_text(exchange.error)


class _Decoder:
    """Incremental decoder for one content-encoding."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._zlib: Any = None
        self._brotli: Any = None
        if encoding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(wbits=47)
        elif encoding == "deflate":
            self._zlib = zlib.decompressobj()
        elif encoding == "br" and brotli is not None:
            self._brotli = brotli.Decompressor()
        elif encoding != "identity":
            raise ValueError(f"unsupported content-encoding {encoding!r}")

    def feed(self, data: bytes) -> bytes:
        if self._zlib is not None:
            return bytes(self._zlib.decompress(data))
        if self._brotli is not None:
            return bytes(self._brotli.process(data))
        return data


def split_sse(chunks: list[tuple[int, bytes]]) -> list[Event]:
    """Split a stream into SSE events (each ending with a blank line), keeping every byte."""
    events: list[Event] = []
    pending = b""
    for ns, data in chunks:
        pending += data
        start = 0
        while True:
            cut = _event_end(pending, start)
            if cut < 0:
                break
            events.append(Event(ns, pending[start:cut]))
            start = cut
        pending = pending[start:]
    if pending:
        events.append(Event(chunks[-1][0], pending))
    return events


def _event_end(buffer: bytes, start: int) -> int:
    """Index just after the first event terminator at or after ``start``, or -1."""
    best = -1
    for terminator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        at = buffer.find(terminator, start)
        if at >= 0 and (best < 0 or at + len(terminator) < best):
            best = at + len(terminator)
    return best


class DecodeBody:
    name = "decode"

    def __call__(self, record: Record) -> None:
        exchange = record.exchange
        headers = exchange.response_headers
        encoding = (header(headers, "content-encoding") or "identity").strip().lower()
        content_type = (header(headers, "content-type") or "").lower()
        chunks = exchange.chunks
        if encoding != "identity":
            record.content_encoding = encoding
            try:
                decoder = _Decoder(encoding)
                chunks = [(ns, decoder.feed(data)) for ns, data in chunks]
            except (ValueError, zlib.error, RuntimeError) as exc:
                record.decode_error = f"{encoding}: {exc}"
                chunks = exchange.chunks
                record.content_encoding = None
        record.streaming = content_type.startswith("text/event-stream")
        if record.streaming:
            record.events = [Event(e.ns, redact_bytes(e.raw)) for e in split_sse(chunks)]
            record.response_body = b"".join(e.raw for e in record.events)
        else:
            record.response_body = redact_bytes(b"".join(data for _, data in chunks))


class ProviderParse:
    name = "provider"

    def __call__(self, record: Record) -> None:
        exchange = record.exchange
        module = anthropic if exchange.provider == "anthropic" else openai
        parsed = record.parsed
        parsed.tracked = module.is_tracked(exchange.method, exchange.path)
        if not _looks_json(record.request_body):
            return
        try:
            body = orjson.loads(record.request_body)
        except orjson.JSONDecodeError as exc:
            parsed.parse_error = f"request body is not JSON: {exc}"
            parsed.tracked = False
            return
        parsed.request_json = body
        if not isinstance(body, dict):
            parsed.tracked = False
            return
        module.parse_request(parsed, body)
        if (exchange.status is not None and exchange.status < 400) or record.events:
            module.parse_response(record)
        elif record.response_body and _looks_json(record.response_body):
            with contextlib.suppress(orjson.JSONDecodeError):
                parsed.response_json = orjson.loads(record.response_body)
        usage = parsed.usage
        if usage.output_tokens and exchange.finished_ns is not None:
            first = record.events[0].ns if record.events else exchange.headers_ns
            seconds = (exchange.finished_ns - (first or exchange.started_ns)) / 1e9
            if seconds > 0:
                parsed.tokens_per_second = round(usage.output_tokens / seconds, 2)


def _looks_json(body: bytes) -> bool:
    stripped = body.lstrip()[:1]
    return stripped in (b"{", b"[")


def default_processors() -> list[Any]:
    return [Redact(), DecodeBody(), ProviderParse()]
