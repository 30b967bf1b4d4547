"""OTLP export to Seq: a real proxy, a real fake upstream, official SDK clients, and a real
OTLP/HTTP receiver on Seq's paths that decodes the protobuf (``tests/otlp_receiver.py``)."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from otelproxy import config as config_module
from otelproxy import otlp
from otelproxy.errors import ConfigError
from otelproxy.otlp import mapping
from tests.conftest import RunningProxy
from tests.fake_upstream import FakeUpstream, Reply
from tests.otlp_receiver import LogData, OtlpReceiver, SpanData, unused_url

API_KEY = "sk-ant-api03-" + "k" * 40 + "WXYZ"
SEQ_KEY = "seq-api-key-0123456789-SECRET"
CC_SESSION = "5b0f7c52-9a51-4d47-9d0e-5d1c0ffee000"
SERVER, CLIENT = 2, 3
UNSET, ERROR = 0, 2
INFO, WARN, SEV_ERROR = 9, 13, 17
SEQ_EVENT_LIMIT = 256 * 1024

# Attributes every exchange carries on the span and on both log records (when known).
COMMON = (
    "proxy.exchange.id", "http.request.method", "url.path", "server.address", "server.port",
    "proxy.total_ms", "proxy.overhead_ms", "proxy.outcome", "http.request.body.size",
    "http.response.body.size",
)


@dataclass
class Exported:
    """What one exchange became in the receiver."""

    span: SpanData
    client: SpanData | None
    request: LogData
    response: LogData

    def attr(self, name: str) -> Any:
        return self.span.attributes.get(name)


@pytest.fixture(autouse=True)
def _no_ambient_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("OTEL_"):
            monkeypatch.delenv(key)


@pytest.fixture
def seq() -> Iterator[OtlpReceiver]:
    with OtlpReceiver(api_key=SEQ_KEY) as receiver:
        yield receiver


@pytest.fixture
def exporting(fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path) -> Iterator[RunningProxy]:
    running = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY)
    try:
        yield running
    finally:
        running.stop()


def claude(proxy: RunningProxy, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.base(), api_key=API_KEY, max_retries=0,
                               default_headers=headers or None)


def exported(proxy: RunningProxy, seq: OtlpReceiver, count: int) -> list[Exported]:
    """The first ``count`` exchanges as exported (waits for them), in start order."""
    deadline = time.monotonic() + 20
    while True:
        proxy.flush()
        servers = [s for s in seq.spans() if s.kind == SERVER]
        if len(servers) >= count and len(seq.logs()) >= 2 * count:
            break
        assert time.monotonic() < deadline, f"{len(servers)} of {count} exchange(s) exported"
        time.sleep(0.05)
    clients = {s.parent_span_id: s for s in seq.spans() if s.kind == CLIENT}
    logs: dict[tuple[str, str], LogData] = {
        (log.attributes["proxy.exchange.id"], log.event_name): log for log in seq.logs()
    }
    out = []
    for span in sorted(servers, key=lambda s: s.start_ns)[:count]:
        exchange_id = span.attributes["proxy.exchange.id"]
        item = Exported(span, clients.get(span.span_id), logs[(exchange_id, "request")],
                        logs[(exchange_id, "response")])
        assert_linked(item)
        out.append(item)
    return out


def assert_linked(item: Exported) -> None:
    """The invariants of every exchange: records in the span's context, shared attributes."""
    span = item.span
    assert span.kind == SERVER
    assert len(span.trace_id) == 32 and int(span.trace_id, 16)
    for record, name in ((item.request, "request"), (item.response, "response")):
        assert (record.trace_id, record.span_id) == (span.trace_id, span.span_id)
        assert record.event_name == name
        assert record.attributes["proxy.record"] == name
        assert isinstance(record.body, str) and record.body.startswith(
            span.attributes["http.request.method"])
        for key in (*COMMON, "session.id", "session.seq", "gen_ai.request.model",
                    "gen_ai.usage.input_tokens", "http.response.status_code", "proxy.ttfb_ms"):
            assert record.attributes.get(key) == span.attributes.get(key), key
        assert record.resource["service.name"] == "otelproxy"
        assert record.size < SEQ_EVENT_LIMIT
    rejected = span.attributes["proxy.outcome"] == "rejected"  # never reached an upstream
    for key in COMMON:
        assert key in span.attributes or (rejected and key.startswith("server.")), key
    assert item.request.time_ns == span.start_ns
    assert item.response.time_ns == span.end_ns
    assert item.request.severity_number == item.response.severity_number
    if item.client is not None:
        assert item.client.trace_id == span.trace_id
        assert item.client.parent_span_id == span.span_id
        assert span.start_ns <= item.client.start_ns <= item.client.end_ns <= span.end_ns
    assert span.size < SEQ_EVENT_LIMIT


def all_values(item: Exported) -> str:
    """Every attribute value of an exchange's telemetry as one string (for secret checks)."""
    parts = [repr(item.span.attributes), repr(item.request.attributes),
             repr(item.response.attributes), str(item.request.body), str(item.response.body)]
    if item.client is not None:
        parts.append(repr(item.client.attributes))
    return "\n".join(parts)


def healthz(proxy: RunningProxy) -> dict[str, Any]:
    with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=5) as answer:
        body: dict[str, Any] = orjson.loads(answer.read())
    return body


