"""One-line previews of a turn's user and assistant text, for ``otelproxy show`` and the index.

A preview is cut from text that was obfuscated already; it is obfuscated once more before the
cut all the same (``redact_text``), so no decoding path can bring a key into the index whole.
"""

from __future__ import annotations

import orjson

from otelproxy.redact import redact_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_LIMIT = 160


def _line(text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped:
            return redact_text(stripped)[:_LIMIT]
    return ""


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind in ("text", "input_text", "output_text"):
        text = str(block.get("text", ""))
        return "" if text.lstrip().startswith("<system-reminder>") else text
    if kind == "tool_result":
        content = block.get("content")
        inner = content if isinstance(content, str) else " ".join(
            _block_text(b) for b in content or [] if isinstance(b, dict | str))
        return f"[tool_result] {inner}"
    if kind in ("tool_use", "server_tool_use", "function_call"):
        arguments = block.get("input", block.get("arguments"))
        encoded = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
        return f"[{kind} {block.get('name', '')}] {encoded}"
    if kind == "function_call_output":
        return f"[function_call_output] {block.get('output', '')}"
    if kind == "message":
        return _content_text(block.get("content"))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for block in content:
            text = _line(_block_text(block))
            if text:
                return text
    return ""


def user_preview(messages: list[Any] | None) -> str:
    """First line of the newest user (or tool) message."""
    for message in reversed(messages or []):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool":
            return _line(f"[tool] {message.get('content', '')}")
        if message.get("role") == "user" or message.get("type") == "function_call_output":
            return _line(_content_text(message.get("content")) or _block_text(message))
    return ""


def assistant_preview(output: dict[str, Any] | None) -> str:
    """First line of the reassembled assistant message."""
    if not output:
        return ""
    if isinstance(output.get("output"), list):
        return _line(_content_text(output["output"]))
    text = _line(_content_text(output.get("content")))
    if text:
        return text
    for call in output.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            function = call["function"]
            return _line(f"[tool_call {function.get('name', '')}] {function.get('arguments', '')}")
    return ""
