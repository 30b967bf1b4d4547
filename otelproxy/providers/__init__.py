"""Provider-specific knowledge: error shapes, which calls are conversation turns, parsing.

Each provider module offers ``is_tracked(method, path)``, ``parse_request(parsed, body_json)``
and ``parse_response(record)``; ``otelproxy.processors.ProviderParse`` picks the module by name.
"""

from __future__ import annotations

import orjson


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


def as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
