"""Secret obfuscation for everything the proxy writes down (never for the bytes it forwards).

A secret appears in the record as its public prefix + ``...`` + its last 4 characters:
``sk-ant-api03-…WXYZ`` → ``sk-ant-...WXYZ``. Rules:

- the headers in ``SECRET_HEADERS`` are always obfuscated, whatever their value looks like;
  ``Authorization``/``Proxy-Authorization`` keep their scheme word (``Bearer sk-ant-...WXYZ``);
- any other header value, the path, the query string and bodies are scanned for known key
  shapes (``sk-ant-…``, ``sk-ant-oat01-…``, ``sk-proj-…``, ``sk-…``, not glued to a preceding
  letter or digit, so ``task-…`` or ``disk-…`` stay readable) and each match is obfuscated;
- a key is recognised however it is written: any of its characters may be a JSON ``\\u00XX``
  escape (with any number of backslashes: JSON text inside JSON) or a URL ``%XX`` escape, and
  an escape before it counts as a separator (``"…\\nsk-ant-…"``); the replacement keeps the
  JSON valid;
- a text delivered in pieces (a stream's deltas) is obfuscated as a whole
  (``redact_pieces``), so a key split across events is found too;
- values shorter than 16 characters lose their last 4 too (``...``): showing 4 of 8 characters
  would give half the secret away;
- a request body that repeats the previous one of its conversation (every turn sends the
  whole history again) is scanned only where it differs (``redact_body``): the result is the
  same bytes as ``redact_bytes`` of the whole body;
- log lines: ``RedactLogRecords`` filters every line both processes write.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from otelproxy.compact import common_prefix, common_suffix

SECRET_HEADERS = frozenset(
    {"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie",
     "api-key", "x-goog-api-key", "openai-api-key", "x-seq-apikey"}
)
_KNOWN_PREFIXES = ("sk-ant-", "sk-proj-", "sk-")
_KEY_CHARS = string.ascii_letters + string.digits + "_-"
_MIN_BODY = 16
"""A key is ``sk-`` + at least this many key characters (``sk-ant-``/``sk-proj-`` included)."""
_MIN_SHOWN = 16


def _hex(code: int) -> str:
    """A regex for the two hex digits of ``code`` in either case (``6b`` → ``6[bB]``)."""
    digits = f"{code:02x}"
    low = digits[1]
    return digits[0] + (f"[{low}{low.upper()}]" if low.isalpha() else low)


def _escaped(codes: str) -> str:
    """A JSON ``\\u00XX`` escape (any number of backslashes: JSON inside JSON too) or a URL
    ``%XX`` escape of one of ``codes`` (a regex for the hex digits)."""
    return rf"(?:\\+u00|%)(?:{codes})"


def _char(char: str) -> str:
    """One character of a key as it may be written: itself or escaped."""
    return rf"(?:{re.escape(char)}|{_escaped(_hex(ord(char)))})"


_BODY_CODES = "|".join(sorted({_hex(ord(c)) for c in _KEY_CHARS}))
# Two hex digits of a character that is not a letter or a digit (a separator before a key).
_SEPARATOR_CODES = "[0-2][0-9a-fA-F]|3[a-fA-F]|40|5[b-fB-F]|60|7[b-fB-F]|[89a-fA-F][0-9a-fA-F]"


def _after_separator(first: str) -> str:
    """Lookbehinds after a key's first character ``first`` (a regex): what precedes it is no
    letter or digit ("task-…", "disk-…" are words), or an escaped one (``\\n``, ``\\u0022``,
    ``%3D``: ``"line\\nsk-…"`` in JSON is a key at the start of a line)."""
    return (rf"(?:(?<![A-Za-z0-9]{first})|(?<=\\[nrtbf]{first})"
            rf"|(?<=\\u00(?:{_SEPARATOR_CODES}){first})|(?<=%(?:{_SEPARATOR_CODES}){first}))")


# Each alternative starts with a literal (s, \ or %), so the regex engine skips ahead in C to
# the candidates, and a lookahead drops most of them before the lookbehinds run. A JSON-escaped
# start must begin its run of backslashes: replacing from the middle of a run would leave an
# odd backslash before the replacement (invalid JSON).
_BACKSLASH = r"[\\]"
_KEY_PATTERN = (
    rf"(?:s(?=[k\\%]){_after_separator('s')}"
    rf"|{_BACKSLASH}(?={_BACKSLASH}*u0073){_after_separator(_BACKSLASH)}"
    rf"(?<!{_BACKSLASH}{_BACKSLASH}){_BACKSLASH}*u0073"
    rf"|%(?=73){_after_separator('%')}73)"
    rf"{_char('k')}{_char('-')}(?:[A-Za-z0-9_\-]|{_escaped(_BODY_CODES)}){{{_MIN_BODY},}}"
)
"""``sk-`` + 16 or more key characters, any of them possibly escaped (``\\u0073k-ant-…``,
``sk%2Dproj-…``): a reader decoding the JSON or the URL would see the key whole."""
_KEY_TEXT = re.compile(_KEY_PATTERN)
_KEY_BYTES = re.compile(_KEY_PATTERN.encode())
_ESCAPE_TEXT = re.compile(r"\\+u00([0-9a-fA-F]{2})|%([0-9a-fA-F]{2})")


def _unescape(written: str) -> str:
    """A key as written (maybe escaped) → the key itself."""
    if "\\" not in written and "%" not in written:
        return written
    return _ESCAPE_TEXT.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), written)


def obfuscate(secret: str) -> str:
    """``prefix...last4`` for one secret value."""
    prefix = next((p for p in _KNOWN_PREFIXES if secret.startswith(p)), "")
    if len(secret) < _MIN_SHOWN:
        return prefix + "..."
    return f"{prefix}...{secret[-4:]}"


def obfuscate_header(name: str, value: str) -> str:
    lower = name.lower()
    if lower in ("authorization", "proxy-authorization"):
        scheme, sep, token = value.partition(" ")
        if sep and token:
            return f"{scheme} {obfuscate(token.strip())}"
        return obfuscate(value)
    if lower in SECRET_HEADERS:
        return obfuscate(value)
    return redact_text(value)


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Secret headers obfuscated whole, keys in any other value or in a name obfuscated."""
    return [
        (redact_text(name), obfuscate_header(name, value) if name.lower() in SECRET_HEADERS
         else redact_text(value))
        for name, value in headers
    ]


