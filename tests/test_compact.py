"""Request bodies as deltas: real Claude Code bodies rebuilt byte for byte."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import orjson
import pytest

from otelproxy.compact import (
    CHECKPOINT,
    DeltaEncoder,
    DeltaError,
    Handed,
    Recent,
    Sha256Prefixes,
    common_prefix,
    common_suffix,
    diff,
    rebuild,
    request_body,
    sha256,
)

SAMPLES = Path(__file__).parent / "data" / "claude_code"


def claude_bodies() -> list[bytes]:
    """Three consecutive request bodies of one real Claude Code session (tool loop, --continue)."""
    return [(SAMPLES / name).read_bytes() for name in
            ("01_first_call.json", "02_tool_result_call.json", "03_continue_call.json")]


def test_prefix_and_suffix_are_found_across_block_boundaries():
    """Common prefix/suffix lengths are exact wherever the first difference falls."""
    base = bytes(range(256)) * 1024  # 256 KiB: several compare blocks
    for at in (0, 1, 65535, 65536, 65537, 200_000, len(base) - 1):
        changed = base[:at] + b"\xff" + base[at + 1:] if base[at] != 0xFF else base[:at] + b"\x00" \
            + base[at + 1:]
        assert common_prefix(base, changed) == at
        assert common_suffix(base, changed, len(base)) == len(base) - at - 1
    assert common_prefix(base, base) == len(base)
    assert common_suffix(base, base + b"x", len(base)) == 0


def test_claude_code_turns_rebuild_exactly_from_small_deltas():
    """Each real turn rebuilds byte for byte from the previous one; what it inserts is the new
    turn (and the system entry Claude Code rewrote), not the 40 KB of history, tools, system."""
    first, second, third = claude_bodies()
    for base, body in ((first, second), (second, third)):
        ops = diff(base, body)
        assert rebuild(base, ops) == body
        inserted = sum(len(op.encode()) for op in ops if isinstance(op, str))
        assert inserted < len(body) // 4
    ops = diff(second, third)
    assert next(op for op in ops if isinstance(op, str)).count('"role":"user"') == 1


def test_several_edits_and_multibyte_text_round_trip():
    """Edits in several places (an old tool result cleared, a marker moved, text appended in
    UTF-8 with multi-byte characters at the cut points) still rebuild exactly."""
    messages = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}",
                                              "content": f"résultat {i} " + "é" * 300}]}
                for i in range(40)]
    body = {"model": "m", "messages": messages, "tools": [{"name": "Bash", "d": "ü" * 2000}]}
    base = orjson.dumps(body)
    messages[3]["content"][0]["content"] = "[Old tool result content cleared]"
    messages[30]["content"][0]["cache_control"] = {"type": "ephemeral"}
    messages.append({"role": "user", "content": "ça marche — 完了"})
    edited = orjson.dumps(body)
    ops = diff(base, edited)
    assert rebuild(base, ops) == edited
    assert sum(len(op) for op in ops if isinstance(op, str)) < len(edited) // 10


def test_encoder_keeps_one_base_per_conversation_and_falls_back_whole():
    """First body whole; the next a delta naming its base; a body unlike its base, a non-UTF-8
    body or an evicted conversation is recorded whole."""
    first, second, third = claude_bodies()
    encoder = DeltaEncoder()
    assert encoder.encode("s1", "e1", first) is None
    fields = encoder.encode("s1", "e2", second)
    assert fields is not None and fields["body_delta"]["base"] == "e1"
    assert fields["body_sha256"] == sha256(second)
    assert encoder.encode("s1", "e3", b'{"completely": "different"}' * 10) is None
    assert encoder.encode("s1", "e4", b"\xff\xfe" + third[2:]) is None
    assert encoder.encode("s2", "e5", third, fallback="s1") is not None  # a branch's parent
    small = DeltaEncoder(max_bytes=len(second) + 10)
    small.encode("a", "x1", first)
    small.encode("b", "x2", second)  # evicts "a"
    assert small.encode("a", "x3", second) is None


def test_request_body_follows_the_chain_and_checks_the_hash():
    """request_body rebuilds through a chain of bases; a wrong hash or op is a DeltaError."""
    bodies = claude_bodies()
    encoder = DeltaEncoder()
    entries: dict[str, dict] = {}
    for n, body in enumerate(bodies):
        entry = {"exchange_id": f"e{n}", "body": body.decode()}
        fields = encoder.encode("s", f"e{n}", body)
        if fields:
            del entry["body"]
            entry.update(fields)
        entries[f"e{n}"] = entry
    assert "body_delta" in entries["e2"] and entries["e2"]["body_delta"]["base"] == "e1"
    assert request_body(entries["e2"], entries.__getitem__) == bodies[2]
    entries["e2"]["body_sha256"] = "0" * 64
    with pytest.raises(DeltaError, match="does not match"):
        request_body(entries["e2"], entries.__getitem__)
    with pytest.raises(DeltaError, match="outside"):
        rebuild(b"abc", [[2, 5]])


def test_a_digest_taken_on_from_the_previous_body_is_the_whole_digest():
    """``Sha256Prefixes`` from the previous body's states gives ``sha256`` of the new body,
    wherever their shared prefix ends (inside, at and across ``CHECKPOINT`` boundaries), and
    even when told it shares more than it does not by a byte less; the same digest as OpenSSL's
    (``hashlib``), which the recorder does not load."""
    rng = random.Random(5)
    body = rng.randbytes(CHECKPOINT * 3 + 17)
    previous = Sha256Prefixes(body)
    assert previous.digest == sha256(body)
    for _ in range(60):
        at = rng.choice([0, 1, CHECKPOINT - 1, CHECKPOINT, CHECKPOINT + 1, len(body) // 2,
                         rng.randrange(len(body) + 1)])
        new = body[:at] + rng.randbytes(rng.randint(0, CHECKPOINT + 5))
        current = Sha256Prefixes(new, previous, common_prefix(body, new))
        assert current.digest == sha256(new) == hashlib.sha256(new).hexdigest()
        body, previous = new, current


def test_recent_finds_the_body_sharing_the_longest_prefix_within_its_bounds():
    """``Recent`` gives the remembered body of a key sharing the longest prefix with a new one
    (and that length), keeps a few per key, and forgets beyond its byte budget."""
    recent: Recent[str] = Recent(max_bytes=1000, per_key=2)
    recent.keep("k", b"aaaa-one", "one")
    recent.keep("k", b"aaab-two", "two")
    assert recent.find("k", b"aaab-three") == ("two", 6)
    assert recent.find("k", b"aaaa-four") == ("one", 5)
    assert recent.find("k", b"zzz") is None and recent.find("other", b"aaaa") is None
    recent.keep("k", b"aaac-five", "five", replaces="one")
    assert recent.find("k", b"aaaa-one") == ("five", 3)  # "one" was replaced; newest first
    recent.keep("k", b"aaad-six", "six")
    assert recent.find("k", b"aaab-two") == ("six", 3)  # two a key at most: "two" went
    recent.keep("other", b"x" * 990, "big")
    assert recent.find("k", b"aaad-six") is None  # over the budget: the oldest key went
    assert recent.find("other", b"xx") == ("big", 2)
    assert Recent[str](max_bytes=0).derive("k", b"body", lambda body, old, shared: "made") == \
        "made"


def test_handed_bodies_come_back_exact_held_as_what_they_add_to_a_recent_one():
    """``Handed`` gives back each body byte for byte: one with no similar body before it is
    held whole; one sharing most of a taken body's bytes is held as the bytes between their
    common prefix and suffix (the base shared, not copied); the same bytes again come back as
    the very object taken before; an id never handed gives None."""
    rng = random.Random(7)
    handed = Handed()
    first = b'{"messages":[' + bytes(rng.choice(b"abcdef") for _ in range(40_000)) + b"]}"
    handed.hold("e1", "conversation", first)
    assert handed.take("e1") == first
    second = first[:-2] + b',"and more"]}'
    handed.hold("e2", "conversation", second)
    [(key, held)] = handed._held.values()
    assert key == "conversation" and not isinstance(held, bytes)
    assert held.base is first and len(held.middle) < 20
    got = handed.take("e2")
    assert got == second
    again = bytes(bytearray(second))  # the same bytes, another object
    handed.hold("e3", "conversation", again)
    assert handed.take("e3") is got
    unlike = bytes(rng.randrange(256) for _ in range(30_000))
    handed.hold("e4", "conversation", unlike)
    assert handed._held["e4"][1] is unlike and handed.take("e4") == unlike
    assert handed.take("e1") is None and len(handed) == 0


def test_a_body_held_whole_is_remembered_once():
    """A body held whole is a base from the moment it is held; taken, it is not remembered a
    second time (which would count its bytes twice against the budget and push out another
    base)."""
    handed = Handed(max_bytes=100_000)
    body = b'{"messages":[' + b"x" * 40_000 + b"]}"
    handed.hold("e1", "k", body)
    assert handed.take("e1") is body
    assert handed._recent._bytes == len(body)
    assert [item for _, item in handed._recent._items["k"]] == [body]
