"""Secrets: obfuscated everywhere the proxy writes (record files, index, its own log), never in
what it forwards."""

from __future__ import annotations

import base64
import gzip
import itertools
import random
import secrets
import socket
import string
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from otelproxy.redact import (
    obfuscate,
    redact_body,
    redact_bytes,
    redact_headers,
    redact_pieces,
    redact_text,
)
from tests.conftest import RunningProxy
from tests.fake_upstream import FakeUpstream, Reply
from tests.otlp_receiver import OtlpReceiver
from tests.proxy_process import ProxyProcess

ALPHABET = string.ascii_letters + string.digits


def token(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


# -- the obfuscation rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("sk-ant-api03-" + "a" * 86 + "-AAAAWXYZ", "sk-ant-...WXYZ"),
        ("sk-ant-oat01-" + "b" * 80 + "WXYZ", "sk-ant-...WXYZ"),
        ("sk-proj-" + "c" * 100 + "WXYZ", "sk-proj-...WXYZ"),
        ("sk-" + "d" * 44 + "WXYZ", "sk-...WXYZ"),
        ("opaque-session-token-1234WXYZ", "...WXYZ"),
        ("short-secret", "..."),
        ("sk-ant-short", "sk-ant-..."),
    ],
    ids=["api03", "oat01", "proj", "plain", "unknown-shape", "short", "short-known-prefix"],
)
def test_a_secret_shows_its_prefix_and_last_four(secret: str, shown: str) -> None:
    """prefix + ... + last 4; values under 16 characters keep only the prefix."""
    assert obfuscate(secret) == shown


def test_secret_headers_are_obfuscated_whatever_they_hold() -> None:
    """Secret headers are always obfuscated (scheme kept); others only where a key shape appears."""
    key = "sk-ant-api03-" + token(60) + "WXYZ"
    headers = [
        ("X-Api-Key", key),
        ("Authorization", "Bearer sk-ant-oat01-" + token(60) + "OAUT"),
        ("authorization", "Basic " + base64.b64encode(b"user:" + token(20).encode()).decode()),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNzd29yZDEyMzQ="),
        ("Cookie", "session=" + token(30) + "COOK"),
        ("set-cookie", "sid=" + token(30) + "SETC; Path=/; HttpOnly"),
        ("x-forwarded-key", "token " + key),
        ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
        ("user-agent", "claude-cli/2.1.197 (external, sdk-cli)"),
    ]
    redacted = redact_headers(headers)
    assert [name for name, _ in redacted] == [name for name, _ in headers]
    values = [value for _, value in redacted]
    assert values[0] == "sk-ant-...WXYZ"
    assert values[1] == "Bearer sk-ant-...OAUT"
    assert values[2].startswith("Basic ...") and len(values[2]) == len("Basic ...") + 4
    assert values[3] == "Basic ...MzQ="
    assert values[4] == "...COOK"
    assert values[5] == "...Only"
    assert values[6] == "token sk-ant-...WXYZ"
    assert values[7:] == [headers[7][1], headers[8][1]]


def test_key_shapes_in_text_and_bytes_are_obfuscated_and_words_are_not() -> None:
    """Every sk-… key in text or bytes is obfuscated; words like task-…/disk-… are left alone."""
    api, oat = "sk-ant-api03-" + token(90) + "AP03", "sk-ant-oat01-" + token(90) + "OA01"
    proj, plain = "sk-proj-" + token(120) + "PROJ", "sk-" + token(48) + "PLAN"
    text = (f'{{"a": "{api}", "b": "use {oat}!", "c": ["{proj}"], "d": "key={plain}&x=1", '
            '"e": "task-0123456789abcdefghij disk-usage-report-generator-v2"}')
    redacted = redact_text(text)
    for secret in (api, oat, proj, plain):
        assert secret not in redacted
    assert orjson.loads(redacted) == {
        "a": "sk-ant-...AP03", "b": "use sk-ant-...OA01!", "c": ["sk-proj-...PROJ"],
        "d": "key=sk-...PLAN&x=1",
        "e": "task-0123456789abcdefghij disk-usage-report-generator-v2",
    }
    blob = b"\xff\xfe\x00" + api.encode() + b"\x80"
    assert redact_bytes(blob) == b"\xff\xfe\x00sk-ant-...AP03\x80"
    assert redact_text("no secrets here") == "no secrets here"


