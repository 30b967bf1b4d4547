"""OpenAI Chat Completions and Responses APIs: tracked calls, request fields, reassembly.

Chat streaming is ``data: {chunk}`` lines ending with ``data: [DONE]``; content pieces are
concatenated and ``delta.tool_calls[]`` are merged by ``index`` (the first fragment carries id and
name, later ones append ``function.arguments``); with ``stream_options.include_usage`` the last
chunk has ``choices: []`` and ``usage``. The Responses API streams named events; the final
response object is in ``response.completed`` (or ``response.incomplete``/``response.failed``).
"""

from __future__ import annotations

import orjson

from otelproxy.providers import Pieces, Places, as_int
from otelproxy.record import Parsed, Record, Usage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
RESPONSES_PATHS = ("/v1/responses", "/responses")
_FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def is_tracked(method: str, path: str) -> bool:
    return method == "POST" and path.rstrip("/") in CHAT_PATHS + RESPONSES_PATHS


def _is_responses(parsed: Parsed) -> bool:
    return isinstance(parsed.request_json, dict) and "input" in parsed.request_json


def parse_request(parsed: Parsed, body: dict[str, Any]) -> None:
    parsed.model = body.get("model") if isinstance(body.get("model"), str) else None
    parsed.stream = bool(body.get("stream", False))
    if "messages" in body:
        messages = body.get("messages")
        if isinstance(messages, list):
            parsed.system = [m for m in messages if isinstance(m, dict)
                             and m.get("role") in ("system", "developer")] or None
            parsed.messages = messages
    elif "input" in body:
        items = body["input"]
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        parsed.messages = items if isinstance(items, list) else None
        parsed.system = body.get("instructions")
        previous = body.get("previous_response_id")
        parsed.previous_response_id = previous if isinstance(previous, str) else None
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str):
        parsed.metadata_user_id = user
    if parsed.tracked:
        parsed.operation = "chat"
    if parsed.messages is None:
        parsed.tracked = False


def _usage(usage: Any) -> Usage:
    result = Usage()
    if not isinstance(usage, dict):
        return result
    result.input_tokens = as_int(usage.get("prompt_tokens", usage.get("input_tokens")))
    result.output_tokens = as_int(usage.get("completion_tokens", usage.get("output_tokens")))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    if isinstance(details, dict):
        result.cache_read_input_tokens = as_int(details.get("cached_tokens"))
    return result


def parse_response(record: Record) -> None:
    parsed = record.parsed
    if record.streaming:
        if _is_responses(parsed):
            response = _final_response(record.payloads)
            if response is not None:
                _finish_response(parsed, response)
        else:
            _finish_chat(parsed, reassemble_chat(record.payloads))
        return
    try:
        body = orjson.loads(record.response_body)
    except orjson.JSONDecodeError as exc:
        parsed.parse_error = f"response is not JSON: {exc}"
        return
    if not isinstance(body, dict):
        return
    if body.get("object") == "response":
        _finish_response(parsed, body)
    elif body.get("object") == "chat.completion":
        _finish_chat(parsed, body)
    else:
        parsed.response_json = body


def _finish_chat(parsed: Parsed, completion: dict[str, Any]) -> None:
    parsed.response_json = completion
    parsed.response_id = completion.get("id") if isinstance(completion.get("id"), str) else None
    model = completion.get("model")
    parsed.response_model = model if isinstance(model, str) else None
    parsed.usage = _usage(completion.get("usage"))
    choices = [c for c in completion.get("choices") or [] if isinstance(c, dict)]
    parsed.finish_reasons = [c["finish_reason"] for c in choices
                             if isinstance(c.get("finish_reason"), str)]
    if choices and isinstance(choices[0].get("message"), dict):
        parsed.output_message = dict(choices[0]["message"])


def _finish_response(parsed: Parsed, response: dict[str, Any]) -> None:
    parsed.response_json = response
    parsed.response_id = response.get("id") if isinstance(response.get("id"), str) else None
    model = response.get("model")
    parsed.response_model = model if isinstance(model, str) else None
    parsed.usage = _usage(response.get("usage"))
    status = response.get("status")
    parsed.finish_reasons = [status] if isinstance(status, str) else []
    output = response.get("output")
    parsed.output_message = {"role": "assistant", "output": output if isinstance(output, list)
                             else []}


