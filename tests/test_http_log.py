"""The HTTP server's log: aiohttp's parser errors become one line without the quoted bytes."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from otelproxy.http_log import HTTP_LOG
from tests.proxy_process import ProxyProcess
from tests.raw_upstream import roundtrip

KEY = "sk-ant-api03-" + "s" * 40 + "0123456789abcdefWXYZ"
OPAQUE_TOKEN = "Zm9vYmFyYmF6cXV4cXV1eA" * 3


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    HTTP_LOG.addHandler(handler)
    try:
        yield stream
    finally:
        HTTP_LOG.removeHandler(handler)


def test_a_parser_error_becomes_one_warning_line_without_the_quoted_bytes(
    captured: io.StringIO
) -> None:
    """aiohttp's BadHttpMessage (which quotes the raw line) is logged as status, class and
    description only, at WARNING, with no traceback."""
    try:
        raise BadHttpMessage(f"Invalid header value char:\n\n  b'Cookie: {OPAQUE_TOKEN}\\x01'")
    except BadHttpMessage as exc:
        HTTP_LOG.error("Error handling request from %s", "127.0.0.1", exc_info=exc)
    assert captured.getvalue() == ("WARNING Error handling request from 127.0.0.1: "
                                   "400 BadHttpMessage: Invalid header value char\n")


@pytest.mark.parametrize(
    "request_bytes",
    [
        f"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Api-Key: {KEY}\x01\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Api-Key {KEY}\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-A: x\r\n {KEY}\r\n\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {OPAQUE_TOKEN}\x7f\r\n"
        "\r\n".encode(),
        f"GET /v1/models HTTP/1.1\r\nHost: p\r\nCookie: s={OPAQUE_TOKEN}\x00\r\n\r\n".encode(),
        f"GET x{KEY} HTTP/1.1\r\nHost: p\r\n\r\n".encode(),
        f"GET /v1/models?key={KEY} HTTP/1.1\r\nHost: p\r\nX-A: \x00\r\n\r\n".encode(),
        f"GET /v1/{KEY} HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
        "\r\n".encode(),
    ],
    ids=["bad-value-char", "no-colon", "folded-line", "opaque-bearer", "opaque-cookie",
         "bad-target", "key-in-query", "duplicate-length"],
)
def test_a_malformed_request_never_puts_a_secret_on_stderr(
    tmp_path: Path, request_bytes: bytes
) -> None:
    """The real otelproxy process refuses the request (400) and logs one WARNING line without
    the quoted bytes: neither a key nor an opaque token, nor any long piece of them, reaches
    stderr, and no traceback."""
    with ProxyProcess(["--log-dir", str(tmp_path)]) as running:
        answer = roundtrip(running.port, request_bytes)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
        deadline = time.monotonic() + 5
        while "Error handling request" not in running.stderr:
            assert time.monotonic() < deadline, running.stderr
            time.sleep(0.02)
    stderr = running.stderr
    for secret in (KEY, OPAQUE_TOKEN):
        for start in range(0, len(secret) - 12, 4):
            assert secret[start:start + 12] not in stderr, stderr
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "Error handling request" in line]
    assert " WARNING otelproxy.http: Error handling request from 127.0.0.1: 400 " in line
