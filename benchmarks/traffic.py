"""Claude-Code-shaped traffic: the requests the load generator sends and the SSE the fake
upstream answers, both deterministic so either side can build them alone.

A conversation turn is what Claude Code sends (DESIGN.md §4): ``POST /v1/messages?beta=true``,
``stream: true``, a system prompt of about 15 KB in two blocks, about 25 KB of tool definitions,
``metadata``, and a messages array that grows every turn by the assistant's answer (reassembled
from the stream, as a client does) and the next user message (a tool result of about 1.5 KB).
The answer is an Anthropic Messages stream of 150 events: ``message_start``,
``content_block_start``, ``ping``, 144 ``content_block_delta`` events, ``content_block_stop``,
``message_delta``, ``message_stop``.
"""

from __future__ import annotations

from typing import Any

import orjson

Json = dict[str, Any]

MODEL = "claude-sonnet-4-5"
API_KEY = "sk-ant-api03-bench-0000000000000000000000000000000000000000"
EVENTS = 150
"""Events in one answer (every kind; 144 of them are text deltas)."""
FRAME_EVENTS = 6
"""Events of an answer that are not text deltas."""
DELTA_SIZE = 140
"""Bytes of one ``content_block_delta`` event on the wire, blank line included."""
SYSTEM_BYTES = 15_000
TOOLS_BYTES = 25_000
TOOL_RESULT_BYTES = 1_500
MAX_TURNS = 12
"""A conversation's turns before the load generator starts a new one (its last request is
about 100 KB)."""

_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "the",
          "proxy", "records", "every", "byte", "of", "each", "exchange", "and", "the", "client",
          "reads", "its", "answer", "one", "event", "at", "a", "time")


def prose(size: int, seed: int) -> str:
    """Plain ASCII text of exactly ``size`` characters (no JSON escapes), varied by ``seed``."""
    words: list[str] = []
    length = 0
    index = seed
    while length < size:
        word = f"{_WORDS[index % len(_WORDS)]}{index % 97}"
        words.append(word)
        length += len(word) + 1
        index += 7
    return " ".join(words)[:size]


SYSTEM: list[Json] = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
    {"type": "text", "text": prose(SYSTEM_BYTES, 1), "cache_control": {"type": "ephemeral"}},
]


def _tool(number: int, size: int) -> Json:
    return {
        "name": f"Tool{number:02d}",
        "description": prose(size - 580, 100 + number),
        "input_schema": {
            "type": "object", "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
            "required": ["path"],
            "properties": {
                "path": {"type": "string", "description": prose(120, number)},
                "limit": {"type": "integer", "description": prose(80, number + 1)},
                "pattern": {"type": "string", "description": prose(80, number + 2)},
            },
        },
    }


TOOLS: list[Json] = [_tool(number, TOOLS_BYTES // 16) for number in range(16)]

HEADERS = {
    "content-type": "application/json", "accept": "application/json",
    "x-api-key": API_KEY, "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    "x-app": "cli", "user-agent": "claude-cli/2.1.197 (external, cli)",
    "x-stainless-lang": "js", "x-stainless-retry-count": "0",
}


def delta_text(index: int) -> str:
    """The text of the ``index``-th delta (the same in every answer)."""
    return f"tok{index:03d} " + prose(14, index)


DELTA_COUNT = EVENTS - FRAME_EVENTS
ANSWER_TEXT = "".join(delta_text(index) for index in range(DELTA_COUNT))
"""The assistant's whole answer, as a client reassembles it from the deltas."""


def sse_event(name: str, data: Json) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def delta_event(index: int) -> bytes:
    """The ``index``-th text delta, padded to exactly ``DELTA_SIZE`` bytes."""
    event = sse_event("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": delta_text(index)}})
    pad = DELTA_SIZE - len(event)
    assert pad >= 0, "a delta is larger than DELTA_SIZE"
    return event[:-2] + b" " * pad + b"\n\n"  # trailing blanks after the JSON are legal


