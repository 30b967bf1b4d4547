"""The listening side: request-head timeout, body timeout, keep-alive timeout, connection cap.

Raw sockets as clients against a real proxy and a real loopback upstream; the timeouts are set
small and every wait on the proxy has a generous deadline (a loaded machine only makes the proxy
later, never earlier).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import orjson

from tests.conftest import RunningProxy
from tests.fake_upstream import FakeUpstream, Reply
from tests.proxy_process import ProxyProcess
from tests.raw_upstream import RawUpstream, parse_response, roundtrip


def _read_until_closed(conn: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the proxy sends until it closes (True) or the deadline passes (False)."""
    received = b""
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            data = conn.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, True
        if not data:
            return received, True
        received += data
    return received, False


def test_a_request_head_sent_one_byte_at_a_time_is_cut_after_the_header_timeout(
    make_proxy: Callable[..., RunningProxy], raw_upstream: RawUpstream
) -> None:
    """A slowloris client that keeps sending header bytes gets a 408 and its connection closed
    once the head has taken --header-timeout; nothing reaches the upstream."""
    running = make_proxy(raw_upstream, header_timeout=0.5)
    head = (f"GET /anthropic/{raw_upstream.host_port}/v1/models HTTP/1.1\r\nHost: p\r\n"
            "X-Slow: " + "a" * 200).encode()
    started = time.monotonic()
    closed = False
    received = b""
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=5) as conn:
        for byte in head:
            try:
                conn.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            received, closed = _read_until_closed(conn, time.monotonic() + 0.05)
            if closed or time.monotonic() - started > 10:
                break
        if not closed:
            received, closed = _read_until_closed(conn, time.monotonic() + 5)
    assert closed, "the slow head was never cut"
    assert 0.5 <= time.monotonic() - started < 10
    answer = parse_response(received)
    assert answer.status == 408
    assert orjson.loads(answer.body)["error"]["type"] == "timeout_error"
    assert raw_upstream.connections == 0
    assert httpx2.get(running.url + "/healthz").json()["head_timeouts"] == 1


def test_a_slow_body_is_not_cut_by_the_header_timeout_but_a_stalled_one_is_408(
    make_proxy: Callable[..., RunningProxy], raw_upstream: RawUpstream
) -> None:
    """Body bytes trickling in after a complete head are the body's business, not the head
    timer's; a body that stops for --body-timeout gets a 408 in the provider shape and is
    recorded as rejected, with nothing sent upstream."""
    running = make_proxy(raw_upstream, header_timeout=0.3, body_timeout=1.5)
    head = (f"POST /openai/{raw_upstream.host_port}/v1/chat/completions HTTP/1.1\r\n"
            "Host: p\r\nContent-Length: 8\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as conn:
        conn.sendall(head)
        for byte in b"{}      ":
            time.sleep(0.1)  # 0.8 s in all: longer than the header timeout
            conn.sendall(bytes([byte]))
        received, closed = _read_until_closed(conn, time.monotonic() + 10)
    assert closed and parse_response(received).status == 200
    assert raw_upstream.requests[0].body == b"{}      "

    with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as conn:
        conn.sendall(head + b"{")
        received, closed = _read_until_closed(conn, time.monotonic() + 10)
    assert closed
    answer = parse_response(received)
    assert answer.status == 408
    assert orjson.loads(answer.body)["error"]["type"] == "timeout_error"  # openai shape
    assert "stalled" in orjson.loads(answer.body)["error"]["message"]
    assert len(raw_upstream.requests) == 1
    [rejected] = running.entries("rejected-*.jsonl")
    assert rejected["type"] == "rejected" and rejected["status"] == 408
    assert "stalled" in rejected["error"]


def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    make_proxy: Callable[..., RunningProxy], fake: FakeUpstream
) -> None:
    """After its answer, a kept-alive connection left idle is closed by the proxy after
    --keepalive-timeout (aiohttp's default was about an hour)."""
    running = make_proxy(fake, keepalive_timeout=0.5)
    request = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as conn:
        conn.sendall(request)
        answered = time.monotonic()
        received, closed = _read_until_closed(conn, answered + 10)
    assert closed and received.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - answered >= 0.5


