"""The fake upstream speaks the Anthropic and OpenAI wire protocols well enough for real clients."""

from __future__ import annotations

import http.client
import json
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pydantic
import pytest
from anthropic.types import RawMessageStreamEvent
from openai.types.responses import ResponseStreamEvent

from tests.fake_upstream import (
    CLAUDE_BIN,
    DEFAULT_TEXT,
    FakeUpstream,
    LoopThread,
    ReceivedRequest,
    Reply,
    anthropic_sse,
    capture_claude_code,
    claude_env,
    default_responder,
    fake_upstream_fixture,
    openai_chat_sse,
    openai_responses_sse,
    run_claude,
)

TOOL_INPUT: dict[str, Any] = {
    "command": "ls -la /tmp",
    "description": "list files",
    "nested": {"a": [1, 2, 3]},
}
RICH_BLOCKS: list[dict[str, Any]] = [
    {
        "type": "thinking",
        "thinking": "The user wants a listing. I will run ls.",
        "signature": "EqSIG123==",
    },
    {"type": "text", "text": "Let me look at the files in the directory for you."},
    {"type": "tool_use", "id": "toolu_01TESTTESTTESTTESTTEST", "name": "Bash", "input": TOOL_INPUT},
]


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    yield from fake_upstream_fixture()


def anthropic_client(fake: FakeUpstream) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-dummy", max_retries=0)


