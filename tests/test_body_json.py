"""A request body parsed from the previous one of its conversation: always the value
``orjson.loads`` gives the whole body, the same objects for the messages that did not change."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from otelproxy.body_json import ParsedBody, parse_body


def _message(rng: random.Random, turn: int) -> dict[str, Any]:
    text = "".join(rng.choice(["word ", "é", '"', "\\", "\n", "[", "]", "{", ",", "ü€"])
                   for _ in range(rng.randint(0, 12)))
    if rng.random() < 0.1:  # any JSON value: the array's elements are not always objects
        return rng.choice([turn, turn * 10 + 1, -turn / 8, text, [turn], None])
    if rng.random() < 0.3:
        return {"role": "user", "content": f"turn {turn} {text}"}
    return {"role": rng.choice(["user", "assistant", "system"]), "content": [
        {"type": "text", "text": text, **({"n": rng.random()} if rng.random() < 0.2 else {})},
        {"type": "tool_use", "id": f"t{turn}", "input": {"a": [1, 2.5, None, True]}}]}


def _serialise(rng: random.Random, document: dict[str, Any], style: int) -> bytes:
    if style == 0:
        return orjson.dumps(document)
    if style == 1:
        return json.dumps(document).encode()  # ", " and ": ", \u escapes (the Python SDKs)
    return json.dumps(document, indent=1, ensure_ascii=False).encode()


def _next(rng: random.Random, document: dict[str, Any], turn: int) -> None:
    """One turn: grow, rewind, compact, edit an old message, move a marker, change the rest."""
    messages = document["messages"]
    choice = rng.random()
    if choice < 0.5:
        messages += [_message(rng, turn) for _ in range(rng.randint(1, 2))]
    elif choice < 0.6 and messages:
        del messages[rng.randint(0, len(messages) - 1):]
    elif choice < 0.65:
        messages[:] = [{"role": "user", "content": "This session is being continued"}]
    elif choice < 0.75 and messages:
        messages[rng.randrange(len(messages))] = _message(rng, turn)
    elif choice < 0.8 and messages and isinstance(messages[-1], dict):
        messages[-1]["cache_control"] = {"type": "ephemeral"}
    elif choice < 0.9:
        document["system"] = f"system {turn}"
    else:
        document["max_tokens"] = turn


@pytest.mark.parametrize("style", [0, 1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_a_body_parsed_from_the_previous_one_equals_the_whole_parse(seed: int, style: int) -> None:
    """Over random histories (growth, rewinds, compaction, edits of old messages, changes
    outside the array) in three JSON styles, the value equals ``orjson.loads`` of the body."""
    rng = random.Random(seed)
    document: dict[str, Any] = {"model": "m", "messages": [], "system": "s", "tools": [{}]}
    previous: ParsedBody | None = None
    for turn in range(150):
        _next(rng, document, turn)
        body = _serialise(rng, document, style)
        previous = parse_body(body, previous)
        assert previous.value == orjson.loads(body)


def test_unchanged_messages_are_the_same_objects_and_a_turn_parses_only_what_it_adds() -> None:
    """The messages a body shares byte for byte with the previous one are the previous parse's
    objects (the session processor relies on it); changed ones are new objects."""
    messages: list[Any] = [{"role": "user", "content": f"m{n}"} for n in range(5)]
    first = parse_body(orjson.dumps({"model": "m", "messages": messages, "tools": []}))
    messages[3] = {"role": "user", "content": "edited"}
    messages.append({"role": "assistant", "content": "new"})
    second = parse_body(orjson.dumps({"model": "m", "messages": messages, "tools": []}), first)
    assert second.value["messages"] == messages
    old, new = first.value["messages"], second.value["messages"]
    assert all(new[n] is old[n] for n in range(3))
    assert new[3] is not old[3] and new[4] is not old[4]


@pytest.mark.parametrize("tail", [
    b'{"role":"user"}, ]}', b'{"role":"user"} {"role":"user"}]}', b'{"role":"user"]}',
    b'{"role":"user"}],"messages":[]}', b'{"role":"\xff"}]}', b'{"role":"user"}]} x',
])
def test_an_invalid_or_ambiguous_next_body_behaves_as_a_whole_parse(tail: bytes) -> None:
    """A next body that is not valid JSON raises as ``orjson.loads`` does; one with the key
    twice gives orjson's value (the last one)."""
    first = parse_body(b'{"model":"m","messages":[{"role":"user"}]}')
    _assert_like_whole_parse(b'{"model":"m","messages":[{"role":"user"},' + tail, first)


