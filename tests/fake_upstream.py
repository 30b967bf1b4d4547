"""A loopback fake of the Anthropic and OpenAI HTTP APIs, used as the upstream in tests.

It speaks the real wire protocols (DESIGN.md §4) closely enough that the official `anthropic`
and `openai` SDKs and the real Claude Code CLI parse it without complaint.

    with FakeUpstream() as fake:
        fake.replies.append(Reply(blocks=[{"type": "text", "text": "hi"}], gzip=True))
        client = anthropic.Anthropic(base_url=fake.url, api_key="dummy")
        ...
        assert fake.model_calls()[0].json()["model"] == "claude-x"

Model calls (POST /v1/messages, /v1/chat/completions, /v1/responses) take the next `Reply`
from `fake.replies`; when that is empty the `responder` (default: `default_responder`) decides.
A `Reply` is written in Anthropic content-block terms and translated for the OpenAI endpoints
(text -> content / output_text, tool_use -> tool_calls / function_call items, thinking ->
Responses reasoning summary). OpenAI SDK clients use `base_url=fake.url + "/v1"`.

What Claude Code 2.1.337 sends (verified against this fake, each point below run side by side
with 2.1.332; samples in tests/data/claude_code/, regenerate with
`python -m tests.fake_upstream capture-claude tests/data/claude_code`). 2.1.337 sends what
2.1.332 sent but for its version in User-Agent and in the billing header, and one line of the
claude-api skill's description in a `role: "system"` entry (its trigger list adds `agent_01…`):

- Per CLI run with `claude_env`: only `POST /v1/messages?beta=true`, always `"stream": true`,
  compact JSON, ~49 KB first body. Without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC a
  `HEAD {base URL}/api/hello` (a connection warm-up) comes first.
- Headers, in this order and case: Accept, Content-Type, User-Agent: claude-cli/2.1.337
  (external, sdk-cli), X-Claude-Code-Session-Id: <uuid4>, X-Stainless-* (Package-Version
  0.128.0), anthropic-beta (claude-code-20250219, interleaved-thinking-2025-05-14,
  context-management-2025-06-27, per-turn-control-2026-07-01,
  mid-conversation-tool-changes-2026-07-01, thinking-token-count-2026-05-13,
  advanced-tool-use-2025-11-20, effort-2025-11-24), anthropic-dangerous-direct-browser-access,
  anthropic-version, x-api-key, x-app: cli, Connection, Host, Accept-Encoding: gzip, deflate,
  br, zstd, Content-Length. A subagent's calls add `x-claude-code-agent-id` (new per spawn,
  `a` + 16 hex digits), a nested subagent's also `x-claude-code-parent-agent-id`.
- Session id: a new uuid per `claude -p` run; the same across `--continue`, `--resume ID`,
  `/compact`, auto-compaction and `--resume-session-at`; a new one with `--resume ID
  --fork-session` although the history sent is the old one. `metadata.user_id` is a JSON
  *string* {"device_id", "account_uuid": "", "session_id"} whose session_id equals the header.
- Body keys: model (claude-opus-5-5), messages, system, tools (12 in -p mode: Agent, Bash,
  Edit, ListAgents, Read, ...), metadata, max_tokens (128000), thinking {"type": "adaptive",
  "display": "omitted"}, context_management, output_config {"effort": "medium"}, stream.
- system: 3 text blocks (billing header `x-anthropic-billing-header: cc_version=2.1.337.15e;
  cc_entrypoint=sdk-cli;`, "You are a Claude agent, built on Anthropic's Claude
  Agent SDK.", the big prompt); [1] and [2] carry cache_control.
- messages[0] is the user turn as a block list (a `<system-reminder>` block, then the prompt).
  `role: "system"` entries sit in messages (environment, deferred tools, agent types); one
  arrives as a block list and is replayed as a plain string on the next call.
- cache_control: one marker on the last block of the last message; it moves every call.
- Tool loop: assistant turns replayed as received; results as `tool_result` user turns.
- Agent tool: subagents run in the background by default: the tool_result is "Async agent
  launched successfully…", the subagent's calls (own agent id, the task as its first user
  message) run beside the parent's, and its report reaches the parent later as a user turn
  holding a `<task-notification>`. A fork subagent (`subagent_type: "fork"`) sends the parent's
  whole history, the spawning assistant turn cut to its tool_use block, then a tool_result
  ("Fork started — that fork is you.") with a `<fork-boilerplate>` directive.
- Compaction (`/compact`, or automatically when the last answer's usage nears the context
  window): a call whose last user message asks for "a detailed summary of the conversation
  so far" (answered with `<analysis>`/`<summary>`), then calls whose history starts with "This
  session is being continued from a previous conversation that ran out of context." plus a
  short tail — after auto-compaction a single user message.
- It accepts gzip-encoded SSE from the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import gzip as gzip_module
import hashlib
import os
import re
import secrets
import shutil
import string
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import orjson
from aiohttp import web

__all__ = [
    "CLAUDE_BIN",
    "FakeUpstream",
    "LoopThread",
    "ReceivedRequest",
    "Reply",
    "anthropic_message",
    "anthropic_sse",
    "claude_env",
    "default_responder",
    "fake_upstream_fixture",
    "find_claude_bin",
    "openai_chat_completion",
    "openai_chat_sse",
    "openai_response_object",
    "openai_responses_sse",
    "run_claude",
]

T = TypeVar("T")

MODEL_CALL_PATHS = frozenset({"/v1/messages", "/v1/chat/completions", "/v1/responses"})
MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_TEXT = "Hello from the fake upstream."
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
RUN_TOOL_MARKER = "RUN_TOOL:"

_BASE62 = string.digits + string.ascii_letters


def _rand(n: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(n))


def _new_id(prefix: str) -> str:
    return f"{prefix}{_rand(24)}"


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


# --------------------------------------------------------------------------------------------
# Event loop in a thread
# --------------------------------------------------------------------------------------------


class LoopThread:
    """An asyncio event loop running in a daemon thread; `run` submits coroutines to it."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="fake-upstream-loop", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30) -> T:
        """Run `coro` on the loop and return its result (raises its exception)."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        if self.loop.is_running():

            async def _cancel_all() -> None:
                me = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not me]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.run(_cancel_all(), timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(10)
        self._thread = None
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()


# --------------------------------------------------------------------------------------------
# Request / reply model
# --------------------------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    """One request as the fake received it: raw headers in order (duplicates kept), raw body."""

    method: str
    path: str
    query_string: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float = field(default_factory=time.time)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


def _default_blocks() -> list[dict[str, Any]]:
    return [{"type": "text", "text": DEFAULT_TEXT}]


@dataclass
class Reply:
    """What the fake answers to one model call, in Anthropic content-block terms.

    blocks: text, thinking (thinking + signature), redacted_thinking (data), tool_use
        (id, name, input), server_tool_use, web_search_tool_result (sent whole), and any
        unknown type (sent whole via content_block_start). Missing tool ids are generated.
    stop_reason: default "tool_use" if any tool_use block else "end_turn".
    model: default the request's model.
    usage: Anthropic-style usage (input_tokens, output_tokens, cache_read_input_tokens,
        cache_creation_input_tokens); default computed from request/answer sizes (~4 bytes
        per token); when the request has cache_control, 3/4 of the input counts as
        cache_creation the first time a (system, tools) prefix is seen and as cache_read after.
        message_start carries output_tokens <= 1, message_delta the final cumulative usage.
        For the OpenAI endpoints it is translated unless it already has OpenAI keys.
    status / body / headers: a non-200 status without body answers the provider's error JSON;
        `body` replaces the whole response body (sent in one write, gzip applied on top when
        `gzip`); `headers` override (same name, case-insensitive) or extend the defaults.
    gzip: content-encoding gzip; streams are compressed incrementally, flushed per event.
    event_delay: seconds between SSE events; first_byte_delay: seconds before the headers.
    drop_after_events: abort the TCP connection after N SSE events (0: right after headers;
        for a non-streamed answer: after the headers, before the body).
    error_event: Anthropic streams only -- after the blocks' events emit `event: error` with
        this error (`{"type": "overloaded_error", "message": ...}` or a whole
        `{"type": "error", "error": {...}}`) instead of message_delta/message_stop.
    """

    blocks: list[dict[str, Any]] = field(default_factory=_default_blocks)
    stop_reason: str | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None
    status: int = 200
    body: bytes | None = None
    headers: list[tuple[str, str]] | None = None
    gzip: bool = False
    event_delay: float = 0.0
    first_byte_delay: float = 0.0
    drop_after_events: int | None = None
    error_event: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Shared helpers for building answers
# --------------------------------------------------------------------------------------------


def _split_words(text: str, words_per_piece: int = 2) -> list[str]:
    """Split text into several token-ish pieces that concatenate back to `text`."""
    if not text:
        return []
    tokens = re.findall(r"\s*\S+\s*?(?=\s|$)|\s+", text)
    if "".join(tokens) != text:  # pathological whitespace: fall back to fixed-size slices
        return [text[i : i + 8] for i in range(0, len(text), 8)]
    pieces = [
        "".join(tokens[i : i + words_per_piece]) for i in range(0, len(tokens), words_per_piece)
    ]
    return pieces


def _split_fixed(text: str, size: int = 12) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def normalize_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy blocks, filling in what the API always sends (tool ids, signatures, empty input)."""
    out: list[dict[str, Any]] = []
    for block in blocks:
        b = dict(block)
        kind = b.get("type")
        if kind == "tool_use":
            b.setdefault("id", _new_id("toolu_01"))
            b.setdefault("input", {})
        elif kind == "server_tool_use":
            b.setdefault("id", _new_id("srvtoolu_01"))
            b.setdefault("input", {})
        elif kind == "thinking":
            b.setdefault("thinking", "")
            b.setdefault("signature", "Eq" + _rand(86) + "==")
        elif kind == "text":
            b.setdefault("text", "")
        out.append(b)
    return out


