"""Header values cross the proxy as the bytes they arrived as, and reach the record escaped.

aiohttp gives the handler header values as bytes (``raw_headers``); the proxy keeps them as
``str`` decoded with ``surrogateescape``, so a byte that is not UTF-8 — obs-text such as a
latin-1 ``\\xe9`` — survives as a lone surrogate. aiohttp writes a head by encoding ``str`` as
UTF-8: its C writer silently skips surrogates and its Python one raises, so such a byte vanished
from the forwarded request (and from a relayed response). ``install()`` wraps aiohttp's head
serializer once per process: a head whose status line, names and values are all ASCII (nearly
every one) still goes through aiohttp's own writer; any other is encoded with
``surrogateescape``, which gives back exactly the bytes received. aiohttp's refusal of control
characters (header injection) is kept. There is no public hook for this (``StreamWriter`` is
built inside ``ClientRequest.send``), hence the module-level wrap; a test sends a latin-1 byte
both ways, so an aiohttp upgrade that moves the serializer fails loudly.

For the record, ``escape`` turns such a value into valid text (``caf\\xe9``): JSON, SQLite and
OTLP only carry UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

TYPE_CHECKING = False
if TYPE_CHECKING:  # the recorder process uses ``escape`` alone and does not import aiohttp
    from multidict import CIMultiDict

_Serializer = Callable[[str, "CIMultiDict[str]"], bytes]
# RFC 9110 §5.5 / RFC 9112 §4: the characters aiohttp refuses in a head (all but HTAB below 0x20).
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _exact(original: _Serializer) -> _Serializer:
    def serialize_headers(status_line: str, headers: CIMultiDict[str]) -> bytes:
        if status_line.isascii() and all(
            name.isascii() and value.isascii() for name, value in headers.items()
        ):
            return original(status_line, headers)
        lines = [status_line, *(f"{name}: {value}" for name, value in headers.items())]
        for line in lines:
            if _FORBIDDEN.search(line):
                raise ValueError("Forbidden control character detected in headers. "
                                 "Potential header injection attack.")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    serialize_headers.exact = True  # type: ignore[attr-defined]
    return serialize_headers


def install() -> None:
    """Make aiohttp write header values byte for byte as received (idempotent)."""
    from aiohttp import http_writer

    current = http_writer._serialize_headers
    if not getattr(current, "exact", False):
        http_writer._serialize_headers = _exact(current)  # type: ignore[assignment]


def escape(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers with every byte that was not UTF-8 written as ``\\xNN`` (valid text for the
    record); headers that were UTF-8 come back unchanged."""
    return [(name if name.isascii() else _escaped(name),
             value if value.isascii() else _escaped(value)) for name, value in headers]


def _escaped(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
