"""Provider parsing through the real proxy and pipeline: the assistant message reassembled from a
stream equals what a non-streamed call returns (and what the SDK assembled), with usage, model,
ids and finish reasons — Anthropic Messages, OpenAI Chat Completions and Responses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from otelproxy.record import Record
from otelproxy.recorder import build_pipeline
from otelproxy.server import Server
from tests.conftest import Collect, RunningProxy
from tests.fake_upstream import (
    FakeUpstream,
    Reply,
    anthropic_message,
    normalize_blocks,
    openai_chat_completion,
)
from tests.raw_upstream import RawUpstream, Slow

USER = [{"role": "user", "content": "hello"}]
TOOL_INPUT = {"command": "ls -la /tmp", "nested": {"a": [1, 2, 3]}, "text": "é ✓"}
CITATION = {"type": "char_location", "cited_text": "the sky is blue", "document_index": 0,
            "document_title": "Doc", "start_char_index": 0, "end_char_index": 15}
RICH_BLOCKS: list[dict[str, Any]] = [
    {"type": "thinking", "thinking": "The user wants a listing. I will run ls.",
     "signature": "EqSIG123=="},
    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"},
    {"type": "text", "text": "Let me look at the files for you.", "citations": [CITATION]},
    {"type": "server_tool_use", "id": "srvtoolu_01AAAAAAAAAAAAAAAAAAAAAA", "name": "web_search",
     "input": {"query": "weather"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_01AAAAAAAAAAAAAAAAAAAAAA",
     "content": [{"type": "web_search_result", "url": "https://example.com", "title": "Ex",
                  "encrypted_content": "abc", "page_age": None}]},
    {"type": "tool_use", "id": "toolu_01BBBBBBBBBBBBBBBBBBBBBB", "name": "Bash",
     "input": TOOL_INPUT},
    {"type": "tool_use", "id": "toolu_01CCCCCCCCCCCCCCCCCCCCCC", "name": "NoArgs", "input": {}},
]
USAGE = {"input_tokens": 120, "output_tokens": 45, "cache_read_input_tokens": 30,
         "cache_creation_input_tokens": 8}


class CapturingProxy(RunningProxy):
    """The real proxy with one extra sink that keeps the finished records (the pipeline runs
    in-process here, so the sink's records can be read back)."""

    def __init__(self, upstream: Any, log_dir: Path) -> None:
        self.sink = Collect()
        super().__init__(upstream, log_dir)

    async def _make(self) -> Server:
        pipeline = build_pipeline(self.config, {}, extra_sinks=[self.sink])
        server = Server(self.config, recorder=pipeline)
        await server.start()
        return server

    def record(self) -> Record:
        self.flush()
        [record] = self.sink.records
        return record


@pytest.fixture
def capturing(fake: FakeUpstream, tmp_path: Path) -> Iterator[CapturingProxy]:
    running = CapturingProxy(fake, tmp_path / "logs")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def capturing_raw(raw_upstream: RawUpstream, tmp_path: Path) -> Iterator[CapturingProxy]:
    running = CapturingProxy(raw_upstream, tmp_path / "logs")
    try:
        yield running
    finally:
        running.stop()


def anthropic_client(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)


def openai_client(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base("openai") + "/v1", api_key="sk-x", max_retries=0)


def response_entry(proxy: RunningProxy) -> dict[str, Any]:
    [entry] = [e for e in proxy.entries() if e["type"] == "response"]
    return entry


# -- Anthropic -----------------------------------------------------------------------------------


def test_anthropic_stream_reassembles_to_the_non_streamed_message(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """A rich Messages stream reassembles to the non-streamed message and the SDK's result."""
    reply = Reply(blocks=RICH_BLOCKS, usage=USAGE, model="claude-test-1")
    fake.replies.append(reply)
    with anthropic_client(capturing).messages.stream(
        model="claude-test-1", max_tokens=100, messages=USER
    ) as stream:
        sdk = stream.get_final_message()
    record = capturing.record()
    parsed = record.parsed
    expected = anthropic_message(reply, "claude-test-1")
    assert parsed.output_message == {"role": "assistant", "content": expected["content"]}
    assert parsed.output_message["content"] == normalize_blocks(RICH_BLOCKS)
    sdk_content = [block.model_dump(exclude_none=True) for block in sdk.content]
    assert [b["type"] for b in sdk_content] == [b["type"] for b in RICH_BLOCKS]
    assert sdk_content[5]["input"] == TOOL_INPUT and sdk_content[0]["signature"] == "EqSIG123=="
    assert parsed.finish_reasons == ["tool_use"] and parsed.response_id == sdk.id
    assert (parsed.model, parsed.response_model, parsed.stream) == (
        "claude-test-1", "claude-test-1", True)
    usage = parsed.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens) == (120, 45, 30, 8)
    assert record.notes == []
    entry = response_entry(capturing)
    assert entry["usage"] == USAGE and entry["stop_reason"] == "tool_use"
    assert entry["model"] == "claude-test-1" and entry["tokens_per_second"] > 0


def test_anthropic_non_streamed_message_is_parsed(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """A non-streamed Messages answer gives the same output message, usage and stop reason."""
    reply = Reply(blocks=RICH_BLOCKS[2:3], usage=USAGE, stop_reason="max_tokens")
    fake.replies.append(reply)
    sdk = anthropic_client(capturing).messages.create(model="m", max_tokens=5, messages=USER)
    parsed = capturing.record().parsed
    assert parsed.output_message == {"role": "assistant",
                                     "content": normalize_blocks(RICH_BLOCKS[2:3])}
    assert parsed.finish_reasons == ["max_tokens"] and parsed.response_id == sdk.id
    assert parsed.usage.output_tokens == 45 and parsed.stream is False
    assert parsed.tracked and parsed.operation == "chat"


def test_anthropic_error_event_mid_stream_is_kept(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """An error event mid-stream: the SDK raises; the record keeps the partial text and error."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "partial answer"}],
                              error_event={"type": "overloaded_error", "message": "Overloaded"}))
    with pytest.raises(anthropic.APIStatusError), anthropic_client(capturing).messages.stream(
        model="m", max_tokens=5, messages=USER
    ) as stream:
        stream.get_final_message()
    parsed = capturing.record().parsed
    assert parsed.response_json["x_error"] == {"type": "overloaded_error",
                                               "message": "Overloaded"}
    assert parsed.output_message is not None
    assert parsed.output_message["content"] == [{"type": "text", "text": "partial answer"}]
    assert parsed.finish_reasons == []
    assert response_entry(capturing)["outcome"] == "complete"


def _sse(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def _scripted_stream(events: list[bytes]) -> Slow:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    return Slow([head, *(b"%x\r\n%s\r\n" % (len(e), e) for e in events), b"0\r\n\r\n"],
                delay=0.001)


def test_anthropic_unknown_events_and_deltas_are_tolerated_and_kept(
    capturing_raw: CapturingProxy, raw_upstream: RawUpstream
) -> None:
    """Unknown events/deltas and bad tool JSON are kept and noted, never dropped or fatal."""
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 1}}}
    events = [
        _sse("message_start", start),
        _sse("future_event", {"type": "future_event", "detail": 1}),
        _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "hi"}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "sparkle_delta", "sparkle": 1}}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("content_block_start", {"type": "content_block_start", "index": 1,
                                     "content_block": {"type": "tool_use", "id": "t",
                                                       "name": "X", "input": {}}}),
        _sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                     "delta": {"type": "input_json_delta",
                                               "partial_json": '{"cut": '}}),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                               "usage": {"output_tokens": 9}}),
        _sse("message_stop", {"type": "message_stop"}),
    ]
    raw_upstream.respond(_scripted_stream(events))
    answer = httpx2.post(capturing_raw.base() + "/v1/messages",
                         json={"model": "m", "messages": USER, "stream": True})
    assert answer.content == b"".join(events)
    record = capturing_raw.record()
    message = record.parsed.response_json
    assert message["x_unknown_events"] == [{"type": "future_event", "detail": 1}]
    text, tool = message["content"]
    assert text == {"type": "text", "text": "hi",
                    "x_deltas": [{"type": "sparkle_delta", "sparkle": 1}]}
    assert tool["input"] == '{"cut": '
    assert any("future_event" in note for note in record.notes)
    assert any("tool input" in note for note in record.notes)
    assert record.parsed.usage.output_tokens == 9 and record.parsed.usage.input_tokens == 3


def test_anthropic_side_calls_are_parsed_but_not_tracked(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """count_tokens is understood as a request but is no conversation turn."""
    anthropic_client(capturing).messages.count_tokens(model="m", messages=USER)
    parsed = capturing.record().parsed
    assert parsed.tracked is False and parsed.model == "m" and parsed.operation is None


# -- OpenAI Chat Completions ---------------------------------------------------------------------

TOOL_BLOCKS: list[dict[str, Any]] = [
    {"type": "text", "text": "Running two tools now."},
    {"type": "tool_use", "id": "toolu_01DDDDDDDDDDDDDDDDDDDDDD", "name": "bash",
     "input": TOOL_INPUT},
    {"type": "tool_use", "id": "toolu_01EEEEEEEEEEEEEEEEEEEEEE", "name": "read",
     "input": {"path": "/etc/hosts"}},
]


def test_openai_chat_stream_reassembles_text_tool_calls_and_usage(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """Chat deltas and the usage chunk reassemble to the non-streamed message and usage."""
    reply = Reply(blocks=TOOL_BLOCKS, usage=USAGE, model="gpt-test")
    fake.replies.append(reply)
    with openai_client(capturing).chat.completions.stream(
        model="gpt-test", messages=USER,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ) as stream:
        sdk = stream.get_final_completion()
    parsed = capturing.record().parsed
    expected = openai_chat_completion(reply, "gpt-test")["choices"][0]["message"]
    assert parsed.output_message is not None
    assert parsed.output_message["role"] == "assistant"
    assert parsed.output_message["content"] == expected["content"] == sdk.choices[0].message.content
    assert parsed.output_message["tool_calls"] == expected["tool_calls"]
    sdk_calls = sdk.choices[0].message.tool_calls or []
    assert [(c.id, c.function.arguments) for c in sdk_calls] == [  # type: ignore[union-attr]
        (c["id"], c["function"]["arguments"]) for c in expected["tool_calls"]]
    assert orjson.loads(parsed.output_message["tool_calls"][0]["function"]["arguments"]) == (
        TOOL_INPUT)
    assert parsed.finish_reasons == ["tool_calls"] and parsed.response_id == sdk.id
    assert parsed.response_model == "gpt-test"
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens,
            parsed.usage.cache_read_input_tokens) == (158, 45, 30)
    assert response_entry(capturing)["tokens_per_second"] > 0


def test_openai_chat_stream_without_usage_has_no_token_rate(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """Without include_usage nothing reports tokens: usage stays unknown, no tokens_per_second."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "just text here"}]))
    chunks = list(openai_client(capturing).chat.completions.create(
        model="g", messages=USER, stream=True))  # type: ignore[arg-type]
    assert chunks
    parsed = capturing.record().parsed
    assert parsed.output_message == {"role": "assistant", "content": "just text here"}
    assert parsed.usage.output_tokens is None and parsed.finish_reasons == ["stop"]
    entry = response_entry(capturing)
    assert "tokens_per_second" not in entry and "usage" not in entry


def test_openai_chat_non_streamed_completion_is_parsed(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """A non-streamed chat.completion gives its message, usage, id and finish reason."""
    fake.replies.append(Reply(blocks=TOOL_BLOCKS[:2], usage=USAGE))
    sdk = openai_client(capturing).chat.completions.create(model="g", messages=USER)  # type: ignore
    parsed = capturing.record().parsed
    message = sdk.choices[0].message.model_dump(exclude_unset=True)
    assert parsed.output_message is not None
    assert {k: parsed.output_message[k] for k in ("role", "content", "tool_calls")} == {
        k: message[k] for k in ("role", "content", "tool_calls")}
    assert parsed.response_id == sdk.id and parsed.finish_reasons == ["tool_calls"]
    assert parsed.usage.output_tokens == 45 and parsed.stream is False


# -- OpenAI Responses ----------------------------------------------------------------------------


def test_openai_responses_stream_yields_the_final_response(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """A Responses stream is recorded as the final response from response.completed."""
    fake.replies.append(Reply(blocks=[{"type": "thinking", "thinking": "plan it"},
                                      *TOOL_BLOCKS[:2]], usage=USAGE))
    with openai_client(capturing).responses.stream(model="gpt-test", input="hello") as stream:
        sdk = stream.get_final_response()
    parsed = capturing.record().parsed
    assert parsed.output_message is not None
    sdk_output = [item.model_dump(exclude_none=True) for item in sdk.output]
    recorded = parsed.output_message["output"]
    assert [item["type"] for item in recorded] == ["reasoning", "message", "function_call"]
    assert [item["id"] for item in recorded] == [item["id"] for item in sdk_output]
    assert orjson.loads(recorded[2]["arguments"]) == TOOL_INPUT
    assert parsed.response_id == sdk.id and parsed.finish_reasons == ["completed"]
    assert parsed.usage.input_tokens == 158 and parsed.usage.output_tokens == 45
    assert parsed.messages == [{"role": "user", "content": "hello"}]


def test_openai_responses_non_streamed_is_parsed(
    capturing: CapturingProxy, fake: FakeUpstream
) -> None:
    """A non-streamed response object: output, status incomplete on max tokens, usage."""
    fake.replies.append(Reply(blocks=TOOL_BLOCKS[:1], stop_reason="max_tokens", usage=USAGE))
    sdk = openai_client(capturing).responses.create(
        model="g", input=[{"role": "user", "content": "hi"}], previous_response_id="resp_prev")
    parsed = capturing.record().parsed
    assert parsed.finish_reasons == ["incomplete"] and parsed.response_id == sdk.id
    assert parsed.previous_response_id == "resp_prev"
    assert parsed.output_message is not None
    assert parsed.output_message["output"][0]["content"][0]["text"] == "Running two tools now."


def test_anthropic_reassembly_keeps_interleaved_and_restarted_blocks_apart() -> None:
    """Text and thinking pieces go to their own block and field however the deltas interleave
    (the quick path for 'the same block and kind as the one before' never mixes them up); a
    block started again drops the pieces before; a non-string text is kept as its str; a delta
    whose index is not an int is skipped."""
    from otelproxy.providers.anthropic import reassemble

    def delta(index: Any, kind: str, key: str, value: Any) -> tuple[str, Any]:
        return "content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": {"type": kind, key: value}}

    def start(index: int, block: dict[str, Any]) -> tuple[str, Any]:
        return "content_block_start", {"type": "content_block_start", "index": index,
                                       "content_block": block}

    events = [
        ("message_start", {"type": "message_start", "message": {"id": "m", "content": []}}),
        start(0, {"type": "thinking", "thinking": ""}),
        start(1, {"type": "text", "text": "T:"}),
        delta(0, "thinking_delta", "thinking", "a"),
        delta(0, "thinking_delta", "thinking", "b"),
        delta(1, "text_delta", "text", "x"),
        delta(0, "thinking_delta", "thinking", "c"),
        delta(1, "text_delta", "text", 7),
        delta(1.0, "text_delta", "text", "float index"),
        delta(True, "text_delta", "text", "bool index"),
        delta(0, "text_delta", "text", "t"),
        delta(0, "text_delta", "text", "u"),
        delta(0, "thinking_delta", "thinking", "d"),
        start(2, {"type": "text", "text": ""}),
        delta(2, "text_delta", "text", "old"),
        start(2, {"type": "text", "text": "new:"}),
        delta(2, "text_delta", "text", "1"),
        delta(2, "text_delta", "text", "2"),
        ("message_stop", {"type": "message_stop"}),
    ]
    message = reassemble(events, [])
    assert message is not None
    assert message["content"] == [
        {"type": "thinking", "thinking": "abcd", "text": "tu"},
        {"type": "text", "text": "T:x7"},
        {"type": "text", "text": "new:12"},
    ]


def test_anthropic_stream_places_group_the_pieces_by_block_and_key() -> None:
    """Each block's text, thinking and tool input pieces go to their own list, in stream order,
    however the deltas interleave (the quick path for 'the same block and key as the one
    before' never mixes them up); an index equal to another (1, 1.0, True) is the same block;
    other events and pieces that are not strings are left out."""
    from otelproxy.providers import UNDECODABLE
    from otelproxy.providers.anthropic import stream_places

    def delta(index: Any, kind: str, key: str, value: Any) -> tuple[str, Any]:
        return "content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": {"type": kind, key: value}}

    payloads = [
        ("ping", {"type": "ping"}),
        delta(0, "thinking_delta", "thinking", "a"),
        delta(0, "thinking_delta", "thinking", "b"),
        delta(1, "text_delta", "text", "x"),
        ("message", UNDECODABLE),
        delta(0, "thinking_delta", "thinking", "c"),
        delta(1.0, "text_delta", "text", "y"),
        delta(True, "text_delta", "text", "z"),
        delta(1, "text_delta", "text", 7),
        delta(0, "text_delta", "text", "t"),
        delta(0, "input_json_delta", "partial_json", "{"),
        delta(0, "signature_delta", "signature", "s"),
    ]
    thinking, text, json = ("delta", "thinking"), ("delta", "text"), ("delta", "partial_json")
    assert stream_places(payloads) == {
        (0, "thinking"): [(1, thinking, "a"), (2, thinking, "b"), (5, thinking, "c")],
        (1, "text"): [(3, text, "x"), (6, text, "y"), (7, text, "z")],
        (0, "text"): [(9, text, "t")],
        (0, "partial_json"): [(10, json, "{")],
    }