def _stop_reason(reply: Reply, blocks: list[dict[str, Any]]) -> str:
    if reply.stop_reason is not None:
        return reply.stop_reason
    return "tool_use" if any(b.get("type") == "tool_use" for b in blocks) else "end_turn"


def _output_size(blocks: list[dict[str, Any]]) -> int:
    size = 0
    for b in blocks:
        kind = b.get("type")
        if kind == "text":
            size += len(str(b.get("text", "")))
        elif kind == "thinking":
            size += len(str(b.get("thinking", "")))
        elif kind in ("tool_use", "server_tool_use"):
            size += len(_json_text(b.get("input", {})))
        else:
            size += len(_json_text(b))
    return size


def compute_usage(
    blocks: list[dict[str, Any]], request_bytes: int = 0, cached_fraction: tuple[int, int] = (0, 0)
) -> dict[str, Any]:
    """Anthropic-style usage: ~4 bytes per token; `cached_fraction` = (creation, read) tokens."""
    total_in = max(1, request_bytes // 4)
    creation, read = cached_fraction
    return {
        "input_tokens": max(1, total_in - creation - read),
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "output_tokens": max(1, _output_size(blocks) // 4),
    }


def _resolved_usage(
    reply: Reply, blocks: list[dict[str, Any]], usage: dict[str, Any] | None
) -> dict[str, Any]:
    if usage is not None:
        return usage
    if reply.usage is not None:
        return reply.usage
    return compute_usage(blocks)


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


# --------------------------------------------------------------------------------------------
# Anthropic Messages
# --------------------------------------------------------------------------------------------


def _anthropic_usage_start(usage: dict[str, Any]) -> dict[str, Any]:
    start = {
        "input_tokens": usage.get("input_tokens", 0),
        "cache_creation_input_tokens": usage.get("cache_creation_input_tokens", 0),
        "cache_read_input_tokens": usage.get("cache_read_input_tokens", 0),
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.get("cache_creation_input_tokens", 0),
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": min(1, int(usage.get("output_tokens", 1))),
        "service_tier": "standard",
    }
    for key, value in usage.items():
        if key not in start:
            start[key] = value
    return start


def _anthropic_usage_delta(usage: dict[str, Any]) -> dict[str, Any]:
    delta = {
        "input_tokens": usage.get("input_tokens", 0),
        "cache_creation_input_tokens": usage.get("cache_creation_input_tokens", 0),
        "cache_read_input_tokens": usage.get("cache_read_input_tokens", 0),
        "output_tokens": usage.get("output_tokens", 0),
    }
    if "server_tool_use" in usage:
        delta["server_tool_use"] = usage["server_tool_use"]
    return delta


def _anthropic_block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    kind = block.get("type")
    events: list[bytes] = []

    def start(content_block: dict[str, Any]) -> None:
        events.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": content_block},
            )
        )

    def delta(d: dict[str, Any]) -> None:
        events.append(
            _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        )

    if kind == "text":
        citations = block.get("citations")
        first: dict[str, Any] = {"type": "text", "text": ""}
        if citations:
            first["citations"] = []
        start(first)
        for piece in _split_words(str(block.get("text", ""))):
            delta({"type": "text_delta", "text": piece})
        for citation in citations or []:
            delta({"type": "citations_delta", "citation": citation})
    elif kind == "thinking":
        start({"type": "thinking", "thinking": "", "signature": ""})
        for piece in _split_words(str(block.get("thinking", ""))):
            delta({"type": "thinking_delta", "thinking": piece})
        delta({"type": "signature_delta", "signature": block.get("signature", "")})
    elif kind in ("tool_use", "server_tool_use"):
        first = {k: v for k, v in block.items() if k != "input"}
        first["input"] = {}
        start(first)
        tool_input = block.get("input", {})
        if tool_input != {}:
            for fragment in _split_fixed(_json_text(tool_input)):
                delta({"type": "input_json_delta", "partial_json": fragment})
    else:  # redacted_thinking, web_search_tool_result, and every type we do not know: whole
        start(block)
    events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def anthropic_message(
    reply: Reply, model: str, *, usage: dict[str, Any] | None = None, message_id: str | None = None
) -> dict[str, Any]:
    """The non-streamed Messages API JSON object for `reply`."""
    blocks = normalize_blocks(reply.blocks)
    final_usage = _resolved_usage(reply, blocks, usage)
    full_usage = _anthropic_usage_start(final_usage)
    full_usage["output_tokens"] = final_usage.get("output_tokens", 0)
    return {
        "id": message_id or _new_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": reply.model or model,
        "content": blocks,
        "stop_reason": _stop_reason(reply, blocks),
        "stop_sequence": None,
        "usage": full_usage,
    }