def _assert_like_whole_parse(body: bytes, first: ParsedBody,
                             compare: Any = lambda value: value) -> None:
    """``parse_body(body, first)`` raises as ``orjson.loads(body)`` does, or gives its value
    (as ``compare`` sees them)."""
    try:
        expected = orjson.loads(body)
    except orjson.JSONDecodeError:
        with pytest.raises(orjson.JSONDecodeError):
            parse_body(body, first)
        return
    assert compare(parse_body(body, first).value) == compare(expected)


@pytest.mark.parametrize("body", [
    b'{"messages":[{"a":1}],"x":{"messages":[{"b":2}]},"messages":[{"b":2}]}',
    b'{"x":{"messages":[{"b":2}]},"messages":[{"b":2}]}',
    b'{"x":"\\"messages\\":[{\\"b\\":2}]","messages":[{"b":2}]}',
    b'{"messages":[{"b":2}],"messages":[{"b":2}]}',
    b'{"messages":[],"x":{"messages":[]}}',
    b'{"x":{"messages":[]},"messages":[]}',
])
def test_arrays_that_only_look_like_the_messages_change_nothing(body: bytes) -> None:
    """A ``messages`` key twice (orjson keeps the last), a nested or quoted ``"messages":[``,
    an empty array: whichever of them the next body changes, the value is orjson's."""
    parsed = parse_body(body)
    assert parsed.value == orjson.loads(body)
    for at in range(len(body)):
        if body[at:at + 1] == b"]":  # an element added to whichever array closes here
            changed = body[:at] + (b"" if body[at - 1:at] == b"[" else b",") + b'{"c":3}' \
                + body[at:]
            _assert_like_whole_parse(changed, parsed)


def test_deeply_nested_messages_fail_where_a_whole_parse_fails() -> None:
    """orjson's nesting limit holds as in a whole parse: the new part is parsed at its own
    depth."""
    first = parse_body(b'{"messages":[1]}')
    for depth in (1021, 1022, 1023):
        body = b'{"messages":[1,' + b"[" * depth + b"]" * depth + b"]}"
        _assert_like_whole_parse(body, first, _nesting)


def _nesting(value: Any) -> tuple[int, int]:
    """``(messages, depth of the last one)`` of a parsed body (no recursion: == would hit
    Python's recursion limit on these)."""
    messages = value["messages"]
    depth, inner = 0, messages[-1]
    while isinstance(inner, list):
        depth, inner = depth + 1, inner[0] if inner else None
    return len(messages), depth


@pytest.mark.parametrize(("before", "after"), [
    (b"12", b"13"), (b"1", b"1.5"), (b'"ab"', b'"ac"'), (b'{"a":1}', b'{"a":1 }'),
    (b"true", b"true "), (b"[1]", b"[1,2]"),
])
def test_an_element_whose_last_bytes_changed_is_parsed_anew(before: bytes, after: bytes) -> None:
    """An element is reused only when all its bytes, up to the delimiter after it, are shared."""
    first = parse_body(b'{"messages":[' + before + b',{"a":1}],"tools":[]}')
    body = b'{"messages":[' + after + b',{"a":1}],"tools":[]}'
    assert parse_body(body, first).value == orjson.loads(body)