def _final_response(events: list[tuple[str, Any]]) -> dict[str, Any] | None:
    for name, payload in reversed(events):
        if not isinstance(payload, dict):
            continue
        kind = payload.get("type", name)
        if kind in _FINAL_RESPONSE_EVENTS and isinstance(payload.get("response"), dict):
            response: dict[str, Any] = payload["response"]
            return response
    return None


_CHAT_TEXT_KEYS = ("content", "refusal", "reasoning_content", "reasoning")


def stream_pieces(payload: Any) -> Pieces:
    """Chat: each choice's text and each tool call's arguments; Responses: every ``….delta``
    event's text, per output item and part."""
    if not isinstance(payload, dict):
        return []
    kind = payload.get("type")
    delta_text = payload.get("delta")
    if isinstance(kind, str) and kind.endswith(".delta") and isinstance(delta_text, str):
        return [((kind, payload.get("item_id"), payload.get("output_index"),
                  payload.get("content_index"), payload.get("summary_index")), ("delta",),
                 delta_text)]
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return []
    pieces: Pieces = []
    for at, choice in enumerate(choices):
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        index = choice.get("index")
        pieces += [((index, key), ("choices", at, "delta", key), delta[key])
                   for key in _CHAT_TEXT_KEYS if isinstance(delta.get(key), str)]
        calls = delta.get("tool_calls")
        for call_at, call in enumerate(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                pieces.append(((index, "tool_call", call.get("index")),
                               ("choices", at, "delta", "tool_calls", call_at, "function",
                                "arguments"), arguments))
    return pieces


def stream_places(payloads: list[tuple[str, Any]]) -> Places:
    """``stream_pieces`` of every payload of a stream, by channel."""
    texts: Places = {}
    for number, (_, payload) in enumerate(payloads):
        for channel, path, piece in stream_pieces(payload):
            texts.setdefault(channel, []).append((number, path, piece))
    return texts


def reassemble_chat(events: list[tuple[str, Any]]) -> dict[str, Any]:
    """The ``chat.completion`` object a non-streaming call would have returned."""
    completion: dict[str, Any] = {"object": "chat.completion", "choices": []}
    choices: dict[int, dict[str, Any]] = {}
    for _, chunk in events:
        if not isinstance(chunk, dict):
            continue
        for key in ("id", "model", "created", "system_fingerprint", "service_tier"):
            if key in chunk:
                completion[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            completion["usage"] = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = as_int(choice.get("index")) or 0
            state = choices.setdefault(
                index, {"index": index, "message": {"role": "assistant", "content": None},
                        "finish_reason": None})
            if choice.get("finish_reason") is not None:
                state["finish_reason"] = choice["finish_reason"]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _apply_chat_delta(state["message"], delta)
    for index in sorted(choices):
        message = choices[index]["message"]
        calls = message.pop("x_tool_calls", None)
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        completion["choices"].append(choices[index])
    return completion


def _apply_chat_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key, value in delta.items():
        if key == "tool_calls" and isinstance(value, list):
            calls = message.setdefault("x_tool_calls", {})
            for fragment in value:
                if not isinstance(fragment, dict):
                    continue
                index = as_int(fragment.get("index")) or 0
                call = calls.setdefault(index, {"id": None, "type": "function",
                                                "function": {"name": "", "arguments": ""}})
                if fragment.get("id"):
                    call["id"] = fragment["id"]
                if fragment.get("type"):
                    call["type"] = fragment["type"]
                function = fragment.get("function")
                if isinstance(function, dict):
                    if function.get("name"):
                        call["function"]["name"] += function["name"]
                    if function.get("arguments"):
                        call["function"]["arguments"] += function["arguments"]
        elif key in _CHAT_TEXT_KEYS and isinstance(value, str):
            message[key] = (message.get(key) or "") + value
        elif value is not None:
            message[key] = value