def anthropic_sse(
    reply: Reply,
    model: str,
    *,
    usage: dict[str, Any] | None = None,
    message_id: str | None = None,
    blocks: list[dict[str, Any]] | None = None,
) -> list[bytes]:
    """The Messages API SSE events (`event: X\\ndata: {...}\\n\\n` each) for `reply`.

    Pass `blocks` (from `normalize_blocks`) to keep generated ids identical to another view.
    """
    blocks = normalize_blocks(reply.blocks) if blocks is None else blocks
    final_usage = _resolved_usage(reply, blocks, usage)
    message: dict[str, Any] = {
        "id": message_id or _new_id("msg_01"),
        "type": "message",
        "role": "assistant",
        "model": reply.model or model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_usage_start(final_usage),
    }
    events = [
        _sse("message_start", {"type": "message_start", "message": message}),
        b'event: ping\ndata: {"type": "ping"}\n\n',  # the real API really puts a space here
    ]
    for index, block in enumerate(blocks):
        events.extend(_anthropic_block_events(index, block))
    if reply.error_event is not None:
        err = reply.error_event
        payload = (
            err
            if err.get("type") == "error" and "error" in err
            else {"type": "error", "error": err}
        )
        events.append(_sse("error", payload))
        return events
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(reply, blocks), "stop_sequence": None},
                "usage": _anthropic_usage_delta(final_usage),
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


# --------------------------------------------------------------------------------------------
# OpenAI shared
# --------------------------------------------------------------------------------------------

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "refusal": "content_filter",
}


def _call_id(block: dict[str, Any]) -> str:
    raw = str(block.get("id") or "")
    if raw.startswith("call_"):
        return raw
    if raw.startswith("toolu_"):
        return "call_" + raw[len("toolu_") :]
    return "call_" + (raw or _rand(24))


def _text_of(blocks: list[dict[str, Any]]) -> str:
    return "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")


def _tool_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in blocks if b.get("type") == "tool_use"]


def _chat_usage(usage: dict[str, Any]) -> dict[str, Any]:
    if "prompt_tokens" in usage:
        return usage
    cached = int(usage.get("cache_read_input_tokens", 0))
    prompt = (
        int(usage.get("input_tokens", 0))
        + cached
        + int(usage.get("cache_creation_input_tokens", 0))
    )
    completion = int(usage.get("output_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _responses_usage(usage: dict[str, Any], reasoning_tokens: int = 0) -> dict[str, Any]:
    if "total_tokens" in usage or "input_tokens_details" in usage:
        return usage
    cached = int(usage.get("cache_read_input_tokens", 0))
    written = int(usage.get("cache_creation_input_tokens", 0))
    prompt = int(usage.get("input_tokens", 0)) + cached + written
    completion = int(usage.get("output_tokens", 0))
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt + completion,
    }


# --------------------------------------------------------------------------------------------
# OpenAI Chat Completions
# --------------------------------------------------------------------------------------------


def openai_chat_completion(
    reply: Reply,
    model: str,
    *,
    usage: dict[str, Any] | None = None,
    completion_id: str | None = None,
) -> dict[str, Any]:
    """The non-streamed `chat.completion` object for `reply`."""
    blocks = normalize_blocks(reply.blocks)
    final_usage = _resolved_usage(reply, blocks, usage)
    tools = _tool_blocks(blocks)
    text = _text_of(blocks)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tools else None,
        "refusal": None,
        "annotations": [],
    }
    if tools:
        message["tool_calls"] = [
            {
                "id": _call_id(b),
                "type": "function",
                "function": {
                    "name": b.get("name", ""),
                    "arguments": _json_text(b.get("input", {})),
                },
            }
            for b in tools
        ]
    stop = _stop_reason(reply, blocks)
    return {
        "id": completion_id or "chatcmpl-" + _rand(29),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model or model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH_REASONS.get(stop, stop),
            }
        ],
        "usage": _chat_usage(final_usage),
        "service_tier": "default",
        "system_fingerprint": "fp_fake0000",
    }