STAMP_HEADER = "x-bench-stamp"
"""A request carrying this header gets deltas whose text is the upstream's send time."""
_STAMP_DIGITS = 19
_STAMP_MARK = b'"text":"t'


def stamped_delta(sent_ns: int) -> bytes:
    """A text delta of exactly ``DELTA_SIZE`` bytes whose text, ``t`` + 19 digits + a blank,
    is ``sent_ns``: the upstream's ``CLOCK_MONOTONIC`` (``time.monotonic_ns``) when it wrote the
    event. The clock is the same in every process of the machine, so the client can tell each
    event's delay from upstream write to client read, apart from the upstream's own pacing."""
    return _STAMPED[0] + b"%019d" % sent_ns + _STAMPED[1]


def _stamped_template() -> tuple[bytes, bytes]:
    event = sse_event("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": "t" + "0" * _STAMP_DIGITS + " "}})
    event = event[:-2] + b" " * (DELTA_SIZE - len(event)) + b"\n\n"
    cut = event.index(_STAMP_MARK) + len(_STAMP_MARK)
    return event[:cut], event[cut + _STAMP_DIGITS:]


_STAMPED = _stamped_template()


def sent_stamp(event: bytes) -> int | None:
    """The send time in an event from ``stamped_delta`` (None when it carries none)."""
    at = event.find(_STAMP_MARK)
    if at < 0:
        return None
    digits = event[at + len(_STAMP_MARK):at + len(_STAMP_MARK) + _STAMP_DIGITS]
    return int(digits) if digits.isdigit() and len(digits) == _STAMP_DIGITS else None


def _message(output_tokens: int, text: str | None) -> Json:
    return {
        "id": "msg_01BenchBenchBenchBenchBench", "type": "message", "role": "assistant",
        "model": MODEL, "content": [] if text is None else [{"type": "text", "text": text}],
        "stop_reason": None if text is None else "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 25_000, "output_tokens": output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 24_000},
    }


def stream_head() -> list[bytes]:
    """The events before the deltas, one write each."""
    return [
        sse_event("message_start", {"type": "message_start", "message": _message(1, None)}),
        sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
        sse_event("ping", {"type": "ping"}),
    ]


def stream_tail(deltas: int) -> bytes:
    """The events after the deltas, in one write."""
    return (
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + sse_event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": deltas}})
        + sse_event("message_stop", {"type": "message_stop"})
    )


def answer_writes(deltas: int = DELTA_COUNT) -> list[bytes]:
    """A whole streamed answer as the fake upstream writes it: the head's events, ``deltas``
    deltas, the tail (one network chunk each)."""
    return [*stream_head(), *(delta_event(index) for index in range(deltas)),
            stream_tail(deltas)]


def json_answer() -> bytes:
    """A non-streaming answer: a short JSON message."""
    return orjson.dumps(_message(3, "ok"))


def conversation_request(conversation: str, turn: int, stream: bool = True) -> bytes:
    """Turn ``turn`` (0-based) of a conversation, as Claude Code sends it."""
    messages: list[Json] = [{"role": "user", "content": [
        {"type": "text", "text": f"[{conversation}] Look at the repository and fix the bug."}]}]
    for earlier in range(turn):
        messages.append({"role": "assistant",
                         "content": [{"type": "text", "text": ANSWER_TEXT}]})
        messages.append({"role": "user", "content": [
            {"type": "text", "text": f"turn {earlier + 1}: " + prose(TOOL_RESULT_BYTES, earlier)}]})
    messages[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return orjson.dumps({
        "model": MODEL, "max_tokens": 32_000, "stream": stream,
        "system": SYSTEM, "tools": TOOLS, "messages": messages,
        "metadata": {"user_id": f"user_bench_account__session_{conversation}"},
        "thinking": {"type": "enabled", "budget_tokens": 4_000},
    })


def small_request() -> bytes:
    """The small POST of the wrk phase: a one-message, non-streaming call."""
    return orjson.dumps({"model": MODEL, "max_tokens": 16, "stream": False,
                         "messages": [{"role": "user", "content": "Say hello."}]})