def openai_client(fake: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-dummy", max_retries=0)


def parse_sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE byte stream."""
    out: list[tuple[str | None, str]] = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        name: str | None = None
        data: list[str] = []
        for line in frame.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        out.append((name, "\n".join(data)))
    return out


def raw_post(
    fake: FakeUpstream, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", int(fake.host_port.split(":")[1]), timeout=10)
    conn.request(
        "POST",
        path,
        body=orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
    )
    return conn.getresponse(), conn


def test_anthropic_sdk_stream_parses_thinking_text_tool_use(fake: FakeUpstream) -> None:
    """messages.stream() reassembles thinking, text and tool_use exactly as scripted."""
    fake.replies.append(Reply(blocks=RICH_BLOCKS))
    client = anthropic_client(fake)
    texts: list[str] = []
    with client.messages.stream(
        model="claude-fake-1", max_tokens=100, messages=[{"role": "user", "content": "list files"}]
    ) as stream:
        for event in stream:
            if event.type == "text":
                texts.append(event.text)
        final = stream.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == RICH_BLOCKS
    assert len(texts) > 1 and "".join(texts) == RICH_BLOCKS[1]["text"]
    assert final.stop_reason == "tool_use"
    assert final.model == "claude-fake-1"
    assert final.id.startswith("msg_")
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 1
    assert final.usage.cache_read_input_tokens == 0
    call = fake.model_calls()[0]
    assert (call.method, call.path, call.json()["stream"]) == ("POST", "/v1/messages", True)


def test_anthropic_sdk_non_stream_parses_message(fake: FakeUpstream) -> None:
    """messages.create() without streaming gets the same blocks as a JSON message."""
    fake.replies.append(Reply(blocks=RICH_BLOCKS, usage={"input_tokens": 11, "output_tokens": 22}))
    raw = anthropic_client(fake).messages.with_raw_response.create(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    message = raw.parse()
    assert [b.model_dump(exclude_none=True) for b in message.content] == RICH_BLOCKS
    assert (message.stop_reason, message.usage.input_tokens, message.usage.output_tokens) == (
        "tool_use",
        11,
        22,
    )
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-remaining"].isdigit()


def test_anthropic_wire_events_follow_the_protocol(fake: FakeUpstream) -> None:
    """The SSE wire has the documented order, typed events, split deltas, whole special blocks."""
    search_result = {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_01ABC",
        "content": [
            {
                "type": "web_search_result",
                "url": "https://x.test",
                "title": "X",
                "encrypted_content": "e",
            }
        ],
    }
    blocks = [
        *RICH_BLOCKS,
        {"type": "tool_use", "id": "toolu_01EMPTY", "name": "Noop", "input": {}},
        {"type": "redacted_thinking", "data": "opaque"},
        {
            "type": "server_tool_use",
            "id": "srvtoolu_01ABC",
            "name": "web_search",
            "input": {"query": "x"},
        },
        search_result,
        {"type": "future_block", "payload": {"k": 1}},
    ]
    fake.replies.append(Reply(blocks=blocks))
    resp, conn = raw_post(fake, "/v1/messages", {"model": "m", "stream": True, "messages": []})
    assert resp.status == 200
    assert resp.getheader("content-type") == "text/event-stream; charset=utf-8"
    events = parse_sse(resp.read())
    conn.close()
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == [
        "message_delta",
        "message_stop",
    ]
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RawMessageStreamEvent)
    datas = [json.loads(data) for _, data in events]
    for name, data in zip(names, datas, strict=False):
        assert data["type"] == name
        if name != "ping" and data.get("content_block", {}).get("type") != "future_block":
            adapter.validate_python(data)
    start_usage = datas[0]["message"]["usage"]
    assert {
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    } <= start_usage.keys()

    def deltas(index: int, kind: str, key: str) -> list[str]:
        return [
            d["delta"][key]
            for d in datas
            if d["type"] == "content_block_delta"
            and d["index"] == index
            and d["delta"]["type"] == kind
        ]

    assert len(deltas(0, "thinking_delta", "thinking")) > 1
    assert deltas(0, "signature_delta", "signature") == ["EqSIG123=="]
    assert len(deltas(1, "text_delta", "text")) > 1
    fragments = deltas(2, "input_json_delta", "partial_json")
    assert len(fragments) > 1 and json.loads("".join(fragments)) == TOOL_INPUT
    assert [d for d in datas if d.get("index") == 3 and d["type"] == "content_block_delta"] == []
    starts = {d["index"]: d["content_block"] for d in datas if d["type"] == "content_block_start"}
    assert starts[4] == {"type": "redacted_thinking", "data": "opaque"}
    assert json.loads("".join(deltas(5, "input_json_delta", "partial_json"))) == {"query": "x"}
    assert starts[6] == search_result and starts[7] == {"type": "future_block", "payload": {"k": 1}}
    assert datas[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[1][1] == '{"type": "ping"}'


def test_anthropic_error_event_makes_sdk_raise(fake: FakeUpstream) -> None:
    """An `event: error` mid-stream replaces message_stop and surfaces as an SDK APIStatusError."""
    fake.replies.append(Reply(error_event={"type": "overloaded_error", "message": "Overloaded"}))
    events = anthropic_sse(
        Reply(error_event={"type": "overloaded_error", "message": "Overloaded"}), "m"
    )
    assert events[-1].startswith(b"event: error\n") and b"message_stop" not in b"".join(events)
    stream = anthropic_client(fake).messages.stream(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"), stream as s:
        s.get_final_message()


def test_error_status_and_unknown_path(fake: FakeUpstream) -> None:
    """A scripted status answers the provider's error JSON; unknown paths 404 not_found_error."""
    fake.replies.append(Reply(status=529))
    with pytest.raises(anthropic.APIStatusError) as info:
        anthropic_client(fake).messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 529
    assert (
        isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "overloaded_error"
    )
    fake.replies.append(Reply(status=429, headers=[("retry-after", "7")]))
    with pytest.raises(openai.RateLimitError) as rate:
        openai_client(fake).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    assert rate.value.response.headers["retry-after"] == "7"
    conn = http.client.HTTPConnection("127.0.0.1", int(fake.host_port.split(":")[1]), timeout=5)
    conn.request("GET", "/v2/nothing")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert (
        resp.status == 404
        and body["type"] == "error"
        and body["error"]["type"] == "not_found_error"
    )
    conn.close()


def test_side_endpoints_and_raw_request_capture(fake: FakeUpstream) -> None:
    """count_tokens, models, /api/hello answer; requests are kept raw with duplicate headers."""
    client = anthropic_client(fake)
    count = client.messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "hello " * 50}]
    )
    assert count.input_tokens > 10
    assert next(m.id for m in client.models.list()).startswith("claude-")
    assert openai_client(fake).models.list().data[0].object == "model"
    conn = http.client.HTTPConnection("127.0.0.1", int(fake.host_port.split(":")[1]), timeout=5)
    for method in ("HEAD", "GET"):
        conn.request(method, "/api/hello")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.putrequest("POST", "/v1/messages?beta=true", skip_accept_encoding=True)
    for name, value in [("X-Dup", "one"), ("content-type", "application/json"), ("x-dup", "two")]:
        conn.putheader(name, value)
    payload = b'{"model":"m","messages":[{"role":"user","content":"hi there"}],"max_tokens":5}'
    conn.putheader("Content-Length", str(len(payload)))
    conn.endheaders(payload)
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    conn.close()
    assert reply["content"] == [{"type": "text", "text": "Echo: hi there"}]
    got = fake.received[-1]
    assert (got.path, got.query_string, got.body) == ("/v1/messages", "beta=true", payload)
    assert [h for h in got.headers if h[0].lower() == "x-dup"] == [
        ("X-Dup", "one"),
        ("x-dup", "two"),
    ]
    assert got.header_values("X-DUP") == ["one", "two"]
    assert [r.path for r in fake.model_calls()] == ["/v1/messages"]


