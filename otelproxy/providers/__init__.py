"""Provider-specific knowledge: which calls are conversation turns, parsing (error shapes:
``otelproxy.errors.error_body``).

Each provider module offers ``is_tracked(method, path)``, ``parse_request(parsed, body_json)``,
``parse_response(record)`` and ``stream_places(payloads)`` (where a stream delivers text in
pieces: each text's pieces, for redaction across events); ``otelproxy.processors`` picks the
module by name.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import orjson

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

UNDECODABLE: Any = object()
"""``decode_event``'s data for an event whose data is not JSON."""

Pieces = list[tuple[Hashable, tuple[str | int, ...], str]]
"""``(channel, path, piece)`` for each string of one event's payload that is a piece of a longer
text: the pieces of one channel (a content block's text, a tool call's arguments), in stream
order, concatenate to the text; ``path`` leads from the payload to the piece."""

Places = dict[Hashable, list[tuple[int, tuple[str | int, ...], str]]]
"""A stream's pieces by channel: ``(event number, path, piece)`` in stream order."""


def decode_event(raw: bytes) -> tuple[str, Any]:
    """``(event name, data decoded from JSON)`` of one SSE event (see ``decode_events``)."""
    return decode_events((raw,))[0]


def decode_events(raws: Iterable[bytes]) -> list[tuple[str, Any]]:
    """``(event name, data decoded from JSON)`` of each SSE event (data lines joined with
    newlines); None without data, ``UNDECODABLE`` when the data is not JSON (OpenAI's
    ``[DONE]``). Lines end at CRLF, CR or LF, as the SSE spec has it; bytes that are not UTF-8
    read as U+FFFD."""
    return decode_fields([sse_fields(raw) for raw in raws])


def sse_fields(raw: bytes) -> tuple[bytes, bytes]:
    """The bytes after ``event:`` (of the last such line) and the data lines' values joined
    with newlines, of one SSE event.

    Runs over every event of every stream, so it works on the bytes: the usual event
    (``event: …\ndata: …\n\n``) is cut with a few searches."""
    first_end = raw.find(b"\n")
    if raw[:6] == b"event:" and raw[first_end:first_end + 7] == b"\ndata: " \
            and raw.find(b"\n", first_end + 7) == len(raw) - 2 and raw[-1:] == b"\n" \
            and CR_BYTE not in raw:
        return raw[6:first_end], raw[first_end + 7:-2]
    if CR_BYTE in raw:  # CR and LF are ASCII: never part of a multi-byte character
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    name = _MESSAGE
    parts: list[bytes] = []
    for line in raw.split(b"\n"):
        if line[:5] == b"data:":
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line[:6] == b"event:":
            name = line[6:]
    return name, b"\n".join(parts)


def decode_fields(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, Any]]:
    """``decode_events`` of events given as ``sse_fields`` gives them: orjson reads the data
    as it came, and only data that is not UTF-8 is decoded with replacement first."""
    out: list[tuple[str, Any]] = []
    names = _NAMES
    loads = orjson.loads
    for name, data in fields:
        event = names.get(name)
        if event is None:
            event = name.decode("utf-8", "replace").strip()
            if len(names) < _NAMES_KEPT:
                names[name] = event
        if not data:
            out.append((event, None))
            continue
        try:
            out.append((event, loads(data)))
        except orjson.JSONDecodeError:
            out.append((event, _decode_text(data)))
    return out


def _decode_text(data: bytes) -> Any:
    """Data orjson refused: not UTF-8 (decoded with replacement, then read) or not JSON."""
    try:
        return orjson.loads(data.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        return UNDECODABLE


CR_BYTE = ord("\r")
"""``CR_BYTE in data`` (an int) is a memchr; ``b"\\r" in data`` is ten times slower."""
_MESSAGE = b" message"
_NAMES: dict[bytes, str] = {_MESSAGE: "message"}
"""Event names as they came (after ``event:``) → as ``decode_event`` gives them."""
_NAMES_KEPT = 256


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