def wait_health(proxy: RunningProxy, key: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (body := healthz(proxy)).get(key, 0) == 0:
        assert time.monotonic() < deadline, f"/healthz never showed {key}: {body}"
        time.sleep(0.1)
    return body


def local_entries(proxy: RunningProxy) -> list[dict[str, Any]]:
    """The JSONL record, flushing only the local store (the OTLP sink may be stuck)."""
    deadline = time.monotonic() + 10
    while proxy.server.state.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proxy.server.pipeline.flush(10, sinks=False)  # the local record, not the export
    out: list[dict[str, Any]] = []
    for path in sorted(proxy.log_dir.glob("*/*.jsonl")):
        out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
    return out


def fast_batches(monkeypatch: pytest.MonkeyPatch, timeout: str = "1") -> None:
    """Export every 50 ms and give up on an export after ``timeout`` seconds."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", timeout)


def stream_text(client: anthropic.Anthropic, prompt: str, model: str = "claude-x") -> str:
    with client.messages.stream(model=model, max_tokens=512,
                                messages=[{"role": "user", "content": prompt}]) as stream:
        return "".join(stream.text_stream)


# -- the attribute contract ----------------------------------------------------------------------


def test_streaming_call_exports_span_and_two_linked_records(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """A streamed Messages call becomes a `chat {model}` SERVER span with GenAI, session,
    timing and chunk attributes, and `request`/`response` records in its context."""
    fake.replies.append(Reply(
        blocks=[{"type": "text", "text": "one two three four five six seven eight"}],
        usage={"input_tokens": 1200, "output_tokens": 310, "cache_read_input_tokens": 100,
               "cache_creation_input_tokens": 50},
        event_delay=0.01,
    ))
    messages: list[Any] = [{"role": "user", "content": "count to eight"}]
    with claude(exporting, **{"X-Claude-Code-Session-Id": CC_SESSION}).messages.stream(
        model="claude-x", max_tokens=100, messages=messages
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == "one two three four five six seven eight"

    [item] = exported(exporting, seq, 1)
    span, a = item.span, item.span.attributes
    assert span.name == "chat claude-x"
    assert span.status_code == UNSET
    assert span.events == []
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "claude-x"
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.response.model"] == "claude-x"
    assert a["gen_ai.response.id"].startswith("msg_")
    assert a["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert a["gen_ai.usage.input_tokens"] == 1200
    assert a["gen_ai.usage.output_tokens"] == 310
    assert a["gen_ai.usage.cache_read.input_tokens"] == 100
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 50
    assert a["session.id"] and a["gen_ai.conversation.id"] == a["session.id"]
    assert isinstance(a["session.seq"], int)
    assert "session.parent_id" not in a and "session.fork.from_seq" not in a
    assert a["client.session_id"] == CC_SESSION
    assert a["http.request.method"] == "POST"
    assert a["url.path"] == "/v1/messages"
    assert a["http.response.status_code"] == 200
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", fake.port)
    assert a["user_agent.original"].startswith("Anthropic/Python")
    assert a["proxy.outcome"] == "complete"
    assert 0 <= a["proxy.ttfb_ms"] <= a["proxy.total_ms"]
    assert 0 <= a["proxy.overhead_ms"] <= a["proxy.total_ms"]
    assert abs((span.end_ns - span.start_ns) / 1e6 - a["proxy.total_ms"]) < 1
    assert a["http.request.body.size"] == len(fake.model_calls()[0].body)
    assert a["http.response.body.size"] > 0
    offsets = a["stream.chunk_offsets_ms"]
    assert a["stream.chunk_count"] == len(offsets) >= 8
    assert all(isinstance(o, int) for o in offsets)
    assert offsets == sorted(offsets) and offsets[-1] <= a["proxy.total_ms"]
    assert not any(k.startswith("http.") and ".header." in k for k in a)  # headers: on records

    request, response = item.request, item.response
    assert request.severity_number == INFO and request.severity_text == "INFO"
    assert request.body.startswith("POST /v1/messages claude-x")
    assert response.body.startswith("POST /v1/messages 200 claude-x ")
    assert response.body.endswith(" s in=1200 out=310")
    assert orjson.loads(request.attributes["gen_ai.input.messages.new"]) == messages
    assert "gen_ai.input.messages.new.truncated" not in request.attributes
    assert "http.request.body.content" not in request.attributes
    assert request.attributes["http.request.header.user-agent"] == a["user_agent.original"]
    assert request.attributes["http.request.header.x-claude-code-session-id"] == CC_SESSION
    assert not any(k.startswith("http.response.header.") for k in request.attributes)
    assert response.attributes["http.response.header.content-type"] == \
        "text/event-stream; charset=utf-8"
    assert not any(k.startswith("http.request.header.") for k in response.attributes)
    assert orjson.loads(response.attributes["gen_ai.output.messages"]) == [
        {"role": "assistant", "content": [{"type": "text", "text": text}]}
    ]
    assert "http.response.body.content" not in response.attributes
    assert "gen_ai.input.messages.new" not in response.attributes
    assert "gen_ai.output.messages" not in span.attributes

    assert item.client is not None
    assert item.client.name == "POST /v1/messages"
    assert item.client.attributes["url.full"] == f"{fake.url}/v1/messages"
    assert item.client.status_code == UNSET


def test_secrets_are_obfuscated_and_seq_key_only_in_the_export_header(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """Client API keys appear only obfuscated; the Seq key travels only as X-Seq-ApiKey."""
    stream_text(claude(exporting), "hello")
    [item] = exported(exporting, seq, 1)
    text = all_values(item)
    assert API_KEY not in text
    assert "sk-ant-...WXYZ" in text
    assert SEQ_KEY not in text
    assert all(r.headers.get("x-seq-apikey") == SEQ_KEY for r in seq.requests)
    assert all(r.headers["Content-Type"] == "application/x-protobuf" for r in seq.requests)


def test_non_streaming_openai_call(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """A non-streamed OpenAI chat completion: provider openai, stream false, no chunk timings."""
    client = openai.OpenAI(base_url=exporting.base("openai") + "/v1", api_key="sk-proj-" + "x" * 40,
                           max_retries=0)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "say hi"}])
    [item] = exported(exporting, seq, 1)
    a = item.span.attributes
    assert item.span.name == "chat gpt-4o-mini"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.stream"] is False
    assert a["url.path"] == "/v1/chat/completions"
    assert a["gen_ai.response.id"] == completion.id
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert completion.usage is not None
    assert a["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert "stream.chunk_count" not in a and "stream.chunk_offsets_ms" not in a
    [message] = orjson.loads(item.response.attributes["gen_ai.output.messages"])
    assert message["role"] == "assistant"
    assert message["content"] == completion.choices[0].message.content
    assert item.request.severity_number == INFO


def test_tool_use_call_exports_the_reassembled_tool_call(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """A streamed tool_use answer: finish reason tool_use, the tool call with its parsed input."""
    fake.replies.append(Reply(blocks=[
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01ABC", "name": "Bash",
         "input": {"command": "ls -la", "description": "list"}},
    ]))
    with claude(exporting).messages.stream(
        model="claude-x", max_tokens=100,
        tools=[{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": "list files"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    [item] = exported(exporting, seq, 1)
    assert item.attr("gen_ai.response.finish_reasons") == ["tool_use"]
    [message] = orjson.loads(item.response.attributes["gen_ai.output.messages"])
    assert message["content"][1] == {"type": "tool_use", "id": "toolu_01ABC", "name": "Bash",
                                     "input": {"command": "ls -la", "description": "list"}}


def test_untracked_calls_are_named_by_low_cardinality_route_and_carry_bodies(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """count_tokens and models/{id} are `{METHOD} {route}` spans with http body attributes."""
    client = claude(exporting)
    counted = client.messages.count_tokens(model="claude-x",
                                           messages=[{"role": "user", "content": "hi"}])
    client.models.retrieve("claude-sonnet-4-5-20250929")
    count, model = exported(exporting, seq, 2)
    assert count.span.name == "POST /v1/messages/count_tokens"
    assert model.span.name == "GET /v1/models/{id}"
    for item in (count, model):
        assert "session.id" not in item.span.attributes
        assert "gen_ai.operation.name" not in item.span.attributes
        assert item.attr("gen_ai.provider.name") == "anthropic"
        assert "gen_ai.input.messages.new" not in item.request.attributes
        assert "gen_ai.output.messages" not in item.response.attributes
    sent = orjson.loads(count.request.attributes["http.request.body.content"])
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    answer = orjson.loads(count.response.attributes["http.response.body.content"])
    assert answer["input_tokens"] == counted.input_tokens
    assert "http.request.body.content" not in model.request.attributes  # GET: empty body
    assert orjson.loads(model.response.attributes["http.response.body.content"])["id"] == \
        "claude-sonnet-4-5-20250929"


# -- errors and aborts -----------------------------------------------------------------------------


def test_4xx_is_warn_and_span_status_unset(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """An upstream 429 gives WARN records, an unset span status and the error body on `response`."""
    fake.replies.append(Reply(status=429))
    with pytest.raises(anthropic.RateLimitError):
        stream_text(claude(exporting), "hi")
    [item] = exported(exporting, seq, 1)
    assert item.span.status_code == UNSET
    assert item.attr("http.response.status_code") == 429
    assert item.attr("proxy.outcome") == "complete"
    assert "error.type" not in item.span.attributes
    assert (item.request.severity_number, item.response.severity_text) == (WARN, "WARN")
    error = orjson.loads(item.response.attributes["http.response.body.content"])
    assert error["error"]["type"] == "rate_limit_error"
    assert " 429 " in item.response.body


def test_5xx_is_error(exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver) -> None:
    """An upstream 500 gives ERROR records and an ERROR span status with error.type."""
    fake.replies.append(Reply(status=500))
    with pytest.raises(anthropic.InternalServerError):
        stream_text(claude(exporting), "hi")
    [item] = exported(exporting, seq, 1)
    assert item.span.status_code == ERROR
    assert item.attr("error.type") == "500"
    assert (item.request.severity_number, item.response.severity_text) == (SEV_ERROR, "ERROR")
    assert item.client is not None and item.client.status_code == ERROR


def test_upstream_drop_is_error(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """A stream the upstream cuts mid-way is `upstream_aborted`, ERROR on span and records."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "a b c d e f g h i j"}],
                              drop_after_events=3))
    with pytest.raises((anthropic.APIError, httpx2.HTTPError)):
        stream_text(claude(exporting), "hi")
    [item] = exported(exporting, seq, 1)
    assert item.attr("proxy.outcome") == "upstream_aborted"
    assert item.attr("error.type") == "upstream_aborted"
    assert item.span.status_code == ERROR and item.span.status_message
    assert item.response.severity_number == SEV_ERROR
    assert item.response.body.endswith("upstream_aborted")
    assert item.client is not None and item.client.status_code == ERROR
    assert item.attr("stream.chunk_count") >= 1