def openai_chat_sse(
    reply: Reply,
    model: str,
    include_usage: bool,
    *,
    usage: dict[str, Any] | None = None,
    completion_id: str | None = None,
) -> list[bytes]:
    """`data: {chunk}\\n\\n` lines for a streamed chat completion, ending `data: [DONE]`."""
    blocks = normalize_blocks(reply.blocks)
    final_usage = _resolved_usage(reply, blocks, usage)
    tools = _tool_blocks(blocks)
    text = _text_of(blocks)
    cid = completion_id or "chatcmpl-" + _rand(29)
    created = int(time.time())
    stop = _stop_reason(reply, blocks)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": reply.model or model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake0000",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return b"data: " + _dumps(obj) + b"\n\n"

    lines = [
        chunk({"role": "assistant", "content": "" if text or not tools else None, "refusal": None})
    ]
    for piece in _split_words(text):
        lines.append(chunk({"content": piece}))
    for index, block in enumerate(tools):
        lines.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": _call_id(block),
                            "type": "function",
                            "function": {"name": block.get("name", ""), "arguments": ""},
                        }
                    ]
                }
            )
        )
        for fragment in _split_fixed(_json_text(block.get("input", {}))):
            lines.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            )
    lines.append(chunk({}, _FINISH_REASONS.get(stop, stop)))
    if include_usage:
        last = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": reply.model or model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake0000",
            "choices": [],
            "usage": _chat_usage(final_usage),
        }
        lines.append(b"data: " + _dumps(last) + b"\n\n")
    lines.append(b"data: [DONE]\n\n")
    return lines


# --------------------------------------------------------------------------------------------
# OpenAI Responses
# --------------------------------------------------------------------------------------------


@dataclass
class _ResponsesItem:
    final: dict[str, Any]
    kind: str


def _responses_items(blocks: list[dict[str, Any]]) -> list[_ResponsesItem]:
    items: list[_ResponsesItem] = []
    for b in blocks:
        kind = b.get("type")
        if kind == "thinking":
            items.append(
                _ResponsesItem(
                    {
                        "id": _new_id("rs_"),
                        "type": "reasoning",
                        "summary": [{"type": "summary_text", "text": str(b.get("thinking", ""))}],
                    },
                    "reasoning",
                )
            )
        elif kind == "text":
            if items and items[-1].kind == "message":  # consecutive text blocks: one message
                items[-1].final["content"][0]["text"] += str(b.get("text", ""))
                continue
            items.append(
                _ResponsesItem(
                    {
                        "id": _new_id("msg_"),
                        "type": "message",
                        "status": "completed",
                        "role": "assistant",
                        "content": [
                            {
                                "type": "output_text",
                                "text": str(b.get("text", "")),
                                "annotations": [],
                                "logprobs": [],
                            }
                        ],
                    },
                    "message",
                )
            )
        elif kind == "tool_use":
            items.append(
                _ResponsesItem(
                    {
                        "id": _new_id("fc_"),
                        "type": "function_call",
                        "status": "completed",
                        "arguments": _json_text(b.get("input", {})),
                        "call_id": _call_id(b),
                        "name": b.get("name", ""),
                    },
                    "function_call",
                )
            )
    return items


def openai_response_object(
    reply: Reply,
    model: str,
    *,
    request: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    response_id: str | None = None,
    output: list[dict[str, Any]] | None = None,
    status: str | None = None,
    created_at: int | None = None,
) -> dict[str, Any]:
    """The Responses API `response` object (status completed, or incomplete on max_tokens)."""
    blocks = normalize_blocks(reply.blocks)
    req = request or {}
    if output is None:
        output = [item.final for item in _responses_items(blocks)]
    stop = _stop_reason(reply, blocks)
    final_status = status or ("incomplete" if stop == "max_tokens" else "completed")
    reasoning_tokens = sum(
        len(str(b.get("thinking", ""))) // 4 for b in blocks if b.get("type") == "thinking"
    )
    return {
        "id": response_id or _new_id("resp_"),
        "object": "response",
        "created_at": created_at or int(time.time()),
        "status": final_status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"}
        if final_status == "incomplete"
        else None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": reply.model or model,
        "output": output,
        "parallel_tool_calls": bool(req.get("parallel_tool_calls", True)),
        "previous_response_id": req.get("previous_response_id"),
        "reasoning": {"effort": (req.get("reasoning") or {}).get("effort"), "summary": None},
        "service_tier": "default",
        "store": bool(req.get("store", True)),
        "temperature": req.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": req.get("tools", []),
        "top_logprobs": 0,
        "top_p": req.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": _responses_usage(_resolved_usage(reply, blocks, usage), reasoning_tokens)
        if final_status != "in_progress"
        else None,
        "user": None,
        "metadata": req.get("metadata") or {},
    }


