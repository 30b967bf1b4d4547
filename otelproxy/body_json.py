"""A request body's JSON, parsed again only where it differs from the previous body.

Every turn of a conversation sends the whole history again: ``{"model": …, "messages": [m1 …
mN], "system": …, "tools": …}``. Parsing it whole costs as much as the history; here a body is
parsed as the previous body of its conversation (``ParsedBody``) with only what differs parsed
anew, when the difference lies inside the top-level ``messages`` array:

- the bytes before the array and from its closing ``]`` on are the previous body's (its common
  prefix and suffix with this one, compared byte for byte), so they mean what they meant;
- the messages that end inside the common prefix are the same bytes in the same place, so they
  are the same values: the very objects of the previous parse are reused (``is`` identity means
  "the same bytes", which the session processor relies on);
- the bytes between them are parsed by ``orjson`` as an array at the same nesting depth (its
  limits hold as in a whole parse); when they are not exactly the rest of a valid array the
  whole body is parsed as before.

So ``parse_body(body, previous).value == orjson.loads(body)`` always, and it raises exactly when
``orjson.loads(body)`` raises. A body whose top-level object has no (or an empty) ``messages``
array, or one written with escapes in its key, is parsed whole.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

import orjson

from otelproxy.compact import common_prefix, common_suffix

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]')
"""A string, or a structural byte of JSON (what lies between them is numbers, literals and
whitespace)."""
_SPACE = b" \t\r\n"
_MESSAGES = "messages"


@dataclass(slots=True)
class ParsedBody:
    """A body, its JSON value and where its top-level ``messages`` array lies."""

    body: bytes
    value: Any
    array: tuple[int, list[int], int] | None = None
    """``(offset of "[", offset of the "," or "]" after each element, offset of "]")``, or None
    when the body has no single top-level ``messages`` array."""


def parse_body(body: bytes, previous: ParsedBody | None = None,
               shared: int | None = None) -> ParsedBody:
    """``body`` parsed (``orjson.JSONDecodeError`` as ``orjson.loads`` raises it), reusing
    ``previous`` where the two bodies are the same bytes (see the module docstring);
    ``shared``: the length of their common prefix, when known already."""
    if previous is not None and previous.array is not None:
        parsed = _extend(previous, body, shared)
        if parsed is not None:
            return parsed
    value = orjson.loads(body)
    return ParsedBody(body, value, _locate(body, value))


def _skip_space(data: bytes, at: int) -> int:
    while at < len(data) and data[at] in _SPACE:
        at += 1
    return at


def _element_ends(data: bytes, at: int, elements: list[Any]) -> tuple[list[int], int] | None:
    """The ``","``/``"]"`` after each of ``elements`` laid out from ``at`` (just after the
    ``[`` or a ``,``), and the offset of the ``]``; None when they are not there.

    Fast path: each element is its compact serialisation, compared byte for byte (what JSON
    encoders without spaces write); else the tokens are walked."""
    ends: list[int] = []
    start = at
    last = len(elements) - 1
    try:
        for number, element in enumerate(elements):
            at = _skip_space(data, at)
            text = orjson.dumps([element])[1:-1]  # in a list: orjson's depth limit as in place
            if not data.startswith(text, at):
                return _scan_ends(data, start, len(elements))
            at = _skip_space(data, at + len(text))
            if data[at:at + 1] != (b"]" if number == last else b","):
                return _scan_ends(data, start, len(elements))
            ends.append(at)
            at += 1
    except (orjson.JSONEncodeError, TypeError):
        return _scan_ends(data, start, len(elements))
    if elements:
        return ends, ends[-1]
    at = _skip_space(data, at)
    return (ends, at) if data[at:at + 1] == b"]" else None


def _scan_ends(data: bytes, at: int, count: int) -> tuple[list[int], int] | None:
    """``_element_ends`` by walking the tokens of a valid array's elements."""
    ends: list[int] = []
    depth = 0
    for match in _TOKEN.finditer(data, at):
        byte = data[match.start()]
        if byte in b"{[":
            depth += 1
        elif byte in b"}]":
            if depth == 0:  # the array's own "]"
                if count:
                    ends.append(match.start())
                return (ends, match.start()) if len(ends) == count else None
            depth -= 1
        elif byte == ord(",") and depth == 0:
            ends.append(match.start())
    return None


def _locate(body: bytes, value: Any) -> tuple[int, list[int], int] | None:
    """Where the top-level ``messages`` array of a valid JSON ``body`` lies (None: no such
    array, or an empty one).

    A ``"messages": [`` found in the bytes is that array when the body with it replaced by
    ``[]`` parses to the same value but for ``messages: []``: an array elsewhere (nested, in a
    string, the first of two ``messages`` keys) would leave the top-level non-empty array as it
    is."""
    messages = value.get(_MESSAGES) if isinstance(value, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    at = body.find(b'"messages"')
    while at >= 0:
        colon = _skip_space(body, at + len(b'"messages"'))
        opening = _skip_space(body, colon + 1)
        if body[colon:colon + 1] == b":" and body[opening:opening + 1] == b"[":
            located = _element_ends(body, opening + 1, messages)
            if located is not None and _only_difference(body, value, opening, located[1]):
                return opening, located[0], located[1]
        at = body.find(b'"messages"', at + 1)
    return None


def _only_difference(body: bytes, value: dict[str, Any], opening: int, closing: int) -> bool:
    """``body`` with ``body[opening:closing + 1]`` replaced by ``[]`` parses to ``value`` with
    ``messages: []``."""
    try:
        rest = orjson.loads(body[:opening] + b"[]" + body[closing + 1:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(rest, dict) and rest == {**value, _MESSAGES: []}


def _extend(previous: ParsedBody, body: bytes, shared: int | None) -> ParsedBody | None:
    """``body`` parsed from ``previous``; None when the difference is not inside the array."""
    assert previous.array is not None
    old = previous.body
    opening, ends, closing = previous.array
    prefix = common_prefix(old, body) if shared is None else shared
    if prefix == len(old) == len(body):
        return previous
    suffix = common_suffix(old, body, min(len(old), len(body)) - prefix)
    if opening >= prefix or closing < len(old) - suffix:
        return None
    closing_now = closing + len(body) - len(old)
    kept = bisect_right(ends, prefix)  # elements whose bytes (and what follows) are shared
    # The elements are parsed inside two brackets: at their depth in the body, and a text
    # that is not exactly a list of elements (it closes the array early, say) gives an outer
    # list of another length, or does not parse.
    if kept:
        at = _skip_space(body, ends[kept - 1])
        if at == closing_now:
            first = at
            text = b"[[]]"
        elif body[at] == ord(",") and _skip_space(body, at + 1) < closing_now:
            first = at + 1
            text = b"[[" + body[first:closing_now] + b"]]"
        else:
            return None
    else:
        first = opening + 1
        text = b"[" + body[opening:closing_now + 1] + b"]"
    try:
        outer = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if len(outer) != 1:
        return None
    added = outer[0]
    value = dict(previous.value)
    value[_MESSAGES] = previous.value[_MESSAGES][:kept] + added
    located = _element_ends(body, first, added)
    if located is None or located[1] != closing_now:
        return ParsedBody(body, value)
    return ParsedBody(body, value, (opening, ends[:kept] + located[0], closing_now))
