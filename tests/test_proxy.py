"""The proxy handler: byte-exact forwarding, unmodified answers, streaming, and how exchanges end.

Real loopback servers only: ``FakeUpstream`` (the provider protocols), ``RawUpstream`` (exact
bytes on the wire), and the official SDKs, aiohttp or raw sockets as clients.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
import zlib
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import orjson
import pytest

from tests.conftest import RunningProxy
from tests.fake_upstream import FakeUpstream, Reply, anthropic_sse
from tests.raw_upstream import RawUpstream, Slow, closed_port, parse_response, roundtrip

MiB = 1024 * 1024
ANTHROPIC_KEY = "sk-ant-api03-" + "k" * 80 + "WXYZ"
OPENAI_KEY = "sk-proj-" + "p" * 60 + "ABCD"
WORDS = "alpha beta gamma delta epsilon zeta eta theta"


def anthropic_client(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.base("anthropic"), api_key=ANTHROPIC_KEY,
                               max_retries=0)


def openai_client(proxy: RunningProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base("openai") + "/v1", api_key=OPENAI_KEY, max_retries=0)


def responses(proxy: RunningProxy) -> list[dict[str, Any]]:
    """Every response entry in the record, oldest first."""
    return sorted((e for e in proxy.entries() if e["type"] == "response"), key=lambda e: e["ts"])


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


USER = [{"role": "user", "content": "hello"}]


# -- transparency: the request -------------------------------------------------------------------


ODD_TARGET = (
    "/v1/a%2Fb/%7e%7E/%zz//x;param=1/%E2%82%AC%20+"
    "?q=a%20b+c&slash=%2F&&empty=&euro=%E2%82%AC&bad=%zz&plus=%2B+&sp=%20&semi=a;b&dup=1&dup=2"
)


def test_request_body_and_query_reach_the_upstream_byte_for_byte(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """The request target (odd percent-encoding included) and body bytes arrive unchanged."""
    body = bytes(range(256)) * 3 + b'{"json": "\\u00e9"}\r\n\x00'
    request = (
        f"POST /anthropic/{raw_upstream.host_port}{ODD_TARGET} HTTP/1.1\r\n"
        f"Host: proxy\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = parse_response(roundtrip(raw_proxy.server.port, request))
    assert answer.status == 200
    [got] = raw_upstream.requests
    assert got.request_line == f"POST {ODD_TARGET} HTTP/1.1"
    assert got.body == body


def test_chunked_request_body_arrives_whole(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A chunked upload reaches the upstream with the same bytes (re-framed, not altered)."""
    parts = [b"x" * 5000, b"\xff\xfe\x00", b"end"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    request = (
        f"POST /openai/{raw_upstream.host_port}/v1/chat/completions HTTP/1.1\r\n"
        "Host: proxy\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + framed
    assert parse_response(roundtrip(raw_proxy.server.port, request)).status == 200
    [got] = raw_upstream.requests
    assert got.body == b"".join(parts)
    assert got.values("transfer-encoding") in ([], ["chunked"])


def test_hop_by_hop_headers_are_dropped_and_everything_else_passes(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """Hop-by-hop and Connection-named headers are dropped, Host rewritten, the rest kept as is."""
    end_to_end = [
        ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
        ("anthropic-version", "2023-06-01"),
        ("x-api-key", ANTHROPIC_KEY),
        ("Authorization", "Bearer sk-ant-oat01-" + "o" * 70 + "QRST"),
        ("X-Dup", "one"),
        ("x-dup", "two"),
        ("X-Custom-Case", "Value  With   Spaces"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("Content-Type", "application/json"),
    ]
    hop_by_hop = [
        ("Connection", "keep-alive, X-Named-Hop"),
        ("X-Named-Hop", "gone"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNzd29yZA=="),
        ("Proxy-Authenticate", "Basic realm=x"),
    ]
    body = b'{"model": "m"}'
    lines = [("Host", "proxy.invalid:1234"), *hop_by_hop[:4], *end_to_end, *hop_by_hop[4:]]
    head = "".join(f"{k}: {v}\r\n" for k, v in lines)
    request = (
        f"POST /anthropic/{raw_upstream.host_port}/v1/messages?beta=true HTTP/1.1\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", raw_proxy.server.port), timeout=10) as conn:
        conn.sendall(request)
        assert raw_upstream.received.wait(10)
    [got] = raw_upstream.requests
    assert got.values("host") == [raw_upstream.host_port]
    assert got.values("content-length") == [str(len(body))]
    rest = [(k, v) for k, v in got.headers if k.lower() not in ("host", "content-length")]
    assert [(k.lower(), v) for k, v in rest] == [(k.lower(), v) for k, v in end_to_end]
    # Names keep their spelling; a repeat is spelled like its first occurrence.
    assert [k for k, _ in rest] == [k if k != "x-dup" else "X-Dup" for k, _ in end_to_end]


def test_upgrade_header_is_not_forwarded(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """Upgrade is hop-by-hop: a plain request carrying it is forwarded without it."""
    request = (
        f"GET /openai/{raw_upstream.host_port}/v1/models HTTP/1.1\r\n"
        "Host: proxy\r\nUpgrade: h2c\r\nX-Keep: yes\r\nConnection: close\r\n\r\n"
    ).encode()
    assert parse_response(roundtrip(raw_proxy.server.port, request)).status == 200
    [got] = raw_upstream.requests
    assert got.values("upgrade") == [] and got.values("x-keep") == ["yes"]


@pytest.mark.parametrize(
    ("method", "body"), [("GET", b""), ("POST", b"{}"), ("HEAD", b"")], ids=str
)
def test_proxy_adds_no_headers_upstream(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream, method: str, body: bytes
) -> None:
    """A client sending only Host gets only Host (+Content-Length) upstream: no aiohttp defaults."""
    framing = f"Content-Length: {len(body)}\r\n" if body else ""
    request = (
        f"{method} /anthropic/{raw_upstream.host_port}/v1/messages HTTP/1.1\r\n"
        f"Host: proxy\r\n{framing}Connection: close\r\n\r\n"
    ).encode() + body
    roundtrip(raw_proxy.server.port, request)
    [got] = raw_upstream.requests
    names = sorted(k.lower() for k, _ in got.headers)
    assert names == (["content-length", "host"] if body else ["host"])
    assert got.body == body


def test_sdk_request_arrives_with_its_own_headers(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """The anthropic SDK's headers reach the upstream as sent; the record matches, key redacted."""
    client = anthropic_client(proxy)
    client.messages.create(model="claude-x", max_tokens=5, messages=USER,
                           extra_headers={"anthropic-beta": "b1,b2"})
    [call] = fake.model_calls()
    auth = call.header("x-api-key") or call.header("authorization")
    assert auth in (ANTHROPIC_KEY, f"Bearer {ANTHROPIC_KEY}")
    assert call.header("anthropic-version") == client.default_headers["anthropic-version"]
    assert call.header("anthropic-beta") == "b1,b2"
    assert (call.header("user-agent") or "").startswith("Anthropic/Python")
    assert call.header("host") == fake.host_port
    [request] = [e for e in proxy.entries() if e["type"] == "request"]
    recorded = request["headers"]
    for name, value in call.headers:
        lower = name.lower()
        if lower in ("host", "content-length", "connection"):
            continue
        expected = value.replace(ANTHROPIC_KEY, "sk-ant-...WXYZ")
        assert recorded[lower] == expected, lower


def test_non_utf8_header_bytes_are_forwarded_exactly_and_recorded_escaped(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A latin-1 byte in a request or response header value crosses the proxy byte for byte,
    and the exchange is still recorded (JSONL and DB), the byte written as \\xNN."""
    answer_head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"X-Answer: na\xefve \xe2\x82\xac\r\nContent-Length: 2\r\n"
                   b"Connection: close\r\n\r\n{}")
    raw_upstream.respond(answer_head)
    request = (
        f"POST /anthropic/{raw_upstream.host_port}/v1/messages/count_tokens HTTP/1.1\r\n"
        "Host: proxy\r\nContent-Length: 2\r\nConnection: close\r\n"
    ).encode() + b"X-Note: caf\xe9 \xe2\x82\xac\r\nX-Claude-Code-Session-Id: s\xe9\r\n\r\n{}"
    raw = roundtrip(raw_proxy.server.port, request)
    assert b"\r\nX-Answer: na\xefve \xe2\x82\xac\r\n" in raw
    assert parse_response(raw).status == 200
    [got] = raw_upstream.requests
    assert b"\r\nX-Note: caf\xe9 \xe2\x82\xac\r\n" in got.head + b"\r\n"
    assert b"\r\nX-Claude-Code-Session-Id: s\xe9\r\n" in got.head + b"\r\n"
    request_entry, response_entry = raw_proxy.entries()
    assert request_entry["headers"]["x-note"] == "caf\\xe9 \u20ac"
    assert request_entry["headers"]["x-claude-code-session-id"] == "s\\xe9"
    assert response_entry["headers"]["x-answer"] == "na\\xefve \u20ac"
    assert response_entry["outcome"] == "complete"
    with raw_proxy.db() as conn:
        [row] = conn.execute("SELECT outcome FROM exchanges").fetchall()
    assert row["outcome"] == "complete"


# -- request size limit ----------------------------------------------------------------------


def _messages_body(size: int) -> bytes:
    head, tail = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"', b'"}]}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def test_request_of_exactly_32_mib_is_forwarded(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """A 32 MiB request body (the API's own limit) passes the proxy whole, and reaches the
    record whole: 32 times the recorder pipe's buffer, so the proxy's loop drains it in parts."""
    body = _messages_body(32 * MiB)
    answer = httpx2.post(proxy.base() + "/v1/messages", content=body,
                         headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 200
    [call] = fake.model_calls()
    assert len(call.body) == 32 * MiB and call.body == body
    proxy.flush()
    [request] = [e for e in proxy.entries() if e["type"] == "request"]
    assert request["size"] == 32 * MiB and request["body"].encode() == body


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_request_over_32_mib_is_413_in_the_provider_shape(
    proxy: RunningProxy, fake: FakeUpstream, provider: str
) -> None:
    """32 MiB + 1 byte → 413 with the provider's error JSON; nothing reaches the upstream."""
    path = "/v1/messages" if provider == "anthropic" else "/v1/chat/completions"
    answer = httpx2.post(proxy.base(provider) + path, content=_messages_body(32 * MiB + 1),
                         timeout=60)
    assert answer.status_code == 413
    error = answer.json()
    if provider == "anthropic":
        assert error["type"] == "error" and error["error"]["type"] == "request_too_large"
        assert "33554432" in error["error"]["message"]
    else:
        assert set(error["error"]) >= {"message", "type", "code"}
        assert "33554432" in error["error"]["message"]
    assert fake.received == []
    [rejected] = proxy.entries("rejected-*.jsonl")
    assert rejected["status"] == 413


def test_request_limit_is_configurable_and_counts_chunked_bodies(
    make_proxy: Any, raw_upstream: RawUpstream
) -> None:
    """With max_request_bytes=4096 a 4096-byte chunked body passes and 4097 bytes get 413."""
    running = make_proxy(raw_upstream, max_request_bytes=4096)

    def send(size: int) -> int:
        payload = b"z" * size
        request = (
            f"POST /openai/{raw_upstream.host_port}/v1/chat/completions HTTP/1.1\r\n"
            "Host: p\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (size, payload)
        return parse_response(roundtrip(running.server.port, request)).status

    assert send(4096) == 200
    assert send(4097) == 413
    assert [len(r.body) for r in raw_upstream.requests] == [4096]


# -- transparency: the response ------------------------------------------------------------------


def test_response_status_headers_and_body_come_back_unmodified(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """Status line, end-to-end headers and body bytes come back as sent; no Date/Server added."""
    body = b"\x00\xffnot json at all\r\n"
    upstream_headers = [
        ("X-Request-Id", "req_123"), ("set-cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("retry-after", "7"), ("anthropic-ratelimit-requests-remaining", "0"),
        ("Content-Length", str(len(body))),
    ]
    head = "".join(f"{k}: {v}\r\n" for k, v in upstream_headers)
    raw_upstream.respond(
        f"HTTP/1.1 418 I Am A Teapot\r\n{head}Connection: close, X-Hop\r\nX-Hop: 1\r\n"
        "Keep-Alive: timeout=1\r\nProxy-Authenticate: Basic\r\n\r\n".encode() + body
    )
    request = (
        f"GET /anthropic/{raw_upstream.host_port}/v1/models HTTP/1.1\r\n"
        "Host: p\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = parse_response(roundtrip(raw_proxy.server.port, request))
    assert answer.status_line == "HTTP/1.1 418 I Am A Teapot"
    assert answer.body == body
    relayed = [(k, v) for k, v in answer.headers if k.lower() != "connection"]
    assert relayed == upstream_headers


def test_upstream_4xx_and_5xx_are_passed_through_once_without_retry(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A 429 and a 529 from the upstream reach the SDK as they were; each was sent once."""
    fake.replies.extend([
        Reply(status=429, headers=[("retry-after", "0")]),
        Reply(status=529),
    ])
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="m", max_tokens=5, messages=USER)
    assert limited.value.response.headers["retry-after"] == "0"
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        client.messages.create(model="m", max_tokens=5, messages=USER)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert len(fake.model_calls()) == 2
    assert [e["status"] for e in responses(proxy)] == [429, 529]
    assert all(e["outcome"] == "complete" for e in responses(proxy))


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_upstream_hanging_up_before_answering_is_502_and_not_retried(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream, method: str
) -> None:
    """An upstream that closes without answering gets the request once; the client gets 502."""
    raw_upstream.respond(b"", b"")
    answer = httpx2.request(method, raw_proxy.base() + "/v1/models",
                            content=b"{}" if method == "POST" else None)
    assert answer.status_code == 502
    assert len(raw_upstream.requests) == 1
    [response] = responses(raw_proxy)
    assert response["outcome"] == "upstream_error"


def test_redirect_is_relayed_not_followed(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A 302 from the upstream goes back to the client with its Location; nothing follows it."""
    raw_upstream.respond(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/elsewhere\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    answer = httpx2.get(raw_proxy.base() + "/v1/models", follow_redirects=False)
    assert answer.status_code == 302
    assert answer.headers["location"] == "http://127.0.0.1:9/elsewhere"
    assert len(raw_upstream.requests) == 1 and raw_upstream.connections == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_gzip_response_stays_gzip_and_the_record_holds_the_decoded_copy(
    proxy: RunningProxy, fake: FakeUpstream, stream: bool
) -> None:
    """content-encoding: gzip is relayed compressed, byte for byte; the record is decoded."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS}], gzip=True))

    async def fetch() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
            proxy.base() + "/v1/messages",
            json={"model": "m", "max_tokens": 5, "messages": USER, "stream": stream},
            headers={"accept-encoding": "gzip"},
        ) as answer:
            return answer.status, dict(answer.headers), await answer.read()

    status, headers, wire = run_async(fetch())
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert wire[:2] == b"\x1f\x8b"
    decoded = zlib.decompress(wire, wbits=47)
    [response] = responses(proxy)
    assert response["size"] == len(wire)
    assert response["content_encoding"] == "gzip"
    if stream:
        assert decoded.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
        assert "".join(c["raw"] for c in response["chunks"]).encode() == decoded
    else:
        assert orjson.loads(decoded)["content"][0]["text"] == WORDS
        assert response["body"].encode() == decoded


# -- streaming -------------------------------------------------------------------------------


def test_each_stream_chunk_reaches_the_client_as_soon_as_it_arrives(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """With 0.2 s between events the SDK sees the first event long before the last is sent."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "one two"}], event_delay=0.2))
    client = anthropic_client(proxy)
    started = time.monotonic()
    with client.messages.stream(model="m", max_tokens=5, messages=USER) as stream:
        arrivals = [(time.monotonic() - started, event.type) for event in stream]
    first, last = arrivals[0][0], arrivals[-1][0]
    assert arrivals[0][1] == "message_start"
    # 7 events with 0.2 s pauses: the last is sent ~1.2 s in; buffering would bunch them.
    assert last >= 1.0
    assert first < 0.5 and last - first >= 1.0


def test_gzip_stream_is_relayed_chunk_by_chunk(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """A gzip SSE stream is not held back: each compressed event reaches the client on time."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "one two"}], event_delay=0.2,
                              gzip=True))

    async def fetch() -> list[tuple[float, bytes]]:
        seen: list[tuple[float, bytes]] = []
        decoder = zlib.decompressobj(wbits=47)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            started = time.monotonic()
            async with session.post(
                proxy.base() + "/v1/messages",
                json={"model": "m", "max_tokens": 5, "messages": USER, "stream": True},
            ) as answer:
                async for data in answer.content.iter_any():
                    seen.append((time.monotonic() - started, decoder.decompress(data)))
        return seen

    seen = run_async(fetch())
    first_event = next(t for t, text in seen if b"message_start" in text)
    last_event = next(t for t, text in seen if b"message_stop" in text)
    assert first_event < 0.5 and last_event - first_event >= 1.0


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_unreachable_upstream_gives_502_in_the_provider_shape(
    make_proxy: Any, provider: str
) -> None:
    """Nothing listening upstream → 502 JSON the SDK understands; record says upstream_error."""
    running = make_proxy(closed_port())
    if provider == "anthropic":
        client = anthropic_client(running)
        with pytest.raises(anthropic.InternalServerError) as raised:
            client.messages.create(model="m", max_tokens=5, messages=USER)
        assert raised.value.status_code == 502
        body = raised.value.body
        assert body["type"] == "error" and body["error"]["type"] == "api_error"  # type: ignore
        assert "cannot connect" in body["error"]["message"]  # type: ignore[index]
    else:
        oclient = openai_client(running)
        with pytest.raises(openai.InternalServerError) as oraised:
            oclient.chat.completions.create(model="g", messages=USER)  # type: ignore[arg-type]
        assert oraised.value.status_code == 502
        error = oraised.value.body
        assert isinstance(error, dict) and "cannot connect" in error["message"]
        assert set(error) >= {"message", "type", "code"}
    [response] = responses(running)
    assert response["status"] == 502 and response["outcome"] == "upstream_error"
    assert response["generated_by_proxy"] is True


def test_upstream_reset_mid_stream_breaks_the_sdk_stream(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """An upstream reset mid-stream makes the SDK raise; record: upstream_aborted, events so far."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS}], drop_after_events=4))
    client = anthropic_client(proxy)
    seen: list[str] = []
    # The SDK lets httpx's protocol error through (or wraps it as a connection error).
    broken = (httpx2.RemoteProtocolError, anthropic.APIConnectionError)
    with pytest.raises(broken), client.messages.stream(
        model="m", max_tokens=5, messages=USER
    ) as stream:
        seen.extend(event.type for event in stream)
    assert "message_stop" not in seen
    [response] = responses(proxy)
    assert response["outcome"] == "upstream_aborted"
    expected = anthropic_sse(Reply(blocks=[{"type": "text", "text": WORDS}]), "m")[:4]
    assert [c["raw"].split("\n")[0] for c in response["chunks"]] == [
        e.decode().split("\n")[0] for e in expected
    ]


def test_upstream_reset_mid_stream_leaves_the_chunked_body_unterminated(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """Byte level: after an upstream reset the client's chunked body has no final 0-chunk."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS}], drop_after_events=3))
    body = orjson.dumps({"model": "g", "messages": USER, "stream": True})
    request = (
        f"POST /openai/{fake.host_port}/v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    answer = parse_response(roundtrip(proxy.server.port, request))
    assert answer.status == 200 and answer.values("transfer-encoding") == ["chunked"]
    assert not answer.complete
    assert answer.body.count(b"data: ") == 3 and b"[DONE]" not in answer.body
    [response] = responses(proxy)
    assert response["outcome"] == "upstream_aborted" and len(response["chunks"]) == 3


def test_openai_sdk_stream_raises_when_the_upstream_resets(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """The openai SDK's stream raises APIConnectionError when the upstream resets mid-stream."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS}], drop_after_events=3))
    client = openai_client(proxy)
    chunks = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="g", messages=USER,  # type: ignore
                                                    stream=True):
            chunks.append(chunk)
    assert len(chunks) == 3
    assert responses(proxy)[0]["outcome"] == "upstream_aborted"


SSE_EVENT = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'


def _slow_sse(events: int, delay: float) -> Slow:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (len(SSE_EVENT), SSE_EVENT)
    return Slow([head + chunk, *[chunk] * (events - 1), b"0\r\n\r\n"], delay)


def test_client_gone_mid_stream_cancels_the_upstream_request(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A client gone mid-stream: the upstream connection is closed; record says client_aborted."""
    raw_upstream.respond(_slow_sse(events=50, delay=0.05))
    request = (
        f"POST /openai/{raw_upstream.host_port}/v1/chat/completions HTTP/1.1\r\n"
        "Host: p\r\nContent-Length: 2\r\n\r\n{}"
    ).encode()
    with socket.create_connection(("127.0.0.1", raw_proxy.server.port), timeout=10) as conn:
        conn.sendall(request)
        received = b""
        while received.count(b"data: ") < 3:
            received += conn.recv(65536)
    assert raw_upstream.closed_by_peer.wait(5), "the upstream request was not cancelled"
    [response] = responses(raw_proxy)
    assert response["outcome"] == "client_aborted"
    assert 3 <= len(response["chunks"]) < 50
    assert "client disconnected" in response["error"]


def test_client_gone_before_the_upstream_answers_cancels_it(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A client gone before the response head: the upstream call is cancelled, client_aborted."""
    fake.replies.append(Reply(first_byte_delay=1.0))
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0,
                                 timeout=0.3)
    with pytest.raises(anthropic.APITimeoutError):
        client.messages.create(model="m", max_tokens=5, messages=USER)
    [response] = responses(proxy)
    assert response["outcome"] == "client_aborted" and response["status"] is None


def test_concurrent_streams_are_relayed_independently(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """Eight slow streams at once all complete, each with its own answer, and are recorded."""
    fake.replies.extend(
        Reply(blocks=[{"type": "text", "text": f"answer {i}"}], event_delay=0.05) for i in range(8)
    )
    client = anthropic_client(proxy)
    texts: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        with client.messages.stream(model="m", max_tokens=5, messages=USER) as stream:
            text = stream.get_final_text()
        with lock:
            texts.append(text)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(texts) == [f"answer {i}" for i in range(8)]
    assert sorted(e["outcome"] for e in responses(proxy)) == ["complete"] * 8


def test_non_utf8_request_and_response_bodies_are_stored_as_base64(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """Bodies that are not UTF-8 are kept exactly, base64-encoded, with a marker."""
    sent, answered = b"\x80\x81\xfe\xff binary", b"\xff\x00\xc3\x28"
    raw_upstream.respond(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n"
        b"Connection: close\r\n\r\n" + answered
    )
    answer = httpx2.post(raw_proxy.base() + "/v1/files", content=sent)
    assert answer.content == answered
    assert raw_upstream.requests[0].body == sent
    request, response = raw_proxy.entries()
    assert request["body_encoding"] == "base64" and base64.b64decode(request["body"]) == sent
    assert response["body_encoding"] == "base64"
    assert base64.b64decode(response["body"]) == answered


def test_head_request_is_relayed_without_a_body(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """HEAD /api/hello (Claude Code's probe) is answered with the upstream's head only."""
    answer = httpx2.head(proxy.base() + "/api/hello")
    assert answer.status_code == 200 and answer.content == b""
    assert [(r.method, r.path) for r in fake.received] == [("HEAD", "/api/hello")]
    [response] = responses(proxy)
    assert response["status"] == 200 and response["outcome"] == "complete"


def test_gzip_corrupt_body_is_relayed_and_recorded_raw(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A body claiming gzip but corrupt is relayed as is; the record keeps it with decode_error."""
    bogus = b"\x1f\x8b\x08\x00" + b"\xff" * 12
    raw_upstream.respond(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(bogus), bogus)
    )

    async def fetch() -> bytes:
        async with aiohttp.ClientSession(auto_decompress=False) as session, session.get(
            raw_proxy.base() + "/v1/models"
        ) as answer:
            return await answer.read()

    assert run_async(fetch()) == bogus
    [response] = responses(raw_proxy)
    assert response["decode_error"].startswith("gzip") and response["size"] == len(bogus)
    assert base64.b64decode(response["body"]) == bogus


def test_compressed_request_body_is_forwarded_compressed(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A gzip-encoded request body reaches the upstream as the same compressed bytes."""
    body = zlib.compress(b'{"model": "m", "messages": []}', wbits=31)
    request = (
        f"POST /anthropic/{raw_upstream.host_port}/v1/messages HTTP/1.1\r\nHost: p\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    assert parse_response(roundtrip(raw_proxy.server.port, request)).status == 200
    [got] = raw_upstream.requests
    assert got.body == body and got.values("content-encoding") == ["gzip"]


@pytest.mark.parametrize(
    ("status_line", "extra"),
    [("204 No Content", "X-A: 1\r\n"), ("304 Not Modified", 'ETag: "v1"\r\n')],
    ids=["204", "304"],
)
def test_bodiless_statuses_are_relayed(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream, status_line: str, extra: str
) -> None:
    """204 and 304 come back with their headers and no body."""
    raw_upstream.respond(f"HTTP/1.1 {status_line}\r\n{extra}\r\n".encode())
    request = (f"GET /openai/{raw_upstream.host_port}/v1/x HTTP/1.1\r\nHost: p\r\n"
               "Connection: close\r\n\r\n").encode()
    answer = parse_response(roundtrip(raw_proxy.server.port, request))
    assert answer.status_line == f"HTTP/1.1 {status_line}" and answer.body == b""
    name, _, value = extra.strip().partition(": ")
    assert answer.values(name) == [value]


def test_silent_upstream_beyond_the_read_timeout_gives_504(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    """Silence beyond the read timeout: 504 before the head, upstream_aborted mid-stream."""
    running = make_proxy(fake, upstream_read_timeout=0.3)
    fake.replies.append(Reply(first_byte_delay=1.0))
    client = anthropic_client(running)
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(model="m", max_tokens=5, messages=USER)
    assert raised.value.status_code == 504
    assert raised.value.body["error"]["type"] == "timeout_error"  # type: ignore[index]
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "a b"}], event_delay=0.6))
    broken = (httpx2.RemoteProtocolError, anthropic.APIConnectionError)
    with pytest.raises(broken), client.messages.stream(
        model="m", max_tokens=5, messages=USER
    ) as stream:
        stream.get_final_message()
    timed_out, stalled = responses(running)
    assert (timed_out["status"], timed_out["outcome"]) == (504, "upstream_error")
    assert (stalled["status"], stalled["outcome"]) == (200, "upstream_aborted")
    assert len(stalled["chunks"]) == 1


def test_proxy_adds_no_trace_headers_when_otlp_export_is_on(
    make_proxy: Any, raw_upstream: RawUpstream
) -> None:
    """With OTLP export on no traceparent is injected; the client's own passes untouched."""
    with RawUpstream() as seq:
        running = make_proxy(raw_upstream, seq_url=seq.url)
        client_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        for extra in ("", f"traceparent: {client_trace}\r\n"):
            request = (
                f"POST /anthropic/{raw_upstream.host_port}/v1/messages HTTP/1.1\r\nHost: p\r\n"
                f"{extra}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            ).encode()
            roundtrip(running.server.port, request)
        plain, traced = raw_upstream.requests
        assert sorted(k.lower() for k, _ in plain.headers) == ["content-length", "host"]
        assert sorted(k.lower() for k, _ in traced.headers) == [
            "content-length", "host", "traceparent"]
        assert traced.values("traceparent") == [client_trace]
        running.flush()
        assert seq.requests, "the export was not configured"