def test_client_abort_is_error(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """A client that hangs up mid-stream gives `client_aborted`, ERROR span and records."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": " ".join(["word"] * 60)}],
                              event_delay=0.05))
    with claude(exporting).messages.stream(
        model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "talk"}]
    ) as stream:
        for _ in stream:
            break
    [item] = exported(exporting, seq, 1)
    assert item.attr("proxy.outcome") == "client_aborted"
    assert item.span.status_code == ERROR
    assert item.attr("error.type") == "client_aborted"
    assert item.request.severity_number == item.response.severity_number == SEV_ERROR


def test_unreachable_upstream_is_error(seq: OtlpReceiver, tmp_path: Path) -> None:
    """An upstream that refuses connections gives a 502 `upstream_error` exchange, ERROR."""
    gone = FakeUpstream()
    gone.start()
    proxy = RunningProxy(gone, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY)
    try:
        gone.stop()
        with pytest.raises(anthropic.APIStatusError) as raised:
            stream_text(claude(proxy), "hi")
        assert raised.value.status_code == 502
        [item] = exported(proxy, seq, 1)
        assert item.attr("proxy.outcome") == "upstream_error"
        assert item.attr("http.response.status_code") == 502
        assert item.span.status_code == ERROR
        assert item.response.severity_number == SEV_ERROR
        assert item.client is not None and item.client.status_code == ERROR
        assert item.response.attributes["proxy.error"]
    finally:
        proxy.stop()


def test_rejected_request_is_warn_named_by_method_only(
    exporting: RunningProxy, seq: OtlpReceiver
) -> None:
    """A request the proxy refuses (unknown provider) is a WARN exchange named `{METHOD}`."""
    client = anthropic.Anthropic(base_url=exporting.url + "/nowhere", api_key=API_KEY,
                                 max_retries=0)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    [item] = exported(exporting, seq, 1)
    assert item.span.name == "POST"
    assert item.attr("proxy.outcome") == "rejected"
    assert item.attr("http.response.status_code") == 404
    assert item.client is None
    assert item.response.severity_number == WARN


# -- trace context -------------------------------------------------------------------------------


def test_client_traceparent_is_joined_and_nothing_is_injected_upstream(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """The span joins a client's trace; the upstream sees exactly the client's headers."""
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traceparent = f"00-{trace_id}-{parent_id}-01"
    client = claude(exporting)
    stream_text(client, "no trace")
    with client.messages.stream(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "traced"}],
        extra_headers={"traceparent": traceparent},
    ) as stream:
        stream.get_final_message()
    plain, traced = exported(exporting, seq, 2)
    assert plain.span.parent_span_id == "" and plain.span.trace_id != trace_id
    assert (traced.span.trace_id, traced.span.parent_span_id) == (trace_id, parent_id)
    assert traced.request.trace_id == trace_id
    first, second = fake.model_calls()
    assert first.header("traceparent") is None and first.header("tracestate") is None
    assert second.header_values("traceparent") == [traceparent]


# -- sessions (these depend on the session tracker filling SessionInfo) -------------------------


def test_turns_share_a_session_and_a_fork_names_its_parent(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """Turns of one conversation share session.id with seq 1, 2, 3; an edited earlier turn
    forks: a new session.id with session.parent_id and session.fork.from_seq."""
    client = claude(exporting)
    system = "You are terse."
    history: list[Any] = []
    for prompt in ("first", "second", "third"):
        history.append({"role": "user", "content": prompt})
        reply = client.messages.create(model="claude-x", max_tokens=50, system=system,
                                       messages=history)
        assert isinstance(reply.content[0], anthropic.types.TextBlock)
        history.append({"role": "assistant",
                        "content": [{"type": "text", "text": reply.content[0].text}]})
    fork: list[Any] = [*history[:2], {"role": "user", "content": "second, edited"}]
    client.messages.create(model="claude-x", max_tokens=50, system=system, messages=fork)

    one, two, three, forked = exported(exporting, seq, 4)
    session = one.attr("session.id")
    assert [i.attr("session.id") for i in (one, two, three)] == [session] * 3
    assert [i.attr("session.seq") for i in (one, two, three)] == [1, 2, 3]
    for item in (one, two, three):
        assert "session.parent_id" not in item.span.attributes
        assert "session.fork.from_seq" not in item.span.attributes
    assert forked.attr("session.id") != session
    assert forked.attr("gen_ai.conversation.id") == forked.attr("session.id")
    assert forked.attr("session.parent_id") == session
    assert forked.attr("session.fork.from_seq") == 1
    for record in (forked.request, forked.response):
        assert record.attributes["session.parent_id"] == session
        assert record.attributes["session.fork.from_seq"] == 1

    # Only what each turn added travels on `request` (the assistant turn in between is the
    # previous `response`); the system prompt travels as its hash.
    news = [orjson.loads(i.request.attributes["gen_ai.input.messages.new"])
            for i in (one, two, three, forked)]
    assert news == [history[0:1], history[2:3], history[4:5], fork[2:3]]
    sha = one.request.attributes["gen_ai.system_instructions.sha256"]
    assert len(sha) == 64 and int(sha, 16) >= 0
    assert three.request.attributes["gen_ai.system_instructions.sha256"] == sha
    assert sha != hashlib.sha256(b"").hexdigest()


def test_agent_topology_and_compaction_are_attributes(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """Claude Code's agent headers become gen_ai.agent.id / proxy.agent.parent_id; a subagent's
    session names the spawning turn; a compaction request is marked session.compaction."""
    main = claude(exporting, **{"X-Claude-Code-Session-Id": CC_SESSION})
    history: list[Any] = [{"role": "user", "content": "RUN_AGENT: look around"}]
    spawn = main.messages.create(model="claude-x", max_tokens=50, messages=history)
    assert isinstance(spawn.content[0], anthropic.types.ToolUseBlock)
    sub = claude(exporting, **{"X-Claude-Code-Session-Id": CC_SESSION,
                               "X-Claude-Code-Agent-Id": "agent-outer",
                               "X-Claude-Code-Parent-Agent-Id": "agent-top"})
    sub.messages.create(model="claude-x", max_tokens=50,
                        messages=[{"role": "user", "content": "look around"}])
    history += [{"role": "assistant", "content": [spawn.content[0].model_dump()]},
                {"role": "user", "content": "Your task is to create a detailed summary of "
                                            "the conversation so far."}]
    main.messages.create(model="claude-x", max_tokens=50, messages=history)

    first, agent, summary = exported(exporting, seq, 3)
    for item in (first, summary):
        assert item.attr("session.kind") == "conversation"
        assert "gen_ai.agent.id" not in item.span.attributes
    assert summary.attr("session.id") == first.attr("session.id")
    assert summary.attr("session.compaction") == "request"
    assert "session.compaction" not in first.span.attributes
    for attributes in (agent.span.attributes, agent.request.attributes,
                       agent.response.attributes):
        assert attributes["gen_ai.agent.id"] == "agent-outer"
        assert attributes["proxy.agent.parent_id"] == "agent-top"
        assert attributes["client.session_id"] == CC_SESSION
        assert attributes["session.kind"] == "subagent"
        assert attributes["session.parent_id"] == first.attr("session.id")
        assert attributes["session.fork.from_seq"] == 1


def test_forty_turn_conversation_never_produces_a_record_over_256_kb(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """A long, growing conversation (≈1 MB of history by the end) keeps every exported span and
    log record under Seq's 256 KB event limit, while the local record keeps everything."""
    client = claude(exporting)
    history: list[Any] = []
    for turn in range(40):
        history.append({"role": "user",
                        "content": f"turn {turn}: " + ("tool output line é\n" * 1200)})
        fake.replies.append(Reply(blocks=[{"type": "text",
                                           "text": f"answer {turn} " + "ok " * 300}]))
        with client.messages.stream(model="claude-x", max_tokens=100,
                                    messages=history) as stream:
            text = "".join(stream.text_stream)
        history.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    assert len(orjson.dumps(history)) > 1_000_000
    items = exported(exporting, seq, 40)
    for item in items:
        for record in (item.request, item.response):
            assert record.size < SEQ_EVENT_LIMIT
            rendered = orjson.dumps({"body": record.body, "attributes": record.attributes,
                                     "resource": record.resource})
            assert len(rendered) < SEQ_EVENT_LIMIT  # as Seq would store it, JSON-escaped
            for key, value in record.attributes.items():
                if isinstance(value, str) and not key.startswith("http.request.header."):
                    assert len(value.encode()) <= 64 * 1024, key
        assert item.span.size < SEQ_EVENT_LIMIT
    requests = [e for e in exporting.entries() if e["type"] == "request"]
    assert len(requests) == 40
    assert orjson.loads(exporting.request_bytes(requests[-1]))["messages"] == history[:-1]


def test_body_attributes_are_cut_at_otlp_max_body(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path
) -> None:
    """With --otlp-max-body 4096, a large body is cut on a character boundary and flagged."""
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY,
                         otlp_max_body=4096)
    try:
        client = claude(proxy)
        stream_text(client, "é" * 10_000)
        client.messages.count_tokens(model="claude-x",
                                     messages=[{"role": "user", "content": "ü" * 10_000}])
        chat, count = exported(proxy, seq, 2)
        for record, key in ((chat.request, "gen_ai.input.messages.new"),
                            (chat.response, "gen_ai.output.messages"),
                            (count.request, "http.request.body.content")):
            value = record.attributes[key]
            assert record.attributes[f"{key}.truncated"] is True, key
            assert 4096 - 4 < len(value.encode()) <= 4096, key
            assert "\ufffd" not in value, key
        assert "http.response.body.content.truncated" not in count.response.attributes
    finally:
        proxy.stop()