def openai_responses_sse(
    reply: Reply,
    model: str,
    *,
    request: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    response_id: str | None = None,
) -> list[bytes]:
    """Named Responses API SSE events with `sequence_number`, ending in response.completed."""
    blocks = normalize_blocks(reply.blocks)
    items = _responses_items(blocks)
    rid = response_id or _new_id("resp_")
    created_at = int(time.time())
    events: list[bytes] = []

    def emit(event_type: str, payload: dict[str, Any]) -> None:
        body = {"type": event_type, "sequence_number": len(events), **payload}
        events.append(_sse(event_type, body))

    def snapshot(status: str | None, output: list[dict[str, Any]]) -> dict[str, Any]:
        return openai_response_object(
            reply,
            model,
            request=request,
            usage=usage,
            response_id=rid,
            output=output,
            status=status,
            created_at=created_at,
        )

    emit("response.created", {"response": snapshot("in_progress", [])})
    emit("response.in_progress", {"response": snapshot("in_progress", [])})
    for out_index, item in enumerate(items):
        final = item.final
        item_id = final["id"]
        if item.kind == "message":
            text = final["content"][0]["text"]
            emit(
                "response.output_item.added",
                {
                    "output_index": out_index,
                    "item": {**final, "status": "in_progress", "content": []},
                },
            )
            empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            emit(
                "response.content_part.added",
                {
                    "item_id": item_id,
                    "output_index": out_index,
                    "content_index": 0,
                    "part": empty_part,
                },
            )
            for piece in _split_words(text):
                emit(
                    "response.output_text.delta",
                    {
                        "item_id": item_id,
                        "output_index": out_index,
                        "content_index": 0,
                        "delta": piece,
                        "logprobs": [],
                    },
                )
            emit(
                "response.output_text.done",
                {
                    "item_id": item_id,
                    "output_index": out_index,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                },
            )
            emit(
                "response.content_part.done",
                {
                    "item_id": item_id,
                    "output_index": out_index,
                    "content_index": 0,
                    "part": final["content"][0],
                },
            )
        elif item.kind == "function_call":
            emit(
                "response.output_item.added",
                {
                    "output_index": out_index,
                    "item": {**final, "status": "in_progress", "arguments": ""},
                },
            )
            for fragment in _split_fixed(final["arguments"]):
                emit(
                    "response.function_call_arguments.delta",
                    {"item_id": item_id, "output_index": out_index, "delta": fragment},
                )
            emit(
                "response.function_call_arguments.done",
                {"item_id": item_id, "output_index": out_index, "arguments": final["arguments"]},
            )
        else:  # reasoning with one summary part
            summary_text = final["summary"][0]["text"]
            emit(
                "response.output_item.added",
                {"output_index": out_index, "item": {**final, "summary": []}},
            )
            common = {"item_id": item_id, "output_index": out_index, "summary_index": 0}
            emit(
                "response.reasoning_summary_part.added",
                {**common, "part": {"type": "summary_text", "text": ""}},
            )
            for piece in _split_words(summary_text):
                emit("response.reasoning_summary_text.delta", {**common, "delta": piece})
            emit("response.reasoning_summary_text.done", {**common, "text": summary_text})
            emit("response.reasoning_summary_part.done", {**common, "part": final["summary"][0]})
        emit("response.output_item.done", {"output_index": out_index, "item": final})
    done = snapshot(None, [item.final for item in items])
    done_type = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
    emit(done_type, {"response": done})
    return events


# --------------------------------------------------------------------------------------------
# Default responder
# --------------------------------------------------------------------------------------------


def _content_texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
    return texts


def _tool_result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(_content_texts(content)) if isinstance(content, list) else _json_text(content)


def _last_user_turn(req: ReceivedRequest) -> tuple[list[str], str | None]:
    """(texts of the latest user turn, tool-result text if that turn carries one)."""
    try:
        body = req.json()
    except orjson.JSONDecodeError:
        return [], None
    if not isinstance(body, dict):
        return [], None
    path = req.path
    if path == "/v1/responses":
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            return [raw_input], None
        items = raw_input if isinstance(raw_input, list) else []
        tail: list[Any] = []
        for item in reversed(items):  # items after the last assistant output
            if isinstance(item, dict) and (
                item.get("role") == "assistant" or item.get("type") == "function_call"
            ):
                break
            tail.insert(0, item)
        for item in tail:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                return [], _tool_result_text(item.get("output", ""))
        texts: list[str] = []
        for item in tail:
            if isinstance(item, dict) and item.get("role") == "user":
                texts.extend(_content_texts(item.get("content")))
        return texts, None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return [], None
    if path == "/v1/chat/completions":
        tail = []
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "assistant":
                break
            tail.insert(0, msg)
        for msg in tail:
            if isinstance(msg, dict) and msg.get("role") == "tool":
                return [], _tool_result_text(msg.get("content", ""))
        texts = []
        for msg in tail:
            if isinstance(msg, dict) and msg.get("role") == "user":
                texts.extend(_content_texts(msg.get("content")))
        return texts, None
    for msg in reversed(messages):  # Anthropic: the last user message
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "tool_result":
                        return [], _tool_result_text(part.get("content", ""))
            return _content_texts(content), None
    return [], None


COMPACTION_REQUEST_MARKER = "Your task is to create a detailed summary of the conversation"
"""In the user message Claude Code sends when it compacts (``/compact`` or automatically)."""
HUGE_USAGE_MARKER = "HUGE_USAGE"
"""A prompt with this word is answered with usage near a 1M context window, which makes Claude
Code compact the conversation before its next request."""
HUGE_INPUT_TOKENS = 990_000
AGENT_MARKERS: dict[str, dict[str, Any]] = {
    "RUN_AGENTS:": {"subagent_type": "general-purpose"},
    "RUN_AGENT:": {"subagent_type": "general-purpose"},
    "RUN_AGENT_FG:": {"subagent_type": "general-purpose", "run_in_background": False},
    "RUN_FORK:": {"subagent_type": "fork"},
}
"""``RUN_AGENT:<task>`` → an ``Agent`` tool_use (a background general-purpose subagent by
default in Claude Code 2.1.33x), ``RUN_AGENT_FG:`` the same in the foreground, ``RUN_FORK:`` a
fork subagent (it inherits the whole conversation), ``RUN_AGENTS:<task>|<task>…`` one Agent
tool_use per task in one answer (parallel subagents). A task that itself holds a marker makes the
subagent spawn a nested one."""
_AGENT_MARKER = re.compile(r"(RUN_AGENTS:|RUN_AGENT_FG:|RUN_AGENT:|RUN_FORK:)\s*(.+)", re.S)


def _last_tool_name(req: ReceivedRequest) -> str | None:
    """Name of the tool in the last assistant turn of an Anthropic request."""
    try:
        messages = req.json().get("messages") or []
    except (orjson.JSONDecodeError, AttributeError):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "assistant":
            content = message.get("content")
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    return str(block.get("name"))
            return None
    return None


def _user_prompt(texts: list[str]) -> str | None:
    """The user's own words: the last text that is not a Claude Code decoration."""
    return next(
        (t for t in reversed(texts)
         if not t.lstrip().startswith(("<system-reminder>", "<local-command", "<command-"))),
        None,
    )


