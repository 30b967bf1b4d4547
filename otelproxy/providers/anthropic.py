"""Anthropic Messages API: tracked calls, request fields, and response reassembly.

Reassembly follows the SSE protocol (DESIGN §4): ``message_start`` → per block
``content_block_start`` / ``content_block_delta``* / ``content_block_stop`` → ``message_delta``
(cumulative usage) → ``message_stop``. ``text_delta``, ``thinking_delta``, ``signature_delta``
(replaces), ``input_json_delta`` (fragments concatenated, parsed once at the block's stop; none
→ ``{}``) and ``citations_delta`` are applied; blocks that arrive whole (tool results,
redacted_thinking) are kept as they came; unknown delta types are kept on the block under
``"x_deltas"`` and unknown events in ``Parsed`` notes, never dropped silently.
"""

from __future__ import annotations

import orjson

from otelproxy.providers import UNDECODABLE, Places, as_int
from otelproxy.record import Parsed, Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TRACKED_PATHS = ("/v1/messages",)
_JSON_INPUT_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")


def is_tracked(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/") in TRACKED_PATHS


def parse_request(parsed: Parsed, body: dict[str, Any]) -> None:
    parsed.model = body.get("model") if isinstance(body.get("model"), str) else None
    parsed.stream = bool(body.get("stream", False))
    messages = body.get("messages")
    parsed.messages = messages if isinstance(messages, list) else None
    parsed.system = body.get("system")
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        parsed.metadata_user_id = metadata["user_id"]
    if parsed.tracked:
        parsed.operation = "chat"
    if parsed.messages is None:
        parsed.tracked = False


def _apply_usage(parsed: Parsed, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    target = parsed.usage
    for key in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                "cache_creation_input_tokens"):
        value = as_int(usage.get(key))
        if value is not None:
            setattr(target, key, value)


def _finish_message(parsed: Parsed, message: dict[str, Any]) -> None:
    parsed.response_json = message
    parsed.response_id = message.get("id") if isinstance(message.get("id"), str) else None
    model = message.get("model")
    parsed.response_model = model if isinstance(model, str) else None
    stop = message.get("stop_reason")
    parsed.finish_reasons = [stop] if isinstance(stop, str) else []
    _apply_usage(parsed, message.get("usage"))
    content = message.get("content")
    parsed.output_message = {
        "role": message.get("role", "assistant"),
        "content": content if isinstance(content, list) else [],
    }


def parse_response(record: Record) -> None:
    parsed = record.parsed
    if not record.streaming:
        try:
            message = orjson.loads(record.response_body)
        except orjson.JSONDecodeError as exc:
            parsed.parse_error = f"response is not JSON: {exc}"
            return
        if isinstance(message, dict) and message.get("type") == "message":
            _finish_message(parsed, message)
        else:
            parsed.response_json = message
        return
    message = reassemble(record.payloads, record.notes)
    if message is not None:
        _finish_message(parsed, message)


_DELTA_TEXT_KEYS = {"text_delta": "text", "thinking_delta": "thinking",
                    "input_json_delta": "partial_json"}
_DELTA_PATHS = {key: ("delta", key) for key in _DELTA_TEXT_KEYS.values()}


def stream_places(payloads: list[tuple[str, Any]]) -> Places:
    """The text, thinking and tool input JSON the ``content_block_delta`` events of a stream
    carry, by block (written with subscripts: it runs over every event, and a payload that is
    not such a delta raises ``KeyError`` or ``TypeError`` on the way). A piece for the same
    block and key as the one before (the usual) goes to that one's list without a lookup: an
    index equal to the last one (hashable, as it was looked up) is the same dict key."""
    texts: Places = {}
    last_index: Any = None
    last_key = ""
    places: list[tuple[int, tuple[str | int, ...], str]] = []
    path: tuple[str | int, ...] = ()
    for number, (_, payload) in enumerate(payloads):
        try:
            if payload["type"] != "content_block_delta":
                continue
            delta = payload["delta"]
            key = _DELTA_TEXT_KEYS[delta["type"]]
            piece = delta[key]
        except (KeyError, TypeError):  # TypeError: not a dict, or an unhashable delta type
            continue
        if type(piece) is not str:
            continue
        index = payload.get("index")
        if key != last_key or index != last_index:
            channel = (index, key)
            found = texts.get(channel)
            places = texts[channel] = [] if found is None else found
            last_index, last_key, path = index, key, _DELTA_PATHS[key]
        places.append((number, path, piece))
    return texts


_TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking"}


def reassemble(events: list[tuple[str, Any]], notes: list[str]) -> dict[str, Any] | None:
    """The final message object a non-streaming call would have returned, from SSE events
    (each as ``decode_event`` gives it).

    A block's text and thinking arrive in a hundred or more pieces: they are gathered in lists
    (``texts``: block index → field → pieces, the first piece being the field's value once the
    first delta was added to it) and joined once at the end, into the same dict key."""
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    texts: dict[int, dict[str, list[str]]] = {}
    partial_json: dict[int, list[str]] = {}
    last_index: int | None = None  # the block and field the last piece went to, and its list
    last_field = ""
    last_kind: Any = ""  # the delta type that named last_field
    last_pieces: list[str] = []
    for name, payload in events:
        if type(payload) is not dict:
            if payload is UNDECODABLE:
                notes.append(f"anthropic: undecodable data in {name!r} event")
            continue
        kind = payload.get("type", name)
        if kind == "content_block_delta":
            index = payload.get("index")
            delta = payload.get("delta")
            if type(index) is not int or type(delta) is not dict:
                continue
            delta_kind = delta.get("type")
            if index == last_index and delta_kind == last_kind:  # the usual: same as before
                value = delta.get(last_field, "")
                last_pieces.append(value if type(value) is str else str(value))
                continue
            field = _TEXT_DELTAS.get(delta_kind) if type(delta_kind) is str else None
            if field is not None:
                value = delta.get(field, "")
                piece = value if type(value) is str else str(value)
                fields = texts.get(index)
                if fields is not None and (pieces := fields.get(field)) is not None:
                    pieces.append(piece)
                    last_index, last_field, last_pieces = index, field, pieces
                    last_kind = delta_kind
                    continue
                block = blocks.get(index)
                if block is None:
                    block = blocks[index] = {}
                if index not in partial_json:
                    partial_json[index] = []
                block[field] = block.get(field, "") + piece  # the first: raises as it did
                last_pieces = texts.setdefault(index, {})[field] = [block[field]]
                last_index, last_field, last_kind = index, field, delta_kind
                continue
            block = blocks.get(index)
            if block is None:
                block = blocks[index] = {}
            fragments = partial_json.get(index)
            if fragments is None:
                fragments = partial_json[index] = []
            _apply_delta(block, delta, fragments)
        elif kind == "message_start":
            start = payload.get("message")
            message = dict(start) if isinstance(start, dict) else {}
            message["content"] = []
        elif kind == "content_block_start":
            index = as_int(payload.get("index"))
            block = payload.get("content_block")
            if index is not None and isinstance(block, dict):
                blocks[index] = dict(block)
                texts.pop(index, None)  # the pieces of the block it replaces go with it
                last_index = None
        elif kind == "content_block_stop":
            index = as_int(payload.get("index"))
            if index is not None and index in blocks:
                _finish_block(blocks[index], partial_json.get(index, []), notes)
        elif kind == "message_delta":
            if message is None:
                message = {"content": []}
            delta = payload.get("delta")
            if isinstance(delta, dict):
                message.update(delta)
            usage = payload.get("usage")
            if isinstance(usage, dict):
                merged = dict(message.get("usage") or {})
                merged.update(usage)
                message["usage"] = merged
        elif kind == "error":
            if message is None:
                message = {"content": []}
            message["x_error"] = payload.get("error")
        elif kind not in ("message_stop", "ping"):
            notes.append(f"anthropic: kept unknown event {kind!r}")
            if message is not None:
                message.setdefault("x_unknown_events", []).append(payload)
    for index, fields in texts.items():
        for field, pieces in fields.items():
            blocks[index][field] = "".join(pieces)
    if message is None:
        return None
    for index in sorted(blocks):
        block = blocks[index]
        if index in partial_json and "x_partial_json" in block:
            _finish_block(block, partial_json[index], notes)
        message["content"].append(block)
    return message


def _apply_delta(block: dict[str, Any], delta: dict[str, Any], fragments: list[str]) -> None:
    """A delta other than text and thinking (those are gathered by ``reassemble``)."""
    kind = delta.get("type")
    if kind == "signature_delta":
        block["signature"] = delta.get("signature", "")
    elif kind == "input_json_delta":
        fragments.append(str(delta.get("partial_json", "")))
        block["x_partial_json"] = True
    elif kind == "citations_delta":
        block.setdefault("citations", []).append(delta.get("citation"))
    else:
        block.setdefault("x_deltas", []).append(delta)


def _finish_block(block: dict[str, Any], fragments: list[str], notes: list[str]) -> None:
    had_fragments = block.pop("x_partial_json", False)
    if block.get("type") not in _JSON_INPUT_BLOCKS and not had_fragments:
        return
    text = "".join(fragments)
    if not text:
        block.setdefault("input", {})
        return
    try:
        block["input"] = orjson.loads(text)
    except orjson.JSONDecodeError:
        notes.append("anthropic: tool input JSON did not parse; kept as text")
        block["input"] = text