def _obfuscate_text(match: re.Match[str]) -> str:
    return obfuscate(_unescape(match.group(0)))


def _obfuscate_bytes(match: re.Match[bytes]) -> bytes:
    return obfuscate(_unescape(match.group(0).decode("ascii"))).encode("ascii")


# Every way of writing a key's start (``sk``, ``s\u006b``, ``\u0073k``, ``%73k``, ``s%6b``, …)
# contains ``sk``, ``u00`` or ``%``: a text without them holds no key, and ``in`` is much
# cheaper than the regex on the many small texts of a stream.


def redact_text(text: str) -> str:
    """Obfuscate every key-shaped substring of ``text``, escaped ones included."""
    if "sk" not in text and "u00" not in text and "%" not in text:
        return text
    return _KEY_TEXT.sub(_obfuscate_text, text)


def redact_bytes(data: bytes) -> bytes:
    """Obfuscate every key-shaped substring of ``data`` (any encoding that keeps ASCII),
    escaped ones included."""
    if b"sk" not in data and b"u00" not in data and b"%" not in data:
        return data
    return _KEY_BYTES.sub(_obfuscate_bytes, data)


def redact_pieces(pieces: Sequence[str]) -> list[str] | None:
    """Obfuscate the keys in a text delivered in pieces (a stream's deltas), keys that straddle
    pieces included; None when there is none. A key's obfuscated form goes where the key
    starts; the pieces it spans give up their share of it, so the pieces still concatenate to
    the obfuscated text."""
    joined = "".join(pieces)
    if "sk" not in joined and "u00" not in joined and "%" not in joined:
        return None
    matches = [(m.start(), m.end(), _obfuscate_text(m)) for m in _KEY_TEXT.finditer(joined)]
    if not matches:
        return None
    out: list[str] = []
    start = 0
    for piece in pieces:
        end = start + len(piece)
        parts: list[str] = []
        kept_from = start
        for first, last, shown in matches:
            if last <= start or first >= end:
                continue
            if first >= start:
                parts += [joined[kept_from:first], shown]
            kept_from = min(last, end)
        parts.append(joined[kept_from:end])
        out.append("".join(parts))
        start = end
    return out


