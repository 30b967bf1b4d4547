"""Header bytes: aiohttp's head writer made byte-exact, and the record's escaped copy."""

from __future__ import annotations

import pytest
from aiohttp import http_writer
from multidict import CIMultiDict

from otelproxy import header_bytes


def test_a_non_utf8_byte_is_written_back_exactly_and_ascii_heads_are_unchanged() -> None:
    """After install(), a surrogate-escaped byte is written as that byte; ASCII heads are
    serialized exactly as aiohttp's own writer does; installing twice wraps once."""
    header_bytes.install()
    header_bytes.install()
    serialize = http_writer._serialize_headers
    assert not getattr(serialize.__closure__[0].cell_contents, "exact", False)  # type: ignore[index]
    value = b"caf\xe9 \xe2\x82\xac".decode("utf-8", "surrogateescape")
    head = serialize("GET / HTTP/1.1", CIMultiDict([("X-Note", value), ("A", "b")]))
    assert head == b"GET / HTTP/1.1\r\nX-Note: caf\xe9 \xe2\x82\xac\r\nA: b\r\n\r\n"
    assert serialize("HTTP/1.1 200 OK", CIMultiDict([("A", "b")])) == (
        b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n")


def test_control_characters_are_still_refused() -> None:
    """A non-ASCII head keeps aiohttp's header-injection guard (CR, LF, NUL ...)."""
    header_bytes.install()
    with pytest.raises(ValueError, match="Forbidden control character"):
        http_writer._serialize_headers(
            "GET / HTTP/1.1", CIMultiDict([("X-Note", "caf\udce9\r\nX-Injected: 1")]))


def test_escape_writes_undecodable_bytes_as_backslash_x_and_keeps_utf8() -> None:
    """escape(): lone surrogates become \\xNN, valid UTF-8 and ASCII stay as they are."""
    headers = [("x-a", "caf\udce9"), ("x-b", "na\u00efve \u20ac"), ("x-c", "plain")]
    assert header_bytes.escape(headers) == [
        ("x-a", "caf\\xe9"), ("x-b", "na\u00efve \u20ac"), ("x-c", "plain")]