def test_openai_chat_stream_accumulates_tool_calls(fake: FakeUpstream) -> None:
    """chat.completions.stream() accumulates content and tool-call arguments; usage comes last."""
    fake.replies.append(Reply(blocks=RICH_BLOCKS, usage={"input_tokens": 5, "output_tokens": 9}))
    client = openai_client(fake)
    with client.chat.completions.stream(
        model="gpt-4o",
        messages=[{"role": "user", "content": "list"}],
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == RICH_BLOCKS[1]["text"]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    assert calls[0].id == "call_01TESTTESTTESTTESTTEST" and calls[0].function.name == "Bash"
    assert json.loads(calls[0].function.arguments) == TOOL_INPUT
    assert final.usage is not None and (
        final.usage.prompt_tokens,
        final.usage.completion_tokens,
    ) == (5, 9)
    chunks = [
        d for _, d in parse_sse(b"".join(openai_chat_sse(Reply(blocks=RICH_BLOCKS), "gpt", True)))
    ]
    assert chunks[-1] == "[DONE]"
    last = json.loads(chunks[-2])
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    first = json.loads(chunks[0])["choices"][0]["delta"]
    assert first["role"] == "assistant"
    arg_chunks = [json.loads(c)["choices"][0]["delta"].get("tool_calls") for c in chunks[1:-2]]
    tool_chunks = [tc[0] for tc in arg_chunks if tc]
    assert (
        tool_chunks[0]["id"]
        and all("id" not in tc for tc in tool_chunks[1:])
        and len(tool_chunks) > 2
    )


def test_openai_chat_manual_stream_and_non_stream(fake: FakeUpstream) -> None:
    """Chat streaming without include_usage has no usage chunk; non-stream is chat.completion."""
    client = openai_client(fake)
    pieces: list[str] = []
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "tell me"}], stream=True
    ):
        assert chunk.choices, "no usage-only chunk without include_usage"
        pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == "Echo: tell me"
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "RUN_TOOL:date"}]
    )
    calls = completion.choices[0].message.tool_calls or []
    assert (
        completion.object == "chat.completion"
        and completion.choices[0].finish_reason == "tool_calls"
    )
    assert (
        calls[0].type == "function" and json.loads(calls[0].function.arguments)["command"] == "date"
    )


