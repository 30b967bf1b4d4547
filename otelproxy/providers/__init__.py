"""Provider-specific knowledge: error shapes, which calls are conversation turns, parsing.

Each provider module offers ``is_tracked(method, path)``, ``parse_request(parsed, body_json)``,
``parse_response(record)`` and ``stream_pieces(payload)`` (where a stream delivers text in pieces,
for redaction across events); ``otelproxy.processors`` picks the module by name.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import orjson

UNDECODABLE: Any = object()
"""``decode_event``'s data for an event whose data is not JSON."""

Pieces = list[tuple[Hashable, tuple[str | int, ...], str]]
"""``(channel, path, piece)`` for each string of an event's payload that is a piece of a longer
text: the pieces of one channel (a content block's text, a tool call's arguments), in stream
order, concatenate to the text; ``path`` leads from the payload to the piece."""


def error_body(provider: str | None, error_type: str, message: str) -> bytes:
    """A JSON error in the provider's own shape, so SDKs surface ``message`` to the user."""
    if provider == "openai":
        return orjson.dumps(
            {"error": {"message": message, "type": error_type, "param": None, "code": error_type}}
        )
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def sse_fields(raw: bytes) -> tuple[str, str]:
    """``(event name, data)`` of one SSE event; data lines are joined with newlines."""
    name = "message"
    data: list[str] = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    return name, "\n".join(data)


def decode_event(raw: bytes) -> tuple[str, Any]:
    """``(event name, data decoded from JSON)``; None without data, ``UNDECODABLE`` when the
    data is not JSON (OpenAI's ``[DONE]``)."""
    name, data = sse_fields(raw)
    if not data:
        return name, None
    try:
        return name, orjson.loads(data)
    except orjson.JSONDecodeError:
        return name, UNDECODABLE


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