# -- end to end: nothing the proxy writes holds a full key -----------------------------------------


def _all_text_in(entries: list[dict[str, Any]]) -> str:
    """The record's text including base64 bodies decoded (a key must not hide in base64)."""
    parts = [orjson.dumps(entries).decode()]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_encoding") and value == "base64":
                    raw = node[key[: -len("_encoding")]]
                    parts.append(base64.b64decode(raw).decode("latin-1"))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(entries)
    return "\n".join(parts)


def test_no_full_key_reaches_the_record_or_the_log_but_all_reach_the_upstream(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Keys reach the upstream whole but never the JSONL, the SQLite files or the proxy's stderr."""
    ant = "sk-ant-api03-" + token(86) + "-AAAAWXYZ"
    oat = "sk-ant-oat01-" + token(86) + "OAUT"
    proj = "sk-proj-" + token(120) + "PROJ"
    plain = "sk-" + token(48) + "PLAN"
    cookie = token(40) + "COOK"
    set_cookie = token(40) + "SETC"
    proxy_auth = base64.b64encode(token(30).encode()).decode()
    keys = [ant, oat, proj, plain, cookie, set_cookie, proxy_auth]
    log_dir = tmp_path / "logs"
    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(log_dir),
                       "--log-level", "debug"]) as running:
        base = f"{running.url}/anthropic/{fake.host_port}"
        client = anthropic.Anthropic(base_url=base, api_key=ant, max_retries=0,
                                     default_headers={"x-api-key": ant})
        prompt = f"my keys are {oat} and {proj} and {plain}"
        message = client.messages.create(model="m", max_tokens=5,
                                         messages=[{"role": "user", "content": prompt}])
        assert oat in message.content[0].text  # the answer came back unredacted
        fake.replies.append(Reply(blocks=[{"type": "text", "text": f"stream {ant}"}], gzip=True,
                                  headers=[("set-cookie", f"sid={set_cookie}"),
                                           ("x-echo", f"key {proj}")]))
        with client.messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            assert stream.get_final_text() == f"stream {ant}"
        oclient = openai.OpenAI(base_url=f"{running.url}/openai/{fake.host_port}/v1",
                                api_key=proj, max_retries=0)
        chunks = oclient.chat.completions.create(
            model="g", stream=True, messages=[{"role": "user", "content": f"again {ant}"}])
        assert ant in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        answer = httpx2.post(
            f"{base}/v1/files?key={plain}&other=1", content=b"\xff\xfe" + oat.encode() + b"\x00",
            headers={"Cookie": f"session={cookie}", "Proxy-Authorization": f"Basic {proxy_auth}",
                     "authorization": f"Bearer {oat}", "x-custom": plain})
        assert answer.status_code == 404  # the fake has no /v1/files; the exchange is recorded
        refused = httpx2.post(f"{running.url}/anthropic/evil.example/v1/messages?k={plain}",
                              headers={"x-api-key": ant})
        assert refused.status_code == 403
    assert running.returncode == 0

    # forwarded unmodified
    first = fake.model_calls()[0]
    assert first.header("x-api-key") == ant and oat in first.body.decode()
    assert fake.model_calls()[2].header("authorization") == f"Bearer {proj}"
    files_call = fake.received[-1]
    assert files_call.query_string == f"key={plain}&other=1"
    assert files_call.body == b"\xff\xfe" + oat.encode() + b"\x00"
    assert files_call.header("cookie") == f"session={cookie}"
    assert files_call.header("x-custom") == plain

    # the record shows prefix...last4
    entries = [orjson.loads(line) for path in sorted(log_dir.rglob("*.jsonl"))
               for line in path.read_bytes().splitlines()]
    requests = [e for e in entries if e["type"] == "request"]
    first_entry = next(e for e in requests if "my keys are" in e["body"])
    assert first_entry["headers"]["x-api-key"] == "sk-ant-...WXYZ"
    assert "sk-ant-...OAUT" in first_entry["body"] and "sk-proj-...PROJ" in first_entry["body"]
    files_entry = next(e for e in requests if e["path"] == "/v1/files")
    assert files_entry["query"] == "key=sk-...PLAN&other=1"
    assert files_entry["headers"]["cookie"] == "...COOK"
    assert files_entry["headers"]["authorization"] == "Bearer sk-ant-...OAUT"
    assert files_entry["headers"]["x-custom"] == "sk-...PLAN"
    assert files_entry["headers"]["proxy-authorization"].startswith("Basic ...")
    assert base64.b64decode(files_entry["body"]) == b"\xff\xfesk-ant-...OAUT\x00"
    stream_response = next(e for e in entries if e["type"] == "response"
                           and e.get("content_encoding") == "gzip")
    assert stream_response["headers"]["set-cookie"] == "...SETC"
    assert stream_response["headers"]["x-echo"] == "key sk-proj-...PROJ"
    assert "sk-ant-...WXYZ" in "".join(c["raw"] for c in stream_response["chunks"])

    # and nowhere is a full key: every file's bytes (JSONL, sessions.db, -wal, -shm), the
    # record's decoded base64 bodies, the proxy's own log
    record_text = _all_text_in(entries)
    everything = b"".join(p.read_bytes() for p in log_dir.rglob("*") if p.is_file())
    for secret in keys:
        assert secret.encode() not in everything, secret[:12]
        assert secret not in record_text, secret[:12]
        assert secret not in running.stderr, secret[:12]
    assert any(p.name.startswith("sessions.db") for p in log_dir.iterdir())