def default_responder(req: ReceivedRequest) -> Reply:
    """Echo the last user text, with markers for scripted behaviour:

    ``RUN_TOOL:<command>`` → a Bash tool_use, and its result → ``Tool said: <stdout>``;
    ``RUN_AGENT:``/``RUN_AGENT_FG:``/``RUN_FORK:<task>`` → an Agent tool_use (see AGENT_MARKERS),
    and its result → ``Agent said: <result>``; Claude Code's compaction request → an
    ``<analysis>``/``<summary>`` answer; ``HUGE_USAGE`` → an echo reporting ~990k input tokens.
    """
    texts, tool_result = _last_user_turn(req)
    if tool_result is not None:
        said = "Agent said" if _last_tool_name(req) in ("Agent", "Task") else "Tool said"
        return Reply(blocks=[{"type": "text", "text": f"{said}: {tool_result[:200]}"}])
    if any(COMPACTION_REQUEST_MARKER in text for text in texts):
        return Reply(blocks=[{"type": "text", "text": (
            "<analysis>The user asked questions; each was echoed.</analysis>\n"
            "<summary>1. Primary Request: echo questions back.\n"
            "2. Pending Tasks: none.</summary>")}])
    prompt = _user_prompt(texts)
    for text in texts:
        match = re.search(re.escape(RUN_TOOL_MARKER) + r"([^\n<]+)", text)
        if match:
            command = match.group(1).strip()
            return Reply(
                blocks=[
                    {
                        "type": "tool_use",
                        "id": _new_id("toolu_01"),
                        "name": "Bash",
                        "input": {"command": command, "description": "run it"},
                    }
                ]
            )
    agent = _AGENT_MARKER.search(prompt or "")
    if agent:
        marker, task = agent.group(1), agent.group(2).strip()
        tasks = task.split("|") if marker == "RUN_AGENTS:" else [task]
        return Reply(blocks=[{
            "type": "tool_use", "id": _new_id("toolu_01"), "name": "Agent",
            "input": {"description": "Run a task", "prompt": one.strip(),
                      **AGENT_MARKERS[marker]},
        } for one in tasks])
    if prompt is None:
        return Reply()
    reply = Reply(blocks=[{"type": "text", "text": f"Echo: {prompt}"}])
    if HUGE_USAGE_MARKER in prompt:
        reply.usage = {"input_tokens": HUGE_INPUT_TOKENS, "output_tokens": 10,
                       "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return reply


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}

_MODELS = [
    ("claude-opus-4-5-20251101", "Claude Opus 4.5"),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
]