def test_chunk_events_only_with_the_option(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path
) -> None:
    """--otlp-chunk-events adds one `stream.chunk` span event per chunk, with its timing."""
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY,
                         otlp_chunk_events=True)
    try:
        stream_text(claude(proxy), "one two three four")
        [item] = exported(proxy, seq, 1)
        events = item.span.events
        assert len(events) == item.attr("stream.chunk_count") > 3
        assert {e["name"] for e in events} == {"stream.chunk"}
        assert [e["stream.chunk.index"] for e in events] == list(range(len(events)))
        assert [int(e["stream.chunk.offset_ms"]) for e in events] == \
            item.attr("stream.chunk_offsets_ms")
        assert all(item.span.start_ns <= e["time_ns"] <= item.span.end_ns for e in events)
    finally:
        proxy.stop()


# -- never in the way ------------------------------------------------------------------------------


def test_receiver_down_leaves_proxying_and_local_record_intact(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing listening at the Seq URL, answers and the local record are unchanged;
    /healthz counts the failed exports and says the export is failing (degraded)."""
    fast_batches(monkeypatch)
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=unused_url(), seq_api_key=SEQ_KEY)
    try:
        client = claude(proxy)
        answers = [stream_text(client, f"ping {n}") for n in range(5)]
        assert answers == [f"Echo: ping {n}" for n in range(5)]
        body = wait_health(proxy, "otlp_export_failed")
        assert body["status"] == "degraded" and body["export_status"] == "failing"
        assert body["export_last_error"].startswith("connection failed")
        assert body["records_dropped"] == 0
        entries = local_entries(proxy)
        assert [e["type"] for e in entries].count("response") == 5
    finally:
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 10  # shutdown stays bounded


def test_unresolvable_seq_name_is_named_as_a_lookup_failure(
    fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Seq host name that does not resolve (a real `.invalid` lookup) shows on /healthz as a
    name-resolution failure, not only a connection error, with no part of the URL in it."""
    fast_batches(monkeypatch)
    seq_url = "http://seq-missing.invalid:5341"
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq_url, seq_api_key=SEQ_KEY)
    try:
        assert stream_text(claude(proxy), "ping") == "Echo: ping"
        body = wait_export_status(proxy, "failing")
        error = body["export_last_error"]
        assert error.startswith("connection failed (gaierror EAI_"), error
        assert "seq-missing" not in error and SEQ_KEY not in error
    finally:
        proxy.stop()