# -- escaped keys, keys in pieces --------------------------------------------------------------


def _key(tail: str = "WXYZ") -> str:
    return "sk-ant-api03-" + token(60) + tail


def _json_escaped(text: str, every: int = 1) -> str:
    """``text`` with every ``every``-th character written as a JSON ``\\u00XX`` escape."""
    return "".join(f"\\u{ord(c):04x}" if i % every == 0 else c for i, c in enumerate(text))


@pytest.mark.parametrize(
    "written",
    [
        "\\u0073k-ant-api03-{body}",                       # the escaped first letter
        "{escaped_all}",                                   # every character escaped
        "{escaped_third}",                                 # every third one, any case of hex
        "line one\\nsk-ant-api03-{body}",                  # a key at the start of a JSON line
        "\\\\u0073k-ant-api03-{body}",                     # JSON text inside JSON text
        "quoted \\u0022sk-ant-api03-{body}\\u0022",
    ],
    ids=["escaped-s", "all-escaped", "every-third", "after-newline", "double-escaped",
         "after-escaped-quote"],
)
def test_json_escaped_keys_are_obfuscated_and_the_json_stays_valid(written: str) -> None:
    """A key written with JSON \\u escapes (anywhere in it) is obfuscated in the bytes; the
    result still parses, and decoded it shows the obfuscated key only."""
    key = _key()
    body = key.removeprefix("sk-ant-api03-")
    text = written.format(body=body, escaped_all=_json_escaped(key),
                          escaped_third=_json_escaped(key, 3))
    document = ('{"messages": [{"role": "user", "content": "' + text + '"}]}').encode()
    decoded_before = orjson.loads(document)["messages"][0]["content"]
    assert key in decoded_before.replace("\\u0073", "s")  # the test writes the key, really
    redacted = redact_bytes(document)
    content = orjson.loads(redacted)["messages"][0]["content"]
    assert key not in content and key not in redacted.decode()
    assert "sk-ant-...WXYZ" in content
    assert redact_text(document.decode()) == redacted.decode()


def test_percent_encoded_keys_in_paths_and_queries_are_obfuscated() -> None:
    """URL escapes (%2D, %73) inside or before a key do not hide it."""
    key = _key()
    encoded = key.replace("-", "%2D").replace("s", "%73", 1)
    assert redact_text(f"/v1/files/{encoded}/content") == "/v1/files/sk-ant-...WXYZ/content"
    assert redact_text(f"key%3D{key}&x=1") == "key%3Dsk-ant-...WXYZ&x=1"


def test_a_key_split_into_pieces_is_obfuscated_where_it_starts() -> None:
    """The pieces of a text are obfuscated together: the key's obfuscated form replaces its
    first piece's share, the other pieces lose theirs, and they still join to the text."""
    one, two = _key("AAAA"), "sk-proj-" + token(50) + "BBBB"
    text = f"first {one} then {two} end"
    cuts = [0, 8, 11, 30, 55, 70, 90, 100, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(cuts)]
    redacted = redact_pieces(pieces)
    assert redacted is not None and len(redacted) == len(pieces)
    assert "".join(redacted) == "first sk-ant-...AAAA then sk-proj-...BBBB end"
    assert redact_pieces(["no ", "key ", "here"]) is None