def _connect_and_wait_accepted(running: RunningProxy, expected_open: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", running.server.port), timeout=10)
    deadline = time.monotonic() + 10
    while running.server.state.stats.client_connections < expected_open:
        assert time.monotonic() < deadline, "the proxy never took the connection"
        time.sleep(0.01)
    return conn


def test_one_connection_over_the_cap_gets_a_503_and_a_freed_slot_is_reused(
    make_proxy: Callable[..., RunningProxy], fake: FakeUpstream
) -> None:
    """With --max-client-connections 2 and two connections open, a third gets 503
    overloaded_error with Retry-After and is closed; once one closes, new ones are served."""
    running: Any = make_proxy(fake, max_client_connections=2)
    first = _connect_and_wait_accepted(running, 1)
    second = _connect_and_wait_accepted(running, 2)
    try:
        answer = parse_response(roundtrip(running.server.port, b"GET /healthz HTTP/1.1\r\n"
                                          b"Host: p\r\nConnection: close\r\n\r\n"))
        assert answer.status == 503 and answer.values("retry-after") == ["1"]
        error = orjson.loads(answer.body)["error"]
        assert error["type"] == "overloaded_error" and "limit 2" in error["message"]
        first.close()
        deadline = time.monotonic() + 10
        while running.server.state.stats.client_connections > 1:
            assert time.monotonic() < deadline, "the closed connection was never counted"
            time.sleep(0.01)
        health = httpx2.get(running.url + "/healthz").json()
        assert health["connections_refused"] == 1
    finally:
        first.close()
        second.close()


def test_with_few_open_files_a_burst_of_streams_is_refused_up_front_never_502(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """A proxy process limited to 300 open files sizes its connection limits to them (86): of
    150 concurrent streams each is either relayed whole or refused with a 503 at connect, none
    fails with a 502 or a broken stream for lack of descriptors."""
    streams = 150
    for _ in range(streams):
        fake.replies.append(Reply(event_delay=0.3))  # ~10 events: each stream lasts ~3 s

    def few_open_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    async def one_stream(session: aiohttp.ClientSession, url: str) -> str:
        body = {"model": "m", "max_tokens": 5, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        try:
            async with session.post(url, json=body) as answer:
                data = await answer.read()
                if answer.status == 200:
                    return "complete" if b"event: message_stop" in data else "cut"
                return str(answer.status)
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def burst(url: str) -> list[str]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await asyncio.gather(*(one_stream(session, url) for _ in range(streams)))

    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(tmp_path)],
                      preexec_fn=few_open_files) as running:
        url = f"{running.url}/anthropic/{fake.host_port}/v1/messages"
        outcomes = asyncio.run(burst(url))
    assert "open-file limit 300: up to 86 client and 86 upstream connections" in running.stderr
    counted = Counter(outcomes)
    assert set(counted) <= {"complete", "503"}, counted
    assert counted["complete"] > 0 and counted["503"] > 0, counted


def test_a_head_pipelined_behind_a_running_stream_does_not_cut_that_stream(
    make_proxy: Callable[..., RunningProxy], fake: FakeUpstream
) -> None:
    """A client that starts its next request head while a stream is still being answered on
    the same connection gets that stream whole, even past --header-timeout."""
    fake.replies.append(Reply(event_delay=0.15))  # ~10 events: ~1.5 s
    running = make_proxy(fake, header_timeout=0.3)
    body = orjson.dumps({"model": "m", "max_tokens": 5, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    request = (f"POST /anthropic/{fake.host_port}/v1/messages HTTP/1.1\r\nHost: p\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    with socket.create_connection(("127.0.0.1", running.server.port), timeout=10) as conn:
        conn.sendall(request)
        received = conn.recv(65536)  # the stream has started
        conn.sendall(b"GET /healthz HTTP/1.1\r\nX-Partial: ")
        more, _ = _read_until_closed(conn, time.monotonic() + 3)
        received += more
    assert parse_response(received).status == 200
    assert b"event: message_stop" in received