def test_slow_receiver_does_not_delay_clients(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Seq answering after 10 s changes neither the bytes nor the latency clients see."""
    fast_batches(monkeypatch, timeout="10")
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY)
    try:
        client = claude(proxy)

        def timed(n: int) -> float:
            started = time.perf_counter()
            assert stream_text(client, f"ping {n}") == f"Echo: ping {n}"
            return time.perf_counter() - started

        fast = [timed(n) for n in range(10)]
        seq.delay = 10.0
        timed(10)  # its telemetry goes out to the receiver, which now hangs
        deadline = time.monotonic() + 5
        while seq.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seq.waiting > 0  # an export hangs on the receiver from here on
        slow = [timed(n) for n in range(11, 31)]
        assert seq.waiting > 0  # and still does
        assert max(slow) < 1.0
        assert statistics.median(slow) < statistics.median(fast) + 0.1
        entries = local_entries(proxy)
        assert [e["type"] for e in entries].count("response") == 31
    finally:
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 10  # the hung export does not hold shutdown


def test_failing_receiver_is_counted_and_warned_once(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A Seq answering 503 loses telemetry, counted in /healthz and reported by one WARN line;
    proxying and the local record are unaffected and the Seq key is never logged."""
    fast_batches(monkeypatch)
    seq.status = 503
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY)
    try:
        client = claude(proxy)
        for n in range(3):
            assert stream_text(client, f"ping {n}") == f"Echo: ping {n}"
        body = wait_health(proxy, "otlp_export_failed")
        assert body["otlp_exported_logs"] == 0
        time.sleep(1.5)  # more failed batches
        for n in range(3, 6):
            assert stream_text(client, f"ping {n}") == f"Echo: ping {n}"
        wait_health(proxy, "otlp_export_failed")
        assert [e["type"] for e in local_entries(proxy)].count("response") == 6
        assert any(r.status == 503 for r in seq.requests)
    finally:
        proxy.stop()
    # The export runs in the recorder process: its log lines reach this process's stderr.
    stderr = capfd.readouterr().err
    warnings = [line for line in stderr.splitlines()
                if "otelproxy.otlp" in line and "losing telemetry" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0]
    assert SEQ_KEY not in stderr