def _anthropic_events(pieces: list[str], tool_json: list[str]) -> bytes:
    """A Messages stream whose text arrives in ``pieces`` and whose tool input JSON arrives in
    ``tool_json`` fragments, one delta event each."""
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n".encode()

    message = {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-x",
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 1}}
    events = [event("message_start", {"type": "message_start", "message": message}),
              event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})]
    events += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": piece}})
               for piece in pieces]
    events += [event("content_block_stop", {"type": "content_block_stop", "index": 0}),
               event("content_block_start", {"type": "content_block_start", "index": 1,
                                             "content_block": {"type": "tool_use",
                                                               "id": "toolu_01", "name": "save",
                                                               "input": {}}})]
    events += [event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                             "delta": {"type": "input_json_delta",
                                                       "partial_json": fragment}})
               for fragment in tool_json]
    events += [event("content_block_stop", {"type": "content_block_stop", "index": 1}),
               event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "tool_use"},
                                       "usage": {"output_tokens": 40}}),
               event("message_stop", {"type": "message_stop"})]
    return b"".join(events)


def _chat_events(pieces: list[str]) -> bytes:
    """An OpenAI chat stream whose content arrives in ``pieces``."""
    chunks = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "gpt-x", "choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": None}]} for piece in pieces]
    chunks.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-x", "choices": [{"index": 0, "delta": {},
                                                  "finish_reason": "stop"}]})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _cut(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _sse_texts(entry: dict[str, Any], *path: str | int) -> str:
    """The pieces at ``path`` in a recorded stream's chunks, joined."""
    out = []
    for chunk in entry["chunks"]:
        data = "".join(line[5:].strip() for line in chunk["raw"].splitlines()
                       if line.startswith("data:"))
        if not data.startswith("{"):
            continue
        value: Any = orjson.loads(data)
        for step in path:
            value = value.get(step) if isinstance(value, dict) else (
                value[step] if isinstance(value, list) and len(value) > int(step) else None)
        if isinstance(value, str):
            out.append(value)
    return "".join(out)


def test_keys_a_stream_splits_across_events_never_reach_the_record_whole(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A key the model echoes in pieces (text deltas, tool input JSON fragments, OpenAI chat
    deltas) reaches the client whole, but the recorded chunks, the index's preview and the
    OTLP output message all carry the obfuscated key, and no file holds the key."""
    text_key, tool_key, chat_key = _key("TEXT"), _key("TOOL"), "sk-proj-" + token(60) + "CHAT"
    text = f"Your key is {text_key} - keep it safe."
    tool_json = '{"api_key": "' + _json_escaped(tool_key, 5) + '", "n": 1}'
    fake.replies.append(Reply(body=_anthropic_events(_cut(text, 5), _cut(tool_json, 7)),
                              headers=[("content-type", "text/event-stream")]))
    fake.replies.append(Reply(body=_chat_events(_cut(f"{chat_key} is yours", 3)),
                              headers=[("content-type", "text/event-stream")]))
    with OtlpReceiver(api_key="seq-key") as seq:
        running = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key="seq-key")
        try:
            client = anthropic.Anthropic(base_url=running.base(), api_key="sk-ant-x",
                                         max_retries=0)
            with client.messages.stream(model="claude-x", max_tokens=50,
                                        messages=[{"role": "user", "content": "key?"}]) as s:
                message = s.get_final_message()
            assert message.content[0].text == text  # forwarded untouched
            assert message.content[1].input == {"api_key": tool_key, "n": 1}
            oclient = openai.OpenAI(base_url=running.base("openai") + "/v1", api_key="sk-x",
                                    max_retries=0)
            chunks = oclient.chat.completions.create(
                model="gpt-x", stream=True, messages=[{"role": "user", "content": "key?"}])
            assert "".join(c.choices[0].delta.content or "" for c in chunks) \
                == f"{chat_key} is yours"
            entries = running.entries()
            with closing(running.db()) as conn:
                previews = [row[0] for row in conn.execute(
                    "SELECT assistant_preview FROM exchanges ORDER BY ts")]
            deadline = time.monotonic() + 20
            while len(seq.logs()) < 4:
                assert time.monotonic() < deadline, "the export did not arrive"
                time.sleep(0.05)
        finally:
            running.stop()
    responses = [e for e in entries if e["type"] == "response"]
    shown_text = "Your key is sk-ant-...TEXT - keep it safe."
    assert _sse_texts(responses[0], "delta", "text") == shown_text
    assert orjson.loads(_sse_texts(responses[0], "delta", "partial_json")) == {
        "api_key": "sk-ant-...TOOL", "n": 1}
    assert _sse_texts(responses[1], "choices", 0, "delta", "content") == "sk-proj-...CHAT is yours"
    assert previews == [shown_text, "sk-proj-...CHAT is yours"]
    outputs = [orjson.loads(log.attributes["gen_ai.output.messages"]) for log in seq.logs()
               if "gen_ai.output.messages" in log.attributes]
    assert outputs[0][0]["content"][0]["text"] == shown_text
    assert outputs[0][0]["content"][1]["input"] == {"api_key": "sk-ant-...TOOL", "n": 1}
    assert outputs[1][0]["content"] == "sk-proj-...CHAT is yours"
    everything = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("*") if p.is_file())
    exported = repr([log.attributes for log in seq.logs()] + [s.attributes for s in seq.spans()])
    for key in (text_key, tool_key, chat_key):
        assert key.encode() not in everything and key not in exported
        assert key[-30:].encode() not in everything  # no piece of it beyond the last 4 either


def test_escaped_keys_in_requests_and_keys_in_paths_are_obfuscated_everywhere(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A JSON-escaped key in a request body, and a key (plain or %-encoded) in the URL path,
    reach the upstream as sent but the JSONL, the index (preview, path) and OTLP (input
    messages, url.path, url.full, the record bodies) show them obfuscated."""
    body_key, path_key, encoded_key = _key("BODY"), _key("PATH"), _key("PCNT")
    escaped = _json_escaped(body_key, 4)
    raw = ('{"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": '
           f'"my key is {escaped}"}}]}}').encode()
    with OtlpReceiver(api_key="seq-key") as seq:
        running = RunningProxy(fake, tmp_path / "logs", seq_url=seq.url, seq_api_key="seq-key")
        try:
            answer = httpx2.post(f"{running.base()}/v1/messages", content=raw,
                                 headers={"content-type": "application/json"})
            assert answer.status_code == 200
            for path in (f"/v1/files/{path_key}",
                         "/v1/files/" + encoded_key.replace("-", "%2D")):
                assert httpx2.get(running.base() + path).status_code == 404
            refused = httpx2.get(f"{running.url}/anthropic/{path_key}/v1/models")
            assert refused.status_code == 403
            entries = running.entries() + running.entries("rejected-*.jsonl")
            with closing(running.db()) as conn:
                rows = [dict(r) for r in conn.execute(
                    "SELECT path, user_preview FROM exchanges ORDER BY ts")]
            deadline = time.monotonic() + 20
            while len(seq.logs()) < 8:
                assert time.monotonic() < deadline, "the export did not arrive"
                time.sleep(0.05)
        finally:
            running.stop()
    assert fake.received[0].body == raw  # forwarded as sent
    assert fake.received[1].path == f"/v1/files/{path_key}"
    request = next(e for e in entries if e["type"] == "request" and e["path"] == "/v1/messages")
    assert orjson.loads(request["body"])["messages"][0]["content"] == "my key is sk-ant-...BODY"
    assert rows[0]["user_preview"] == "my key is sk-ant-...BODY"
    assert [r["path"] for r in rows[1:]] == ["/v1/files/sk-ant-...PATH",
                                            "/v1/files/sk-ant-...PCNT"]
    assert [e["path"] for e in entries if e["type"] == "rejected"] == [
        "/anthropic/sk-ant-...PATH/v1/models"]
    new = [orjson.loads(log.attributes["gen_ai.input.messages.new"]) for log in seq.logs()
           if "gen_ai.input.messages.new" in log.attributes]
    assert new == [[{"role": "user", "content": "my key is sk-ant-...BODY"}]]
    paths = sorted({s.attributes["url.path"] for s in seq.spans() if "url.path" in s.attributes})
    assert paths == ["/anthropic/sk-ant-...PATH/v1/models", "/v1/files/sk-ant-...PATH",
                     "/v1/files/sk-ant-...PCNT", "/v1/messages"]
    everything = b"".join(p.read_bytes() for p in (tmp_path / "logs").rglob("*") if p.is_file())
    exported = repr([(log.body, log.attributes) for log in seq.logs()]
                    + [s.attributes for s in seq.spans()])
    for key in (body_key, path_key, encoded_key):
        assert key.encode() not in everything and key not in exported
    assert escaped.encode() not in everything and escaped not in exported


def test_a_malformed_header_carrying_a_key_is_not_logged_whole(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """aiohttp logs a malformed request with its header line; the proxy's stderr never shows
    the key (the HTTP server's log drops the quoted line, and every log line of the proxy goes
    through the redacting filter)."""
    key = _key()
    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(tmp_path / "logs")]) as running:
        for request in (f"GET /x HTTP/1.1\r\nHost: a\r\nx-api-key: {key}\x00\r\n\r\n",
                        f"GET /{key} HTTP/1.1 junk\r\nHost: a\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", running.port), timeout=5) as conn:
                conn.sendall(request.encode())
                assert conn.recv(100).startswith(b"HTTP/1.0 400")
        deadline = time.monotonic() + 10
        while running.stderr.count("Error handling request") < 2:
            assert time.monotonic() < deadline, running.stderr
            time.sleep(0.05)
    assert key not in running.stderr and key[13:40] not in running.stderr


