"""The processors every record goes through, in this order (see ``default_processors``).

1. ``Redact``: obfuscate secrets in headers, path, query, request body and error
   (``otelproxy.redact``); header bytes that were not UTF-8 become ``\\xNN``
   (``otelproxy.header_bytes.escape``).
2. ``DecodeBody``: undo ``content-encoding`` on a copy of the response and, for
   ``text/event-stream``, split it into SSE events, each stamped with the arrival time of the
   network chunk that completed it; obfuscate secrets in it, keys a stream delivers in pieces
   across events included (``redact_stream``).
3. ``ProviderParse``: provider knowledge — model, stream flag, messages, the reassembled
   assistant message, usage, finish reasons (``otelproxy.providers``).
4. the session processor (``otelproxy.sessions``), which needs 3.

A conversation's request body repeats the previous one's and adds a little. ``Redact`` and
``ProviderParse`` therefore remember what they made of recent bodies (``otelproxy.compact.Recent``)
and work only on the bytes a body does not share with the previous body of its conversation
(``otelproxy.redact.redact_body``, ``otelproxy.body_json.parse_body``): the result is the same
as from the whole body, at a cost that grows with what the turn added, not with the history.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Hashable, Iterable

import orjson

from otelproxy.body_json import ParsedBody, parse_body
from otelproxy.compact import Recent
from otelproxy.header_bytes import escape
from otelproxy.providers import (
    CR_BYTE,
    anthropic,
    decode_event,
    decode_events,
    decode_fields,
    openai,
    sse_fields,
)
from otelproxy.record import Chunks, Event, Exchange, Record
from otelproxy.redact import (
    RedactedBody,
    redact_body,
    redact_bytes,
    redact_headers,
    redact_pieces,
    redact_text,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _brotli() -> Any:
    """A brotli decompressor; the module loads on the first brotli body (most are not)."""
    try:
        import brotli
    except ImportError:  # pragma: no cover - brotli is a declared dependency
        raise ValueError("content-encoding 'br' needs the brotli package") from None
    return brotli.Decompressor()


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """First value of a header, case-insensitively."""
    lower = name.lower()
    for key, value in headers:
        if key.lower() == lower:
            return value
    return None


MAX_DECODED_REQUEST = 128 * 1024 * 1024
"""A compressed request body is decoded for the record up to this size (else not recorded)."""
REMEMBERED = 32 * 1024 * 1024
"""Bytes of recent request bodies ``Redact`` and ``ProviderParse`` each keep (``Recent``)."""
SMALL_BODY = 16 * 1024
"""A body smaller than this is handled whole, not remembered."""
_WINDOW = 96


def conversation_key(exchange: Exchange, body: bytes) -> Hashable:
    """Where to look for the previous body of ``body``'s conversation: the call, the client's
    session and agent ids, and the start of the ``messages`` array (its first message). Only a
    hint: the bodies' bytes are compared all the same."""
    start = body.find(b'"messages"')
    return (exchange.provider, exchange.method, exchange.path,
            header(exchange.request_headers, "x-claude-code-session-id"),
            header(exchange.request_headers, "x-claude-code-agent-id"),
            body[start:start + _WINDOW] if start >= 0 else None)


class Redact:
    name = "redact"

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._recent: Recent[RedactedBody] = Recent(remembered)

    def __call__(self, record: Record) -> None:
        exchange = record.exchange
        # The exchange's own copy too: later processors read the raw headers (client session
        # id, traceparent), and JSON, SQLite and OTLP only carry valid text.
        exchange.request_headers = escape(exchange.request_headers)
        exchange.response_headers = escape(exchange.response_headers)
        record.request_headers = redact_headers(exchange.request_headers)
        record.response_headers = redact_headers(exchange.response_headers)
        record.request_body = self._redact_body(exchange, self._request_body(record))
        exchange.path = redact_text(exchange.path)
        exchange.query = redact_text(exchange.query)
        if exchange.error:
            exchange.error = redact_text(exchange.error)

    def _redact_body(self, exchange: Exchange, body: bytes) -> bytes:
        if len(body) < SMALL_BODY:
            return redact_bytes(body)
        return self._recent.derive(conversation_key(exchange, body), body, redact_body).redacted

    @staticmethod
    def _request_body(record: Record) -> bytes:
        """The request body to record: decoded when the client compressed it, since a key is
        only found in the decoded bytes; nothing when it cannot be decoded."""
        body = record.exchange.request_body
        encoding = (header(record.exchange.request_headers, "content-encoding")
                    or "identity").strip().lower()
        if encoding == "identity" or not body:
            return body
        try:
            decoded = decode_whole(encoding, body, MAX_DECODED_REQUEST)
        except Exception as exc:  # whatever fails, the body cannot be searched for secrets
            record.notes.append(redact_text(
                f"request body not recorded: content-encoding {encoding} did not decode "
                f"({type(exc).__name__}: {exc}), so it could not be searched for secrets"))
            return b""
        record.request_content_encoding = encoding
        return decoded