def test_shutdown_flushes_pending_telemetry(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Telemetry still waiting for its batch is exported when the proxy stops."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "600000")
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY)
    try:
        client = claude(proxy)
        for n in range(3):
            stream_text(client, f"ping {n}")
        time.sleep(0.3)
        assert seq.spans() == [] and seq.logs() == []
    finally:
        proxy.stop()
    assert len([s for s in seq.spans() if s.kind == SERVER]) == 3
    assert len(seq.logs()) == 6


def test_exporting_sink_counters_on_healthz(
    exporting: RunningProxy, fake: FakeUpstream, seq: OtlpReceiver
) -> None:
    """/healthz reports what the OTLP sink exported, dropped and failed."""
    stream_text(claude(exporting), "hi")
    exported(exporting, seq, 1)
    body = healthz(exporting)
    assert body["otlp_exported_spans"] == 2  # SERVER + CLIENT
    assert body["otlp_exported_logs"] == 2
    assert body["otlp_dropped"] == 0 and body["otlp_export_failed"] == 0
    assert body["otlp_pending"] == 0
    assert body["status"] == "ok"
    assert body["export_status"] == "ok" and body["export_last_error"] is None


def wait_export_status(proxy: RunningProxy, status: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (body := healthz(proxy))["export_status"] != status:
        assert time.monotonic() < deadline, f"/healthz never showed export {status}: {body}"
        time.sleep(0.02)
    return body


def test_a_refusing_seq_shows_on_healthz_before_the_export_gives_up(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seq answering 503: /healthz is degraded with the error as soon as an attempt fails
    (the batch is still being retried, nothing counted failed yet), and ok again once an
    export goes through."""
    fast_batches(monkeypatch, timeout="10")
    seq.status = 503
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY)
    try:
        assert healthz(proxy)["export_status"] == "ok"
        stream_text(claude(proxy), "ping")
        body = wait_export_status(proxy, "failing")
        assert body["status"] == "degraded" and body["export_last_error"] == "HTTP 503"
        assert body["otlp_export_failed"] == 0  # still retrying: reported before it gives up
        seq.status = 200
        body = wait_export_status(proxy, "ok")
        assert body["status"] == "ok" and body["export_last_error"] == "HTTP 503"
        assert wait_health(proxy, "otlp_exported_logs")["otlp_export_failed"] == 0
    finally:
        proxy.stop()


def test_a_hanging_seq_shows_on_healthz_and_shutdown_stays_bounded_and_counted(
    fake: FakeUpstream, seq: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Seq not answering: /healthz is degraded while the export still waits; shutdown gives
    the export its --otlp-shutdown-timeout (not the grace period), counts everything not
    exported in the final counters and says so in one line."""
    fast_batches(monkeypatch, timeout="60")
    seq.delay = 60.0
    proxy = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key=SEQ_KEY,
                         grace_period=20, otlp_shutdown_timeout=1)
    stopped = False
    try:
        client = claude(proxy)
        for n in range(3):
            assert stream_text(client, f"ping {n}") == f"Echo: ping {n}"
        body = wait_export_status(proxy, "failing")
        assert seq.waiting > 0 and body["status"] == "degraded"
        assert body["export_last_error"].startswith("no answer for")
        assert body["otlp_export_failed"] == 0
        assert len(local_entries(proxy)) == 9  # 3 x (session start, request, response)
        started = time.monotonic()
        proxy.stop()
        stopped = True
        took = time.monotonic() - started
    finally:
        if not stopped:
            proxy.stop()
    assert took < 10  # the export had 1 s; before, shutdown waited out the 20 s grace period
    final = proxy.server.pipeline.counters()
    assert final["otlp_exported_spans"] == final["otlp_exported_logs"] == 0
    assert final["otlp_export_failed"] == 3 * 4  # SERVER + CLIENT span, 2 log records each
    assert final["otlp_pending"] == 0 and final["otlp_dropped"] == 0
    lines = [line for line in capfd.readouterr().err.splitlines()
             if "OTLP export stopped" in line]
    assert len(lines) == 1 and "6 span(s) and 6 log record(s) unsent" in lines[0], lines


# -- configuration -------------------------------------------------------------------------------


def make_config(**values: Any) -> config_module.Config:
    return config_module.build(values, list(config_module.DEFAULT_UPSTREAMS))


def test_nothing_configured_means_no_sink_and_no_threads() -> None:
    """Without --seq-url or OTEL_EXPORTER_OTLP_*, nothing is built or tried."""
    before = {t.name for t in threading.enumerate()}
    assert otlp.build_sink(make_config(), {}) is None
    assert otlp.build_sink(make_config(seq_api_key="k"), {}) is None
    assert otlp.build_sink(make_config(seq_url="http://seq:5341"),
                           {"OTEL_SDK_DISABLED": "true"}) is None
    assert {t.name for t in threading.enumerate()} <= before


def run_probe(*lines: str) -> subprocess.CompletedProcess[str]:
    """``lines`` run by a fresh interpreter (after ``import sys`` and ``from otelproxy import
    config, otlp``); it must succeed."""
    code = "\n".join(("import sys", "from otelproxy import config, otlp", *lines))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)


