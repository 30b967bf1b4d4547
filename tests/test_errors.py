"""Errors reach the client in its provider's own shape (``otelproxy.errors.error_body``)."""

from __future__ import annotations

import orjson

from otelproxy.errors import error_body


def test_error_bodies_are_compact_json_in_each_providers_shape() -> None:
    """Anthropic's ``{"type": "error", "error": …}`` (also for an unknown provider) and
    OpenAI's ``{"error": …}``, written as compactly as orjson writes them; any message,
    quotes, control characters and non-ASCII text included, comes back as it was."""
    message = 'otelproxy: "x" \\ \n\t caf\u00e9'
    anthropic = error_body("anthropic", "api_error", message)
    assert orjson.loads(anthropic) == {"type": "error",
                                       "error": {"type": "api_error", "message": message}}
    assert error_body(None, "api_error", message) == anthropic
    openai = error_body("openai", "permission_error", message)
    assert orjson.loads(openai) == {"error": {"message": message, "type": "permission_error",
                                              "param": None, "code": "permission_error"}}
    ascii_only = error_body("anthropic", "api_error", "otelproxy: upstream refused")
    assert ascii_only == orjson.dumps(orjson.loads(ascii_only))