class FakeUpstream:
    """Loopback fake of api.anthropic.com and api.openai.com; see the module docstring."""

    def __init__(
        self,
        responder: Callable[[ReceivedRequest], Reply] | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.responder: Callable[[ReceivedRequest], Reply] = responder or default_responder
        self.received: list[ReceivedRequest] = []
        self.replies: collections.deque[Reply] = collections.deque()
        self.url = ""
        self.host_port = ""
        self.port = port
        self.host = host
        """Where it listens: loopback, or 0.0.0.0 in a container (`serve --host`)."""
        self._lock = threading.Lock()
        self._loop_thread: LoopThread | None = None
        self._runner: web.AppRunner | None = None
        self._cache_prefixes: set[str] = set()

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        loop_thread = LoopThread()
        loop_thread.start()
        self._loop_thread = loop_thread
        self.port = loop_thread.run(self._start_server())
        self.host_port = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host_port}"

    async def _start_server(self) -> int:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES * 2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        loop_thread, self._loop_thread = self._loop_thread, None
        if loop_thread is None:
            return
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError, OSError):
                loop_thread.run(runner.cleanup(), timeout=10)
        loop_thread.stop()

    def __enter__(self) -> FakeUpstream:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # inspection ------------------------------------------------------------------------------

    def model_calls(self) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.received if r.method == "POST" and r.path in MODEL_CALL_PATHS]

    def clear(self) -> None:
        with self._lock:
            self.received.clear()
        self.replies.clear()

    # request handling ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received = ReceivedRequest(
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body=body,
        )
        with self._lock:
            self.received.append(received)
        path, method = request.path, request.method
        if path in MODEL_CALL_PATHS:
            if method != "POST":
                return self._error(
                    405, f"Method {method} not allowed for {path}", openai=path != "/v1/messages"
                )
            if len(body) > MAX_REQUEST_BYTES:
                return self._error(413, "Request exceeds the maximum allowed number of bytes.")
            return await self._model_call(request, received)
        if path == "/v1/messages/count_tokens" and method == "POST":
            return self._json({"input_tokens": max(1, len(body) // 4)}, openai=False)
        if path == "/api/hello" and method in ("GET", "HEAD"):
            return self._json({"message": "hello"}, openai=False)
        if path == "/v1/models" and method == "GET":
            return self._json(
                self._models(received), openai=received.header("anthropic-version") is None
            )
        if path.startswith("/v1/models/") and method == "GET":
            wanted = path[len("/v1/models/") :]
            listing = self._models(received)["data"]
            for entry in listing:
                if entry["id"] == wanted:
                    return self._json(entry, openai=received.header("anthropic-version") is None)
            return self._error(404, f"model: {wanted}")
        return self._error(404, f"Not found: {method} {path}")

    def _models(self, received: ReceivedRequest) -> dict[str, Any]:
        data: list[dict[str, Any]]
        if received.header("anthropic-version") is not None:
            data = [
                {
                    "type": "model",
                    "id": mid,
                    "display_name": name,
                    "created_at": "2025-09-29T00:00:00Z",
                }
                for mid, name in _MODELS
            ]
            return {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
            }
        data = [
            {"id": mid, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for mid in ("gpt-4o", "gpt-4o-mini", "gpt-5")
        ]
        return {"object": "list", "data": data}

    def _base_headers(self, openai: bool) -> list[tuple[str, str]]:
        request_id = "req_" + _rand(24)
        if openai:
            return [
                ("x-request-id", request_id),
                ("openai-version", "2020-10-01"),
                ("openai-processing-ms", "7"),
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-ratelimit-limit-tokens", "30000000"),
                ("x-ratelimit-remaining-tokens", "29999000"),
                ("x-ratelimit-reset-tokens", "2ms"),
            ]
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
        return [
            ("request-id", request_id),
            ("x-request-id", request_id),
            ("anthropic-organization-id", "00000000-0000-4000-8000-000000000000"),
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", "3999"),
            ("anthropic-ratelimit-requests-reset", reset),
            ("anthropic-ratelimit-input-tokens-limit", "2000000"),
            ("anthropic-ratelimit-input-tokens-remaining", "2000000"),
            ("anthropic-ratelimit-input-tokens-reset", reset),
            ("anthropic-ratelimit-output-tokens-limit", "400000"),
            ("anthropic-ratelimit-output-tokens-remaining", "400000"),
            ("anthropic-ratelimit-output-tokens-reset", reset),
            ("anthropic-ratelimit-tokens-limit", "2400000"),
            ("anthropic-ratelimit-tokens-remaining", "2400000"),
            ("anthropic-ratelimit-tokens-reset", reset),
        ]

    @staticmethod
    def _merge_headers(
        base: list[tuple[str, str]], extra: list[tuple[str, str]] | None
    ) -> list[tuple[str, str]]:
        if not extra:
            return base
        overridden = {k.lower() for k, _ in extra}
        return [(k, v) for k, v in base if k.lower() not in overridden] + list(extra)

    def _json(self, obj: Any, *, openai: bool, status: int = 200) -> web.Response:
        headers = [*self._base_headers(openai), ("content-type", JSON_CONTENT_TYPE)]
        resp = web.Response(status=status, body=_dumps(obj))
        for k, v in headers:
            resp.headers.add(k, v)
        return resp

    def _error_body(self, status: int, message: str, *, openai: bool) -> bytes:
        if openai:
            kind = _OPENAI_ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            )
            return _dumps(
                {"error": {"message": message, "type": kind, "param": None, "code": None}}
            )
        kind = _ANTHROPIC_ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return _dumps(
            {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": "req_" + _rand(24),
            }
        )

    def _error(self, status: int, message: str, *, openai: bool = False) -> web.Response:
        resp = web.Response(status=status, body=self._error_body(status, message, openai=openai))
        for k, v in [*self._base_headers(openai), ("content-type", JSON_CONTENT_TYPE)]:
            resp.headers.add(k, v)
        return resp

    def _next_reply(self, received: ReceivedRequest) -> Reply:
        try:
            return self.replies.popleft()
        except IndexError:
            return self.responder(received)

    def _default_usage(
        self, reply: Reply, received: ReceivedRequest, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Usage from sizes; with cache_control, the first sight of a prefix writes the cache."""
        blocks = normalize_blocks(reply.blocks)
        total = max(1, len(received.body) // 4)
        if b"cache_control" not in received.body:
            return compute_usage(blocks, len(received.body))
        prefix = hashlib.sha256(_dumps([body.get("system"), body.get("tools")])).hexdigest()
        cached = total * 3 // 4
        with self._lock:
            seen = prefix in self._cache_prefixes
            self._cache_prefixes.add(prefix)
        return compute_usage(blocks, len(received.body), (0, cached) if seen else (cached, 0))

    async def _model_call(
        self, request: web.Request, received: ReceivedRequest
    ) -> web.StreamResponse:
        path = received.path
        is_openai = path != "/v1/messages"
        try:
            parsed = received.json()
        except orjson.JSONDecodeError as exc:
            return self._error(400, f"Invalid JSON body: {exc}", openai=is_openai)
        if not isinstance(parsed, dict):
            return self._error(400, "Request body must be a JSON object", openai=is_openai)
        body: dict[str, Any] = parsed
        try:
            reply = self._next_reply(received)
        except Exception as exc:  # a responder bug: answer like an API failure, keep serving
            return self._error(500, f"fake upstream responder failed: {exc!r}", openai=is_openai)
        model = str(body.get("model") or ("gpt-4o" if is_openai else "claude-sonnet-4-5-20250929"))
        stream = body.get("stream") is True
        headers = self._base_headers(is_openai)

        if reply.first_byte_delay > 0:
            await asyncio.sleep(reply.first_byte_delay)

        if reply.body is not None or reply.status != 200:
            payload = reply.body
            if payload is None:
                payload = self._error_body(
                    reply.status, f"fake error status {reply.status}", openai=is_openai
                )
            headers = [*headers, ("content-type", JSON_CONTENT_TYPE)]
            return await self._send_whole(request, reply, headers, payload)

        usage = (
            reply.usage if reply.usage is not None else self._default_usage(reply, received, body)
        )
        if not stream:
            obj: dict[str, Any]
            if path == "/v1/messages":
                obj = anthropic_message(reply, model, usage=usage)
            elif path == "/v1/chat/completions":
                obj = openai_chat_completion(reply, model, usage=usage)
            else:
                obj = openai_response_object(reply, model, request=body, usage=usage)
            return await self._send_whole(
                request, reply, [*headers, ("content-type", JSON_CONTENT_TYPE)], _dumps(obj)
            )

        events: list[bytes]
        if path == "/v1/messages":
            events = anthropic_sse(reply, model, usage=usage)
        elif path == "/v1/chat/completions":
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            events = openai_chat_sse(reply, model, include_usage, usage=usage)
        else:
            events = openai_responses_sse(reply, model, request=body, usage=usage)
        sse_headers = [*headers, ("content-type", SSE_CONTENT_TYPE), ("cache-control", "no-cache")]
        return await self._send_stream(request, reply, sse_headers, events)

    async def _send_whole(
        self, request: web.Request, reply: Reply, headers: list[tuple[str, str]], payload: bytes
    ) -> web.StreamResponse:
        if reply.gzip:
            payload = gzip_module.compress(payload)
            headers = [*headers, ("content-encoding", "gzip")]
        headers = self._merge_headers(headers, reply.headers)
        resp = web.StreamResponse(status=reply.status)
        for k, v in headers:
            resp.headers.add(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            resp.content_length = len(payload)
        try:
            await resp.prepare(request)
            if reply.drop_after_events is not None:
                self._abort(request)
                return resp
            await resp.write(payload)
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    async def _send_stream(
        self,
        request: web.Request,
        reply: Reply,
        headers: list[tuple[str, str]],
        events: list[bytes],
    ) -> web.StreamResponse:
        compressor = zlib.compressobj(wbits=31) if reply.gzip else None
        if compressor is not None:
            headers = [*headers, ("content-encoding", "gzip")]
        headers = self._merge_headers(headers, reply.headers)
        resp = web.StreamResponse(status=reply.status)
        for k, v in headers:
            resp.headers.add(k, v)
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            for index, event in enumerate(events):
                if reply.drop_after_events is not None and index >= reply.drop_after_events:
                    self._abort(request)
                    return resp
                if index and reply.event_delay > 0:
                    await asyncio.sleep(reply.event_delay)
                if compressor is not None:
                    event = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
                await resp.write(event)
            if reply.drop_after_events is not None and reply.drop_after_events <= len(events):
                self._abort(request)
                return resp
            if compressor is not None:
                await resp.write(compressor.flush(zlib.Z_FINISH))
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()


def fake_upstream_fixture(
    responder: Callable[[ReceivedRequest], Reply] | None = None,
) -> Iterator[FakeUpstream]:
    """Generator for a pytest fixture: `yield from fake_upstream_fixture()`."""
    fake = FakeUpstream(responder)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


# --------------------------------------------------------------------------------------------
# Claude Code CLI
# --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
DUMMY_ANTHROPIC_API_KEY = "sk-ant-api03-" + "d" * 86 + "-AAAAAAAA"


def find_claude_bin() -> str | None:
    """OTELPROXY_CLAUDE_BIN, else node_modules/.bin/claude in the repo, /tmp/cc, then PATH."""
    env = os.environ.get("OTELPROXY_CLAUDE_BIN")
    if env:
        return env
    for candidate in (
        REPO_ROOT / "node_modules/.bin/claude",
        Path("/tmp/cc/node_modules/.bin/claude"),
    ):
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("claude")


CLAUDE_BIN: str | None = find_claude_bin()


def claude_env(base_url: str, home: str) -> dict[str, str]:
    """Environment to run the Claude Code CLI non-interactively against `base_url`.

    `home` should be a fresh temp dir; reuse the same one and the same cwd for `--continue`.
    Only HOME, ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY are strictly needed for `-p`; the
    rest keeps the CLI quiet and offline (without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC it
    also offers a `DesignSync` tool). IS_SANDBOX=1 lets `--dangerously-skip-permissions` /
    `--permission-mode bypassPermissions` run as root; without such a flag `-p` still runs
    read-only commands (`echo`) but refuses writes and answers the model with an error result.
    """
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT", "TERM")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        {
            "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "CLAUDE_CONFIG_DIR": os.path.join(home, ".claude"),
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": DUMMY_ANTHROPIC_API_KEY,
            "IS_SANDBOX": "1",
            "CI": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_BUG_COMMAND": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
            "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1",
            "CLAUDE_CODE_ENABLE_TELEMETRY": "0",
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "NO_COLOR": "1",
            "BASH_DEFAULT_TIMEOUT_MS": "20000",
        }
    )
    return env


def run_claude(
    args: list[str],
    *,
    base_url: str,
    home: str,
    cwd: str,
    timeout: float = 180,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the Claude Code CLI (`CLAUDE_BIN`) with `claude_env`; raises if it is not installed."""
    if CLAUDE_BIN is None:
        raise FileNotFoundError("Claude Code CLI not found (set OTELPROXY_CLAUDE_BIN)")
    env = claude_env(base_url, home)
    env.update(extra_env or {})
    return subprocess.run(
        [CLAUDE_BIN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def capture_claude_code(out_dir: Path) -> list[ReceivedRequest]:
    """Run the tool loop and a --continue turn against a fake; save bodies and headers.

    Writes `01_first_call.json`, `02_tool_result_call.json`, `03_continue_call.json` (the exact
    request bodies) and `requests.json` (method, path, query, headers with the key replaced).
    """
    flags = ["--dangerously-skip-permissions"]
    with (
        FakeUpstream() as fake,
        tempfile.TemporaryDirectory(prefix="cc-home-") as home,
        tempfile.TemporaryDirectory(prefix="cc-cwd-") as cwd,
    ):
        for args in (["-p", "RUN_TOOL:echo fake-tool-ran"], ["-p", "--continue", "second"]):
            done = run_claude([*args, *flags], base_url=fake.url, home=home, cwd=cwd)
            if done.returncode != 0:
                raise RuntimeError(f"claude {args} failed: {done.stderr}")
        calls = fake.model_calls()
    if len(calls) != 3:
        raise RuntimeError(f"expected 3 model calls, got {len(calls)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, Any]] = []
    names = ["01_first_call.json", "02_tool_result_call.json", "03_continue_call.json"]
    for name, call in zip(names, calls, strict=True):
        (out_dir / name).write_bytes(call.body)
        headers = [
            (k, "<ANTHROPIC_API_KEY>" if k.lower() in ("x-api-key", "authorization") else v)
            for k, v in call.headers
        ]
        index.append(
            {
                "file": name,
                "method": call.method,
                "path": call.path,
                "query_string": call.query_string,
                "headers": headers,
            }
        )
    (out_dir / "requests.json").write_bytes(orjson.dumps(index, option=orjson.OPT_INDENT_2) + b"\n")
    return calls


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fake_upstream serve [--port N] [--host H]` or `... capture-claude DIR`."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_upstream")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the fake upstream until interrupted")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other containers")
    capture = sub.add_parser("capture-claude", help="capture Claude Code request samples")
    capture.add_argument("out_dir", type=Path)
    ns = parser.parse_args(argv)
    if ns.command == "capture-claude":
        calls = capture_claude_code(ns.out_dir)
        print(f"saved {len(calls)} requests to {ns.out_dir}")
        return 0
    fake = FakeUpstream(port=ns.port, host=ns.host)
    fake.start()
    print(fake.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        fake.stop()


if __name__ == "__main__":
    raise SystemExit(main())