def decode_whole(encoding: str, data: bytes, limit: int) -> bytes:
    """A whole body without its content-encoding; ValueError when it decodes to more than
    ``limit`` bytes, is cut short or the encoding is unknown."""
    out: bytes
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflater = zlib.decompressobj(wbits=15 if encoding == "deflate" else 47)
        out = inflater.decompress(data, limit + 1)
        finished = inflater.eof
    elif encoding == "br":
        decompressor = _brotli()
        out = decompressor.process(data, output_buffer_limit=limit + 1)
        finished = decompressor.is_finished()
    else:
        raise ValueError(f"unsupported content-encoding {encoding!r}")
    if len(out) > limit:
        raise ValueError(f"decodes to more than {limit} bytes")
    if not finished:
        raise ValueError("the compressed data is cut short")
    return out


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
        elif encoding == "br":
            self._brotli = _brotli()
        elif encoding != "identity":
            raise ValueError(f"unsupported content-encoding {encoding!r}")

    def feed(self, data: bytes) -> bytes:
        if self._zlib is not None:
            return bytes(self._zlib.decompress(data))
        if self._brotli is not None:
            return bytes(self._brotli.process(data))
        return data


def split_sse(chunks: Iterable[tuple[int, bytes]]) -> list[Event]:
    """Split a stream into SSE events (each ending with a blank line), keeping every byte."""
    events: list[Event] = []
    pending = b""
    for ns, data in chunks:
        if not pending and data[-2:] == b"\n\n" and data.find(b"\n\n") == len(data) - 2 \
                and CR_BYTE not in data:
            events.append(Event(ns, data))  # the usual chunk: one whole event
            continue
        pending = pending + data if pending else data
        start = 0
        if CR_BYTE not in pending:  # the usual stream: only "\n\n" can end an event
            while (cut := pending.find(b"\n\n", start)) >= 0:
                events.append(Event(ns, pending[start:cut + 2]))
                start = cut + 2
        else:
            while (cut := _event_end(pending, start)) >= 0:
                events.append(Event(ns, pending[start:cut]))
                start = cut
        pending = pending[start:]
    if pending:  # the rest, at the last chunk's time
        events.append(Event(ns, pending))
    return events


_EVENT = re.compile(rb"(event:([^\n]*)\ndata: ([^\n]*)\n\n)|((?s:.*?)\n\n)|((?s:.+))")
"""At a place of a stream without CR: the usual event (``event: …\ndata: …\n\n``: all of it, its
name, its data), else the bytes up to and including the next blank line, else the rest. One
of the three always matches, so matching from the start tiles the stream."""


def read_sse(chunks: Chunks) -> tuple[list[Event], list[tuple[str, Any]]]:
    """``split_sse``'s events and their ``decode_events`` payloads, in one pass.

    A stream without CR (the usual one) is cut by one ``_EVENT`` scan, which reads the usual
    event's name and data as it cuts (what ``sse_fields`` would read); each event takes the
    time of the chunk that holds its last byte, the rest that of the last chunk, as in
    ``split_sse``, which cuts a stream with CR."""
    data = bytes(chunks.data)
    if CR_BYTE in data:
        events = split_sse(chunks)
        return events, decode_events([event.raw for event in events])
    ends, times = chunks.ends, chunks.times
    events = []
    fields: list[tuple[bytes, bytes]] = []
    end = at = 0
    for raw, name, value, other, rest in _EVENT.findall(data):
        if raw:
            fields.append((name, value))
        else:
            raw = other or rest
            fields.append(sse_fields(raw))
        if rest:
            at = len(times) - 1
        else:
            end += len(raw)
            while ends[at] < end:
                at += 1
        events.append(Event(times[at], raw))
    return events, decode_fields(fields)


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
                chunks = Chunks.of([(ns, decoder.feed(data)) for ns, data in chunks])
            except (ValueError, zlib.error, RuntimeError) as exc:
                record.decode_error = redact_text(f"{encoding}: {exc}")
                chunks = exchange.chunks
                record.content_encoding = None
        record.streaming = content_type.startswith("text/event-stream")
        if record.streaming:
            record.events, record.payloads = redact_stream(exchange.provider, *read_sse(chunks))
            record.response_body = b"".join([e.raw for e in record.events])
        else:
            record.response_body = redact_bytes(bytes(chunks.data))