def test_resolving_settings_loads_neither_the_sdk_nor_the_exporter() -> None:
    """The proxy process resolves the OTLP settings (through the recorder) without importing
    the OpenTelemetry SDK or the exporter; building a sink loads them, and never `requests`."""
    done = run_probe(
        "from otelproxy import recorder",
        "cfg = config.build({'seq_url': 'http://seq:5341'}, list(config.DEFAULT_UPSTREAMS))",
        "assert otlp.resolve(cfg, {}) is not None",
        "heavy = ('requests', 'opentelemetry.sdk', 'otelproxy.otlp.export')",
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))",
        "sink = otlp.build_sink(cfg, {})",
        "assert sink is not None and sink.shutdown(1) is not None",
        "print(sorted(m for m in heavy if m in sys.modules))")
    before, after = done.stdout.splitlines()
    assert before == "[]", done.stdout
    assert after == "['opentelemetry.sdk', 'otelproxy.otlp.export']", done.stdout


@pytest.mark.parametrize("name", otlp.ENDPOINT_VARIABLES)
def test_each_endpoint_variable_alone_turns_export_on(name: str) -> None:
    """``otlp.resolve`` skips the settings module only when no endpoint can be configured:
    each variable of ``ENDPOINT_VARIABLES`` alone is an endpoint, and nothing else is."""
    assert otlp.resolve(make_config(), {name: "http://seq:5341"}) is not None
    assert otlp.resolve(make_config(), {name: "  "}) is None