def test_compressed_request_bodies_are_recorded_decoded_and_obfuscated(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A gzip request body is forwarded as sent and recorded decoded with its key obfuscated
    (compressed, the key would be one gunzip away); one that does not decode is not recorded,
    with a note; a key used as a header name is obfuscated too."""
    key, other = _key("GZIP"), _key("BADZ")
    body = orjson.dumps({"model": "claude-x", "max_tokens": 5,
                         "messages": [{"role": "user", "content": f"key {key}"}]})
    packed = gzip.compress(body)
    sent = httpx2.post(f"{proxy.base()}/v1/messages", content=packed,
                       headers={"content-type": "application/json", "content-encoding": "gzip",
                                other: "header named by a key"})
    assert sent.status_code == 200  # the fake inflated what it got: the gzip bytes as sent
    assert fake.received[0].body == body and fake.received[0].header("content-encoding") == "gzip"
    broken = gzip.compress(b"prefix " + other.encode())[:-12]
    httpx2.post(f"{proxy.base()}/v1/files", content=broken,
                headers={"content-encoding": "gzip"})
    entries = proxy.entries()
    first, second = [e for e in entries if e["type"] == "request"]
    assert first["content_encoding"] == "gzip" and first["size"] == len(packed)
    assert orjson.loads(first["body"])["messages"][0]["content"] == "key sk-ant-...GZIP"
    assert first["headers"]["sk-ant-...badz"] == "header named by a key"
    assert second["body"] == "" and "content_encoding" not in second
    [response] = [e for e in entries if e["type"] == "response" and e["exchange_id"]
                  == second["exchange_id"]]
    assert any("request body not recorded" in note for note in response["notes"])
    everything = b"".join(p.read_bytes() for p in proxy.log_dir.rglob("*") if p.is_file())
    for secret in (key, other, key.lower(), other.lower()):
        assert secret.encode() not in everything
    assert packed not in everything and base64.b64encode(packed) not in everything


def test_a_conversation_echoing_a_split_key_stays_one_session(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """The assistant turn is fingerprinted obfuscated and the client's next request (holding
    the key whole) is obfuscated the same way, so the conversation continues its session."""
    key = _key("ECHO")
    text = f"Your key is {key} - keep it safe."
    tool_json = '{"k": "' + key + '"}'
    fake.replies.append(Reply(body=_anthropic_events(_cut(text, 4), _cut(tool_json, 5)),
                              headers=[("content-type", "text/event-stream")]))
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    first = [{"role": "user", "content": "what is my key?"}]
    with client.messages.stream(model="claude-x", max_tokens=50, messages=first) as stream:
        answer = stream.get_final_message()
    assert answer.content[1].input == {"k": key}
    tool_result = [{"type": "tool_result", "tool_use_id": answer.content[1].id, "content": "ok"}]
    replayed = [block.model_dump() for block in answer.content]
    client.messages.create(
        model="claude-x", max_tokens=50,
        messages=[*first, {"role": "assistant", "content": replayed},
                  {"role": "user", "content": tool_result}])
    with closing(proxy.db()) as conn:
        turns = [tuple(row) for row in conn.execute(
            "SELECT session_id, seq FROM exchanges ORDER BY ts")]
    assert len(turns) == 2 and turns[0][0] == turns[1][0] and [t[1] for t in turns] == [1, 2]


# -- a body redacted from the previous one of its conversation ---------------------------------

_TRICKY = [b"s", b"k", b"-", b"sk-", b"sk-ant-", b"\\", b"\\\\", b"\\u00", b"\\u0073", b"%",
           b"%73", b"%2D", b"73", b"6b", b"2d", b"u", b"a", b"Z9", b"_", b'"', b" ", b"\\n",
           b"\\u0022", b":", b",", b"x" * 9, b"0123456789abcdef", b"\xc3\xa9"]


def _noise(rng: random.Random, n: int) -> bytes:
    return b"".join(rng.choice(_TRICKY) for _ in range(n))


def _edited(rng: random.Random, body: bytes) -> bytes:
    """The next body of a conversation: grown at the end, edited somewhere, cut, or grown in
    the middle (a key may straddle where the two bodies stop being the same)."""
    choice = rng.random()
    at = rng.randint(0, len(body))
    if choice < 0.4:
        return body + _noise(rng, rng.randint(1, 30))
    if choice < 0.6:
        return body[:at] + _noise(rng, rng.randint(0, 10)) + body[at + rng.randint(0, 5):]
    if choice < 0.7:
        return body[:at]
    return body[:at] + _noise(rng, rng.randint(1, 30)) + body[at:]


@pytest.mark.parametrize("seed", range(8))
def test_a_body_redacted_from_the_previous_one_is_the_whole_redaction(seed: int) -> None:
    """``redact_body`` from the previous body gives the bytes ``redact_bytes`` gives whole, over
    random histories of growth, edits, cuts and key-shaped bytes at every boundary."""
    rng = random.Random(seed)
    body = _noise(rng, 40)
    previous = redact_body(body)
    assert previous.redacted == redact_bytes(body)
    for _ in range(400):
        body = _edited(rng, body)
        previous = redact_body(body, previous)
        assert previous.redacted == redact_bytes(body), body


def test_a_key_straddling_the_shared_prefix_is_redacted() -> None:
    """A key whose first half the previous body ended with and whose rest this body adds is
    found whole: obfuscated, never left half-redacted."""
    key = "sk-ant-api03-" + "Q" * 40 + "WXYZ"
    before = b'{"messages":[{"role":"user","content":"here: ' + key[:20].encode() + b'"}]}'
    after = b'{"messages":[{"role":"user","content":"here: ' + key.encode() + b'"}]}'
    previous = redact_body(before)
    redacted = redact_body(after, previous).redacted
    assert key.encode() not in redacted and key[13:30].encode() not in redacted
    assert b"sk-ant-...WXYZ" in redacted
    assert redacted == redact_bytes(after)


@pytest.mark.parametrize("written", [
    "\\u0073k-ant-api03-" + "R" * 30 + "WXYZ",
    "s\\\\u006b-ant-api03-" + "R" * 30 + "WXYZ",
    "sk-ant-api03-" + "R" * 20 + "\\u0052" * 10 + "WXYZ",
])
def test_a_json_escaped_key_straddling_the_shared_prefix_is_redacted(written: str) -> None:
    """A JSON-escaped key cut by the end of what two bodies share, at every cut point, is
    obfuscated as the whole body's redaction does, and the JSON stays valid."""
    head = b'{"messages":[{"role":"user","content":"a\\n'
    for cut in range(1, len(written)):
        previous = redact_body(head + written[:cut].encode() + b'"}]}')
        body = head + written.encode() + b' and more"}]}'
        redacted = redact_body(body, previous).redacted
        assert redacted == redact_bytes(body)
        assert b"...WXYZ" in redacted
        orjson.loads(redacted)
