"""Secret obfuscation for everything the proxy writes down (never for the bytes it forwards).

A secret appears in the record as its public prefix + ``...`` + its last 4 characters:
``sk-ant-api03-…WXYZ`` → ``sk-ant-...WXYZ``. Rules:

- the headers in ``SECRET_HEADERS`` are always obfuscated, whatever their value looks like;
  ``Authorization``/``Proxy-Authorization`` keep their scheme word (``Bearer sk-ant-...WXYZ``);
- any other header value, the query string and bodies are scanned for known key shapes
  (``sk-ant-…``, ``sk-ant-oat01-…``, ``sk-proj-…``, ``sk-…``, not glued to a preceding letter
  or digit, so ``task-…`` or ``disk-…`` stay readable) and each match is obfuscated;
- values shorter than 16 characters lose their last 4 too (``...``): showing 4 of 8 characters
  would give half the secret away.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SECRET_HEADERS = frozenset(
    {"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie",
     "api-key", "x-goog-api-key", "openai-api-key", "x-seq-apikey"}
)
_KNOWN_PREFIXES = ("sk-ant-", "sk-proj-", "sk-")
# Not preceded by a letter or digit: "task-…", "disk-usage-…" and "risk-…" are words, not keys.
_KEY_PATTERN = r"(?<![A-Za-z0-9])sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,}"
_KEY_TEXT = re.compile(_KEY_PATTERN)
_KEY_BYTES = re.compile(_KEY_PATTERN.encode())
_MIN_SHOWN = 16


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
    return [
        (name, value) if "sk-" not in value and name.lower() not in SECRET_HEADERS
        else (name, obfuscate_header(name, value))
        for name, value in headers
    ]


def redact_text(text: str) -> str:
    """Obfuscate every key-shaped substring of ``text``."""
    if "sk-" not in text:
        return text
    return _KEY_TEXT.sub(lambda match: obfuscate(match.group(0)), text)


def redact_bytes(data: bytes) -> bytes:
    """Obfuscate every key-shaped substring of ``data`` (any encoding that keeps ASCII)."""
    if b"sk-" not in data:
        return data
    return _KEY_BYTES.sub(lambda match: obfuscate(match.group(0).decode()).encode(), data)