_IN_KEY = frozenset((string.ascii_letters + string.digits + "_-\\%").encode())
"""Every byte of a key as written (escapes included) is one of these; so is the first byte
the key regex tries a position with (``s``, ``\\``, ``%``)."""
_LOOKBEHIND = 8
"""The key regex looks at most this many bytes before a position it tries (``\\u00XXs``)."""


@dataclass(slots=True)
class RedactedBody:
    """A body, its redacted form and the keys found in it (for ``redact_body``)."""

    raw: bytes
    redacted: bytes
    keys: list[tuple[int, int, bytes]]
    """``(start, end, replacement)`` of every key in ``raw``, in order."""


def _keys(data: bytes, start: int, end: int) -> list[tuple[int, int, bytes]]:
    """The keys ``redact_bytes(data)`` replaces that lie in ``data[start:end]``, when neither
    ``data[start - 1]`` nor ``data[end - 1]`` can be part of a key (or they are the ends)."""
    return [(m.start(), m.end(), _obfuscate_bytes(m))
            for m in _KEY_BYTES.finditer(data, start, end)]


def _apply(data: bytes, keys: list[tuple[int, int, bytes]]) -> bytes:
    if not keys:
        return data
    parts: list[bytes] = []
    at = 0
    for start, end, shown in keys:
        parts += [data[at:start], shown]
        at = end
    parts.append(data[at:])
    return b"".join(parts)


def redact_body(data: bytes, previous: RedactedBody | None = None,
                shared: int | None = None) -> RedactedBody:
    """``redact_bytes(data)``, scanning only the bytes that differ from ``previous.raw``.

    Why the parts the two bodies share need no new scan: every byte of a key, as written, is in
    ``_IN_KEY``, and the regex reads forward from a position it tries only over such bytes and
    the first byte that is not one; it reads at most ``_LOOKBEHIND`` bytes back. So at a byte
    ``c`` outside ``_IN_KEY`` no key starts, ends or passes, and the scan resumes after ``c``
    whatever came before. With ``c1`` the last such byte of the common prefix and ``c2`` the
    first one at least ``_LOOKBEHIND`` bytes into the common suffix, the keys before ``c1`` and
    after ``c2`` are those ``previous`` had there (the latter shifted), and only
    ``data[c1:c2]`` is scanned: a key straddling the end of the shared prefix lies whole in
    that window, since the window reaches back to a byte no key can span. ``shared``: the
    length of the common prefix of ``data`` and ``previous.raw``, when known already."""
    if previous is None or not previous.raw:
        keys = _keys(data, 0, len(data)) if (
            b"sk" in data or b"u00" in data or b"%" in data) else []
        return RedactedBody(data, _apply(data, keys), keys)
    old = previous.raw
    prefix = common_prefix(old, data) if shared is None else shared
    if prefix == len(old) == len(data):
        return previous
    suffix = common_suffix(old, data, min(len(old), len(data)) - prefix)
    cut = prefix - 1
    while cut >= 0 and data[cut] in _IN_KEY:
        cut -= 1
    head = cut + 1  # data[head - 1] is no key byte (or head is 0)
    tail = len(data)  # the scan window is data[head:tail]
    at = len(data) - suffix + _LOOKBEHIND
    while at < len(data) and data[at] in _IN_KEY:
        at += 1
    if at < len(data):
        tail = at  # data[at] is no key byte, and data[at - 8:] is shared
    shift = len(data) - len(old)
    keys = [key for key in previous.keys if key[1] < head]
    if data.find(b"sk", head, tail) >= 0 or data.find(b"u00", head, tail) >= 0 or \
            data.find(b"%", head, tail) >= 0:
        keys += _keys(data, head, tail)
    keys += [(start + shift, end + shift, shown) for start, end, shown in previous.keys
             if start > tail - shift]
    return RedactedBody(data, _apply(data, keys), keys)


class RedactLogRecords(logging.Filter):
    """A log handler filter obfuscating keys in every line before it is written: message,
    exception and stack. Libraries log what they were sent: aiohttp's error log quotes the
    malformed header line of a bad request, key and all."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def redact_logging() -> None:
    """Install ``RedactLogRecords`` on every handler of the root logger (after
    ``logging.basicConfig``), so every log line of the process goes through it."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactLogRecords) for f in handler.filters):
            handler.addFilter(RedactLogRecords())