def test_openai_responses_stream_yields_final_response(fake: FakeUpstream) -> None:
    """responses.stream() parses every event and yields the final response with a function_call."""
    fake.replies.append(Reply(blocks=RICH_BLOCKS))
    client = openai_client(fake)
    deltas: list[str] = []
    with client.responses.stream(
        model="gpt-5", input="list files", previous_response_id="resp_earlier"
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert final.id.startswith("resp_") and final.status == "completed"
    assert final.previous_response_id == "resp_earlier"
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message", "function_call"]
    assert final.output_text == RICH_BLOCKS[1]["text"] and len(deltas) > 1
    call = final.output[2]
    assert (
        call.type == "function_call"
        and call.name == "Bash"
        and json.loads(call.arguments) == TOOL_INPUT
    )
    assert final.usage is not None and final.usage.total_tokens > 0
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
    wire = parse_sse(b"".join(openai_responses_sse(Reply(blocks=RICH_BLOCKS), "gpt-5")))
    for index, (name, data) in enumerate(wire):
        event = adapter.validate_python(json.loads(data))
        assert event.type == name and event.sequence_number == index
    assert wire[0][0] == "response.created" and wire[-1][0] == "response.completed"
    non_stream = client.responses.create(
        model="gpt-5", input=[{"role": "user", "content": "again"}]
    )
    assert non_stream.output_text == "Echo: again"


def test_gzip_stream_is_incremental_and_decodes_to_same_events(fake: FakeUpstream) -> None:
    """With gzip the stream is compressed per event (live) and decodes to the plain events."""
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    fake.replies.append(Reply(blocks=RICH_BLOCKS))
    plain_resp, conn = raw_post(fake, "/v1/messages", body)
    plain = plain_resp.read()
    conn.close()
    fake.replies.append(Reply(blocks=RICH_BLOCKS, gzip=True, event_delay=0.02))
    resp, conn = raw_post(fake, "/v1/messages", body, {"accept-encoding": "gzip"})
    assert resp.getheader("content-encoding") == "gzip"
    decoder = zlib.decompressobj(wbits=31)
    first = decoder.decompress(resp.read1(65536))
    assert first.startswith(b"event: message_start\n") and first.endswith(b"\n\n")
    rest = resp.read()
    conn.close()
    decoded = first + decoder.decompress(rest) + decoder.flush()
    assert decoder.eof

    def normalised(raw: bytes) -> list[tuple[str | None, Any]]:
        out = []
        for name, data in parse_sse(raw):
            obj = json.loads(data)
            if name == "message_start":
                obj["message"].pop("id")
            out.append((name, obj))
        return out

    assert normalised(decoded) == normalised(plain)


def test_timing_delays_are_honoured(fake: FakeUpstream) -> None:
    """first_byte_delay holds the headers back; event_delay spaces the events on the wire."""
    fake.replies.append(Reply(first_byte_delay=0.3, event_delay=0.05))
    started = time.monotonic()
    resp, conn = raw_post(fake, "/v1/messages", {"model": "m", "stream": True, "messages": []})
    headers_at = time.monotonic() - started
    chunk_times: list[float] = []
    while resp.read1(65536):
        chunk_times.append(time.monotonic() - started)
    conn.close()
    assert headers_at >= 0.29
    assert len(chunk_times) >= 5 and chunk_times[-1] - chunk_times[0] >= 0.05 * 4


def test_drop_after_events_makes_sdk_raise(fake: FakeUpstream) -> None:
    """Aborting the connection mid-stream (or before a JSON body) makes both SDKs raise."""
    fake.replies.append(Reply(drop_after_events=3))
    seen: list[str] = []
    stream = anthropic_client(fake).messages.stream(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    # anthropic < 2.17 lets httpx's RemoteProtocolError through; newer versions wrap it.
    dropped = (httpx2.RemoteProtocolError, anthropic.APIConnectionError)
    with pytest.raises(dropped, match="incomplete chunked read"), stream as s:
        for event in s:
            seen.append(event.type)
    assert seen[0] == "message_start" and "message_stop" not in seen
    fake.replies.append(Reply(drop_after_events=2))
    with pytest.raises(openai.APIConnectionError):
        list(
            openai_client(fake).chat.completions.create(
                model="g", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    fake.replies.append(Reply(drop_after_events=0))
    with pytest.raises(anthropic.APIConnectionError):
        anthropic_client(fake).messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert len(fake.model_calls()) == 3


def test_default_responder_echo_tool_and_tool_result() -> None:
    """default_responder echoes, asks for Bash on RUN_TOOL:, and reports tool results (all APIs)."""

    def req(path: str, body: dict[str, Any]) -> ReceivedRequest:
        return ReceivedRequest("POST", path, "", [], orjson.dumps(body))

    assert default_responder(req("/v1/messages", {"messages": []})).blocks == [
        {"type": "text", "text": DEFAULT_TEXT}
    ]
    user = {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system-reminder>x</system-reminder>"},
            {"type": "text", "text": "RUN_TOOL:echo hi"},
        ],
    }
    tool = default_responder(req("/v1/messages", {"messages": [user]})).blocks[0]
    assert (tool["type"], tool["name"], tool["input"]) == (
        "tool_use",
        "Bash",
        {"command": "echo hi", "description": "run it"},
    )
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": tool["id"], "content": "hi\n" * 100}],
    }
    text = default_responder(
        req("/v1/messages", {"messages": [user, {"role": "assistant", "content": [tool]}, result]})
    ).blocks[0]
    assert text["text"] == "Tool said: " + ("hi\n" * 100)[:200]
    chat = [
        {"role": "user", "content": "RUN_TOOL:ls"},
        {"role": "assistant", "tool_calls": []},
        {"role": "tool", "tool_call_id": "c", "content": "out"},
    ]
    assert (
        default_responder(req("/v1/chat/completions", {"messages": chat})).blocks[0]["text"]
        == "Tool said: out"
    )
    assert (
        default_responder(req("/v1/chat/completions", {"messages": chat[:1]})).blocks[0]["type"]
        == "tool_use"
    )
    items = [
        {"role": "user", "content": "RUN_TOOL:ls"},
        {"type": "function_call", "call_id": "c", "name": "Bash", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "done"},
    ]
    assert (
        default_responder(req("/v1/responses", {"input": items})).blocks[0]["text"]
        == "Tool said: done"
    )
    assert (
        default_responder(req("/v1/responses", {"input": "plain"})).blocks[0]["text"]
        == "Echo: plain"
    )


def test_loop_thread_runs_coroutines_and_stops() -> None:
    """LoopThread.run returns a coroutine's result from another thread; stop joins it."""
    loop_thread = LoopThread()
    loop_thread.start()

    async def answer() -> int:
        return 42

    assert loop_thread.run(answer()) == 42
    loop_thread.stop()
    assert loop_thread.loop.is_closed()


def test_claude_code_runs_against_fake(fake: FakeUpstream) -> None:
    """The real Claude Code CLI runs the Bash tool loop against the fake; --continue resumes it."""
    assert CLAUDE_BIN is not None, "Claude Code CLI not found: scripts/test.sh installs it"
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as cwd:
        first = run_claude(
            ["-p", "RUN_TOOL:echo fake-tool-ran", "--dangerously-skip-permissions"],
            base_url=fake.url,
            home=home,
            cwd=cwd,
        )
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "Tool said: fake-tool-ran"
        second = run_claude(
            ["-p", "--continue", "second", "--dangerously-skip-permissions"],
            base_url=fake.url,
            home=home,
            cwd=cwd,
        )
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == "Echo: second"
        api_key = claude_env(fake.url, home)["ANTHROPIC_API_KEY"]
    calls = fake.model_calls()
    assert len(calls) == 3
    for call in calls:
        assert call.query_string == "beta=true" and call.json()["stream"] is True
        assert call.header("x-app") == "cli"
        assert (call.header("user-agent") or "").startswith("claude-cli/")
        assert call.header("x-api-key") == api_key
        assert call.header("anthropic-version") == "2023-06-01"
        assert "claude-code-20250219" in (call.header("anthropic-beta") or "")
    session_ids = {call.header("X-Claude-Code-Session-Id") for call in calls}
    assert len(session_ids) == 1 and None not in session_ids
    session_id = session_ids.pop()
    assert json.loads(calls[0].json()["metadata"]["user_id"])["session_id"] == session_id
    tool_turn = calls[1].json()["messages"]
    assistant = [m for m in tool_turn if m["role"] == "assistant"][-1]
    tool_use = assistant["content"][-1]
    assert (tool_use["name"], tool_use["input"]["command"]) == ("Bash", "echo fake-tool-ran")
    result = tool_turn[-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == tool_use["id"]
    assert result["content"].strip() == "fake-tool-ran"
    resumed = calls[2].json()["messages"]
    assert [m["role"] for m in resumed if m["role"] != "system"] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert resumed[:4] == [{**m, "content": _no_cache(m["content"])} for m in tool_turn]
    assert resumed[-2]["content"][-1]["text"] == "Tool said: fake-tool-ran"
    assert resumed[-1]["content"][-1]["text"] == "second"
    markers = [
        (i, j)
        for i, m in enumerate(resumed)
        if isinstance(m["content"], list)
        for j, block in enumerate(m["content"])
        if "cache_control" in block
    ]
    assert markers == [(len(resumed) - 1, len(resumed[-1]["content"]) - 1)]


CLAUDE_SAMPLES = Path(__file__).parent / "data" / "claude_code"
SAME_EVERY_RUN = ("accept", "content-type", "x-stainless-package-version", "anthropic-beta",
                  "anthropic-dangerous-direct-browser-access", "anthropic-version", "x-app",
                  "accept-encoding")


def test_claude_code_sends_what_the_samples_hold(tmp_path: Path) -> None:
    """The installed CLI's tool loop and --continue are the requests in tests/data/claude_code:
    header names in order and case, the protocol headers' values, body keys, tools, system
    blocks, message roles and the keys of metadata.user_id (a change means: read the new wire,
    then regenerate the samples)."""
    calls = capture_claude_code(tmp_path)
    samples = orjson.loads((CLAUDE_SAMPLES / "requests.json").read_bytes())
    for call, sample in zip(calls, samples, strict=True):
        assert (call.method, call.path, call.query_string) == (
            sample["method"], sample["path"], sample["query_string"])
        assert [name for name, _ in call.headers] == [name for name, _ in sample["headers"]]
        wanted = {name.lower(): value for name, value in sample["headers"]}
        for name in SAME_EVERY_RUN:
            assert call.header(name) == wanted[name], name
        body = call.json()
        stored = orjson.loads((CLAUDE_SAMPLES / sample["file"]).read_bytes())
        assert list(body) == list(stored)
        assert [tool["name"] for tool in body["tools"]] == [t["name"] for t in stored["tools"]]
        assert len(body["system"]) == len(stored["system"])
        assert [m["role"] for m in body["messages"]] == [m["role"] for m in stored["messages"]]
        user_id = json.loads(body["metadata"]["user_id"])
        assert list(user_id) == list(json.loads(stored["metadata"]["user_id"]))
        assert user_id["session_id"] == call.header("X-Claude-Code-Session-Id")


def _no_cache(content: Any) -> Any:
    """Content with cache_control markers removed (they move to the newest message)."""
    if not isinstance(content, list):
        return content
    return [{k: v for k, v in block.items() if k != "cache_control"} for block in content]