def test_with_no_endpoint_the_proxy_process_does_not_import_the_settings() -> None:
    """Without --seq-url, --seq-api-key or an endpoint variable, other OTEL_* variables set
    (as the benchmark sets them), the proxy process does not import ``otlp.settings`` (it kept
    0.1 MiB resident for nothing); a Seq API key alone still gets its warning."""
    done = run_probe(
        "cfg = config.build({}, list(config.DEFAULT_UPSTREAMS))",
        "env = {'OTEL_SERVICE_NAME': 'x', 'OTEL_BSP_SCHEDULE_DELAY': '1000',",
        "       'OTEL_EXPORTER_OTLP_HEADERS': 'a=b'}",
        "assert otlp.resolve(cfg, env) is None",
        "print('otelproxy.otlp.settings' in sys.modules)",
        "keyed = config.build({'seq_api_key': 'k'}, list(config.DEFAULT_UPSTREAMS))",
        "assert otlp.resolve(keyed, {}) is None")
    assert done.stdout == "False\n"
    assert "no endpoint" in done.stderr


def test_seq_url_and_key_win_over_the_standard_environment() -> None:
    """--seq-url sets both endpoints under /ingest/otlp; --seq-api-key sets X-Seq-ApiKey."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
           "OTEL_EXPORTER_OTLP_HEADERS": "X-Seq-ApiKey=old,x-other=1"}
    settings = otlp.resolve(make_config(seq_url="http://seq:5341/", seq_api_key="new-key"), env)
    assert settings is not None
    assert settings.traces_endpoint == "http://seq:5341/ingest/otlp/v1/traces"
    assert settings.logs_endpoint == "http://seq:5341/ingest/otlp/v1/logs"
    assert dict(settings.logs_headers) == {"x-seq-apikey": "new-key", "x-other": "1"}
    assert "new-key" not in repr(settings)
    again = otlp.resolve(make_config(seq_url="http://seq:5341/ingest/otlp"), {})
    assert again is not None and again.traces_endpoint == "http://seq:5341/ingest/otlp/v1/traces"


def test_standard_otel_environment_is_honoured() -> None:
    """OTEL_EXPORTER_OTLP_* endpoints/headers, service name, resource and batch variables."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://seq:5341/ingest/otlp/",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://logs:9999/custom/logs",
        "OTEL_EXPORTER_OTLP_HEADERS": "X-Seq-ApiKey=abc%3D%3D",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_SERVICE_NAME": "my-proxy",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev,team=ai%20tools",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "250",
    }
    settings = otlp.resolve(make_config(), env)
    assert settings is not None
    assert settings.traces_endpoint == "http://seq:5341/ingest/otlp/v1/traces"
    assert settings.logs_endpoint == "http://logs:9999/custom/logs"
    assert dict(settings.traces_headers) == {"x-seq-apikey": "abc=="}
    assert settings.compression == "gzip"
    assert settings.resource["service.name"] == "my-proxy"
    assert settings.resource["deployment.environment"] == "dev"
    assert settings.resource["team"] == "ai tools"
    assert settings.spans.max_queue_size == 100
    assert settings.spans.max_export_batch_size == 100
    assert settings.logs.schedule_delay_ms == 250
    assert settings.logs.max_export_batch_size == 64
    assert otlp.resolve(make_config(), {}) is None
    only_logs = otlp.resolve(make_config(), {**env, "OTEL_TRACES_EXPORTER": "none"})
    assert only_logs is not None and only_logs.traces_endpoint is None
    default = otlp.resolve(make_config(seq_url="http://seq:5341"), {})
    assert default is not None and default.resource["service.name"] == "otelproxy"


@pytest.mark.parametrize("env", [
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://seq:5341", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "seq:5341"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://seq:5341", "OTEL_BSP_MAX_QUEUE_SIZE": "many"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://seq:5341", "OTEL_EXPORTER_OTLP_TIMEOUT": "-1"},
])
def test_invalid_otel_settings_are_one_line_config_errors(env: dict[str, str]) -> None:
    """A protocol other than http/protobuf or a malformed value is a ConfigError."""
    with pytest.raises(ConfigError) as raised:
        otlp.resolve(make_config(), env)
    assert "\n" not in str(raised.value)


def test_routes_are_low_cardinality() -> None:
    """Ids in a path become {id}; the API's own words stay."""
    assert mapping.route("/v1/messages") == "/v1/messages"
    assert mapping.route("/v1/messages/count_tokens") == "/v1/messages/count_tokens"
    assert mapping.route("/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results") == \
        "/v1/messages/batches/{id}/results"
    assert mapping.route("/v1/models/gpt-4o") == "/v1/models/{id}"
    assert mapping.route("/v1/responses/resp_67ccd2bed1ec8190") == "/v1/responses/{id}"
    assert mapping.route("/api/hello") == "/api/hello"


def test_receiver_refuses_what_seq_refuses(seq: OtlpReceiver) -> None:
    """The test receiver answers like Seq: 401 without the key, 415 for JSON, 404 elsewhere."""
    def post(path: str, content_type: str, key: str | None) -> int:
        headers = {"Content-Type": content_type, **({"X-Seq-ApiKey": key} if key else {})}
        request = urllib.request.Request(seq.url + path, data=b"", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    protobuf = "application/x-protobuf"
    assert post("/ingest/otlp/v1/logs", protobuf, SEQ_KEY) == 200
    assert post("/ingest/otlp/v1/traces", protobuf, SEQ_KEY) == 200
    assert post("/ingest/otlp/v1/logs", protobuf, None) == 401
    assert post("/ingest/otlp/v1/logs", protobuf, "wrong") == 401
    assert post("/ingest/otlp/v1/logs", "application/json", SEQ_KEY) == 415
    assert post("/v1/logs", protobuf, SEQ_KEY) == 404