def redact_stream(provider: str, events: list[Event], payloads: list[tuple[str, Any]]
                  ) -> tuple[list[Event], list[tuple[str, Any]]]:
    """The events with secrets obfuscated, and their decoded payloads (for ``ProviderParse``;
    ``payloads``, the events' ``decode_events``, is updated in place).

    Obfuscating each event alone is not enough: a model echoing a key sends it in pieces, one
    per delta event, and the reassembled text would hold it whole. So the pieces of each text
    (``stream_places`` of the provider) are obfuscated together first (``redact_pieces``), the
    events that held a share of a key are rewritten, and then every event is scanned alone."""
    module = anthropic if provider == "anthropic" else openai
    raws = [event.raw for event in events]
    texts = module.stream_places(payloads)
    rewritten: set[int] = set()
    for places in texts.values():
        redacted = redact_pieces([piece for _, _, piece in places])
        if redacted is None:
            continue
        for (number, path, old), new in zip(places, redacted, strict=True):
            if new != old:
                _set(payloads[number][1], path, new)
                rewritten.add(number)
    joined = b"".join(raws)
    if not rewritten and b"sk" not in joined and b"u00" not in joined and b"%" not in joined:
        return events, payloads  # what redact_bytes looks for first is in no event
    out: list[Event] = []
    for number, event in enumerate(events):
        raw = event.raw
        if number in rewritten:
            raw = _with_data(raw, orjson.dumps(payloads[number][1]))
        redacted_raw = redact_bytes(raw)
        if redacted_raw is not raw and redacted_raw != raw:
            payloads[number] = decode_event(redacted_raw)
        out.append(Event(event.ns, redacted_raw))
    return out, payloads


def _set(payload: Any, path: tuple[str | int, ...], value: str) -> None:
    for step in path[:-1]:
        payload = payload[step]
    payload[path[-1]] = value


def _with_data(raw: bytes, data: bytes) -> bytes:
    """An SSE event with its data line(s) replaced by one line holding ``data``."""
    out: list[bytes] = []
    placed = False
    for line in raw.splitlines(keepends=True):
        if not line.startswith(b"data:"):
            out.append(line)
        elif not placed:
            placed = True
            content = line.rstrip(b"\r\n")
            prefix = b"data: " if content.startswith(b"data: ") else b"data:"
            out.append(prefix + data + line[len(content):])
    return b"".join(out)


class ProviderParse:
    name = "provider"

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._recent: Recent[ParsedBody] = Recent(remembered)

    def _parse(self, exchange: Exchange, body: bytes) -> Any:
        """``orjson.loads(body)``, from the previous body of its conversation where it can."""
        if len(body) < SMALL_BODY:
            return orjson.loads(body)
        return self._recent.derive(conversation_key(exchange, body), body, parse_body).value

    def __call__(self, record: Record) -> None:
        exchange = record.exchange
        module = anthropic if exchange.provider == "anthropic" else openai
        parsed = record.parsed
        parsed.tracked = module.is_tracked(exchange.method, exchange.path)
        if not _looks_json(record.request_body):
            return
        try:
            body = self._parse(exchange, record.request_body)
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


def default_processors(remembered: int = REMEMBERED) -> list[Any]:
    """The processors before the session processor; ``remembered`` = 0 makes every body be
    redacted and parsed whole (the reference the incremental work is tested against)."""
    return [Redact(remembered), DecodeBody(), ProviderParse(remembered)]
