"""Record processors: content-encoding decoded on the record's copy, SSE split into events
stamped with the arrival of the network chunk that completed them."""

from __future__ import annotations

import base64
import copy
import gzip
import random
import re
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

import brotli
import httpx2
import orjson
import pytest

from benchmarks import record_growth
from otelproxy import config
from otelproxy.pipeline import Pipeline
from otelproxy.processors import (
    _event_end,
    default_processors,
    read_sse,
    redact_stream,
    split_sse,
)
from otelproxy.providers import decode_events
from otelproxy.record import Chunks, Event, Exchange, Record
from otelproxy.recorder import build_pipeline
from otelproxy.sessions import SessionTracker
from otelproxy.store import LocalStore
from tests import sse_golden
from tests.conftest import RunningProxy
from tests.fake_upstream import Reply, anthropic_sse
from tests.raw_upstream import RawUpstream, Slow

EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1"}}\n\n',
    b'event: ping\ndata: {"type": "ping"}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"h\xc3\xa9llo"}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


# -- split_sse ---------------------------------------------------------------------------------


def test_split_sse_cuts_at_blank_lines_and_keeps_every_byte() -> None:
    """SSE events end at a blank line (LF or CRLF) and concatenate back to the exact stream."""
    stream = (b"event: a\ndata: 1\n\n" b"data: 2\r\n\r\n" b": comment\n\n"
              b"event: b\r\ndata: 3\r\n\r\n" b"data: unterminated")
    events = split_sse([(7, stream)])
    assert [e.raw for e in events] == [
        b"event: a\ndata: 1\n\n", b"data: 2\r\n\r\n", b": comment\n\n",
        b"event: b\r\ndata: 3\r\n\r\n", b"data: unterminated",
    ]
    assert {e.ns for e in events} == {7}
    assert b"".join(e.raw for e in events) == stream


def test_an_event_is_stamped_when_its_last_byte_arrived() -> None:
    """An event carries the arrival time of the network chunk that completed it."""
    first, second = EVENTS[0], EVENTS[1] + EVENTS[3]
    chunks = [(10, first[:5]), (20, first[5:30]), (30, first[30:] + second[:4]), (40, second[4:])]
    assert split_sse(chunks) == [Event(30, EVENTS[0]), Event(40, EVENTS[1]),
                                 Event(40, EVENTS[3])]


def test_a_terminator_split_across_chunks_is_still_found() -> None:
    """'\\n' at the end of one chunk and '\\n' at the start of the next end the event there."""
    events = split_sse([(1, b"data: x\n"), (2, b"\ndata: y\n\n")])
    assert events == [Event(2, b"data: x\n\n"), Event(2, b"data: y\n\n")]


def test_split_sse_of_nothing_is_nothing() -> None:
    """No chunks, no events."""
    assert split_sse([]) == []


# -- through the proxy ---------------------------------------------------------------------------


def _head(content_type: str, encoding: str | None = None) -> bytes:
    extra = f"Content-Encoding: {encoding}\r\n" if encoding else ""
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{extra}"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _fetch_raw(proxy: RunningProxy, path: str = "/v1/messages") -> bytes:
    """POST through the proxy and return the body bytes as they came (no decompression)."""
    with httpx2.stream("POST", proxy.base() + path, content=b"{}",
                       headers={"accept-encoding": "identity"}) as answer:
        return b"".join(answer.iter_raw())


def _response(proxy: RunningProxy) -> dict[str, Any]:
    [response] = [e for e in proxy.entries() if e["type"] == "response"]
    return response


def test_sse_record_holds_one_chunk_per_event_not_per_network_write(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """Events split across network writes are recorded whole, stamped when complete."""
    halves = [part for event in EVENTS for part in (event[:9], event[9:])]
    raw_upstream.respond(Slow([_head("text/event-stream"), *map(_chunk, halves),
                               b"0\r\n\r\n"], delay=0.05))
    wire = _fetch_raw(raw_proxy)
    assert wire == b"".join(EVENTS)
    chunks = _response(raw_proxy)["chunks"]
    assert [c["raw"].encode() for c in chunks] == EVENTS
    # each event completed two writes after the previous one: ~0.1 s apart
    assert all(c["delta_ms"] >= 80 for c in chunks[1:]), [c["delta_ms"] for c in chunks]


def _compress(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    assert encoding == "br"
    return bytes(brotli.compress(data))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_sse_is_relayed_as_is_and_recorded_decoded(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream, encoding: str
) -> None:
    """A compressed SSE stream is relayed untouched and recorded as decoded events."""
    compressed = _compress(encoding, b"".join(EVENTS))
    pieces = [compressed[i:i + 7] for i in range(0, len(compressed), 7)]
    raw_upstream.respond(Slow([_head("text/event-stream", encoding), *map(_chunk, pieces),
                               b"0\r\n\r\n"], delay=0.001))
    assert _fetch_raw(raw_proxy) == compressed
    response = _response(raw_proxy)
    assert response["content_encoding"] == encoding
    assert response["size"] == len(compressed)
    assert response["decoded_size"] == len(b"".join(EVENTS))
    assert [c["raw"].encode() for c in response["chunks"]] == EVENTS


def test_compressed_json_body_is_recorded_decoded(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A gzip JSON answer is recorded as its decoded text (body), with the encoding noted."""
    body = orjson.dumps({"type": "message", "content": [{"type": "text", "text": "héllo"}]})
    compressed = gzip.compress(body)
    raw_upstream.respond(Slow([_head("application/json", "gzip"), _chunk(compressed[:10]),
                               _chunk(compressed[10:]), b"0\r\n\r\n"], delay=0.001))
    assert _fetch_raw(raw_proxy) == compressed
    response = _response(raw_proxy)
    assert response["body"] == body.decode() and "chunks" not in response
    assert response["content_encoding"] == "gzip" and response["size"] == len(compressed)


def test_unknown_content_encoding_is_kept_raw_with_a_note(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """An undecodable content-encoding is relayed as is and recorded raw with decode_error."""
    blob = b"\x28\xb5\x2f\xfd\x00\x58\x89\x00\x00" + bytes(range(200, 256))
    raw_upstream.respond(Slow([_head("application/json", "zstd"), _chunk(blob),
                               b"0\r\n\r\n"], delay=0.001))
    assert _fetch_raw(raw_proxy) == blob
    response = _response(raw_proxy)
    assert "zstd" in response["decode_error"]
    assert base64.b64decode(response["body"]) == blob


def test_a_non_sse_body_is_recorded_whole(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """A chunked application/json answer is one body in the record, not a chunk list."""
    parts = [b'{"a": ', b'"b", ', b'"c": 1}']
    raw_upstream.respond(Slow([_head("application/json"), *map(_chunk, parts), b"0\r\n\r\n"],
                              delay=0.001))
    assert _fetch_raw(raw_proxy) == b"".join(parts)
    response = _response(raw_proxy)
    assert response["body"] == '{"a": "b", "c": 1}' and "chunks" not in response


def test_redact_stream_joins_the_pieces_of_each_responses_text() -> None:
    """OpenAI Responses deltas: a key split across output_text deltas is obfuscated in the
    event where it starts, the rest of it removed from the others; other texts, the events'
    framing and a key whole in the final event are handled too."""
    key = "sk-proj-" + "R" * 50 + "RESP"
    text = f"the key {key} ok"
    deltas = [text[i:i + 6] for i in range(0, len(text), 6)]

    def event(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\r\ndata: " + orjson.dumps(data) + b"\r\n\r\n"

    raws = [event("response.output_text.delta",
                  {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                   "content_index": 0, "delta": piece, "sequence_number": n})
            for n, piece in enumerate(deltas)]
    raws.append(event("response.output_text.delta",
                      {"type": "response.output_text.delta", "item_id": "msg_2",
                       "output_index": 1, "content_index": 0, "delta": "sk-proj-"}))
    raws.append(event("response.completed", {"type": "response.completed", "response": {
        "object": "response", "output": [{"type": "message", "content": [
            {"type": "output_text", "text": text}]}]}}))
    events, payloads = redact_stream("openai", [Event(n, raw) for n, raw in enumerate(raws)],
                                     decode_events(raws))
    pieces = [p["delta"] for _, p in payloads[:len(deltas)]]
    assert "".join(pieces) == "the key sk-proj-...RESP ok"
    assert payloads[len(deltas)][1]["delta"] == "sk-proj-"  # another text: left as it is
    assert payloads[-1][1]["response"]["output"][0]["content"][0]["text"] == (
        "the key sk-proj-...RESP ok")
    for raw, (_, payload) in zip([e.raw for e in events], payloads, strict=True):
        assert raw.startswith(b"event: response.") and raw.endswith(b"\r\n\r\n")
        assert orjson.loads(raw.split(b"data: ", 1)[1]) == payload
    assert key.encode() not in b"".join(e.raw for e in events)
    assert [e.ns for e in events] == list(range(len(raws)))


# -- incremental work per turn: the record is the one the whole computation makes -------------

_ESCAPED_KEY = b"\\u0073k-ant-api03-" + b"E" * 30 + b"WXYZ"
_MARK = "@@ESCAPED@@"


def _random_sessions(seed: int, turns: int) -> list[Exchange]:
    """Two Claude Code lanes (a real first request each) interleaved, turn after turn: answers
    appended, markers moved, rewinds (branches), compaction, an old tool result cleared, keys
    in new text, keys cut where one body stops sharing bytes with the next, JSON-escaped
    keys."""
    rng = random.Random(seed)
    lanes = []
    for lane in ("lane-a", "lane-b"):
        body = orjson.loads(record_growth.FIRST_CALL.read_bytes())
        lanes.append((f"3c1d2b7e-5f00-4a8e-9d7c-{lane}", body))
    out: list[Exchange] = []
    now = time.monotonic_ns()
    for turn in range(turns):
        client_id, body = lanes[turn % 2] if turn in (30, 51) else rng.choice(lanes)
        messages = body["messages"]
        choice = {30: 0.0, 51: 0.1}.get(turn, rng.random())  # a rewind, a compaction at least
        if choice < 0.08 and len(messages) > 3:
            del messages[rng.randrange(2, len(messages) - 1):]  # a rewind: a branch
        elif choice < 0.12:
            messages[:] = [{"role": "user", "content": "This session is being continued from "
                            "a previous conversation. Summary: " + _MARK}]
        elif choice < 0.18 and len(messages) > 4:
            rng.choice(messages[2:])["content"] = "[Old tool result content cleared]"
        elif choice < 0.4 and str(messages[-1].get("content")).endswith(" sk"):
            messages[-1]["content"] += "-ant-api03-" + "S" * rng.randint(5, 40) + "WXYZ"
        for message in messages:
            content = message.get("content")
            for block in content if isinstance(content, list) else []:
                block.pop("cache_control", None)
        last = messages[-1].get("content")
        if isinstance(last, list) and last and isinstance(last[-1], dict):
            last[-1]["cache_control"] = {"type": "ephemeral"}
        request = orjson.dumps(body).replace(_MARK.encode(), _ESCAPED_KEY)
        blocks = [{"type": "text", "text": f"turn {turn} " + "w" * rng.randint(0, 300)}]
        events = anthropic_sse(Reply(blocks=blocks), body["model"])
        start = now + turn * 1_000_000_000
        out.append(Exchange(
            id=f"x-{turn:04d}", provider="anthropic", upstream_url="https://api.anthropic.com",
            method="POST", path="/v1/messages", query="beta=true",
            request_headers=[("content-type", "application/json"),
                             ("x-api-key", "sk-ant-api03-" + "b" * 86 + "-BBBBBBBB"),
                             ("X-Claude-Code-Session-Id", client_id)],
            request_body=request, started_wall=1_765_000_000 + turn, started_ns=start,
            forwarded_ns=start + 1000, status=200, reason="OK",
            response_headers=[("content-type", "text/event-stream")], headers_ns=start + 2000,
            chunks=Chunks.of((start + 3000 + n, event) for n, event in enumerate(events)),
            finished_ns=start + 10_000))
        messages.append({"role": "assistant", "content": blocks})
        text = " ".join(rng.choice(("fix", "the", "bug", "sk", "ant", "-")) for _ in range(40))
        if rng.random() < 0.3:
            text += " sk"  # the next turn may grow this into a key
        messages.append({"role": "user", "content": text})
    return out


def _record(log_dir: Path, exchanges: list[Exchange], *, incremental: bool) -> dict[str, Any]:
    """The record the recorder's pipeline writes for ``exchanges`` (with the incremental work
    per turn, or every body redacted, parsed, normalised and hashed whole), session ids
    replaced by their order of appearance."""
    cfg = config.build({"log_dir": str(log_dir)}, [])
    if incremental:
        pipeline = build_pipeline(cfg, {})
    else:
        sessions = SessionTracker(cfg.db_path, histories=0)
        pipeline = Pipeline([*default_processors(remembered=0), sessions],
                            [LocalStore(cfg.log_dir, sessions)])
    for at in range(0, len(exchanges), 5):
        pipeline.handle_batch(list(copy.deepcopy(exchanges[at:at + 5])))
    pipeline.close(30)
    conn = sqlite3.connect(log_dir / "sessions.db")
    ids: dict[str, str] = {}
    for (session_id,) in conn.execute("SELECT session_id FROM exchanges ORDER BY rowid"):
        for found in re.findall(r"\d{8}-\d{6}-[0-9a-f]{4}", session_id or ""):
            ids.setdefault(found, f"session-{len(ids)}")

    def mapped(text: str) -> str:
        return re.sub(r"\d{8}-\d{6}-[0-9a-f]{4}", lambda m: ids[m.group()], text)
    rows = [mapped(repr(row)) for row in conn.execute("SELECT * FROM exchanges ORDER BY rowid")]
    conn.close()
    files = {mapped(str(path.relative_to(log_dir))): mapped(path.read_text())
             for path in sorted(log_dir.rglob("*.jsonl"))}
    return {"files": files, "rows": rows}


@pytest.mark.parametrize("seed", [1, 2])
def test_the_incremental_record_is_byte_for_byte_the_whole_computation(
        tmp_path: Path, seed: int) -> None:
    """Bodies redacted and parsed from the previous one, histories normalised and hashed on from
    the previous turn: the JSONL files and index rows are the bytes the whole computation
    writes, over two lanes with rewinds, compaction, cleared results and keys at every boundary;
    and no key reaches the record whole."""
    exchanges = _random_sessions(seed, 70)
    incremental = _record(tmp_path / "incremental", exchanges, incremental=True)
    whole = _record(tmp_path / "whole", exchanges, incremental=False)
    assert incremental == whole
    text = "".join(incremental["files"].values())
    assert "_b1" in text and '"compaction":"compacted"' in text  # the history had both
    assert "SSSSSWXYZ" not in text and "EEEEEWXYZ" not in text and "sk-ant-...WXYZ" in text


@pytest.mark.parametrize("seed", range(4))
def test_the_quick_split_agrees_with_the_general_terminator_search(seed: int) -> None:
    """``split_sse`` cuts where the general terminator search (``\\n\\n``, ``\\r\\n\\r\\n``,
    ``\\r\\r``) cuts, stamps each event with its chunk and keeps every byte, with and without
    CR in the stream, cut into chunks anywhere."""
    rng = random.Random(seed)
    pieces = [b"event: ", b"data: ", b'{"t":"', b'"}', b"\n", b"\r", b"\r\n", b"\n\n", b"  ",
              b"\xc3\xa9", b"ping", b"[DONE]"]
    if seed % 2:  # streams without CR: only "\n\n" ends an event
        pieces = [piece for piece in pieces if b"\r" not in piece]
    stream = b"".join(rng.choice(pieces) for _ in range(2000))
    cuts = sorted(rng.sample(range(len(stream)), 40))
    chunks = [(n, stream[a:b]) for n, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(stream)],
                                                              strict=True))]
    events = split_sse(chunks)
    assert b"".join(e.raw for e in events) == stream
    expected, pending, start = [], b"", 0
    for ns, data in chunks:  # the general search alone
        pending, start = pending + data, 0
        while (cut := _event_end(pending, start)) >= 0:
            expected.append((ns, pending[start:cut]))
            start = cut
        pending = pending[start:]
    expected += [(chunks[-1][0], pending)] if pending else []
    assert [(e.ns, e.raw) for e in events] == expected


@pytest.mark.parametrize("seed", range(6))
def test_read_sse_gives_the_events_and_payloads_of_split_sse_and_decode_events(seed: int) -> None:
    """The one-pass reader cuts, stamps and decodes as ``split_sse`` then ``decode_events`` do:
    usual events and others (comments, several data lines, no ``event:``, empty data, not
    JSON, not UTF-8, a rest without terminator), with and without CR, in chunks cut anywhere,
    empty chunks included."""
    rng = random.Random(seed)
    events = [*EVENTS, b"data: [DONE]\n\n", b": keep-alive\n\n", b"event: x\ndata: \n\n",
              b"event: y\ndata: {\"a\":\ndata: 1}\n\n", b"event:z\ndata:{\"b\":2}\n\n",
              b"event: e\ndata: \xff\xfe\n\n", b"event: e\ndata: {\"c\":\"\xff\"}\n\n",
              b"\n\n", b"\n\n\n", b"event: content_block_delta\r\ndata: {}\r\n\r\n"]
    if seed % 2:  # streams without CR: the quick path
        events = [event for event in events if b"\r" not in event]
    stream = b"".join(rng.choice(events) for _ in range(300)) + (b"data: 1" if seed % 3 else b"")
    cuts = sorted(rng.choices(range(len(stream) + 1), k=60))
    chunks = Chunks.of([*((n, stream[a:b]) for n, (a, b) in
                          enumerate(zip([0, *cuts], [*cuts, len(stream)], strict=True))),
                        (99, b"")])
    expected = split_sse(chunks)
    assert read_sse(chunks) == (expected, decode_events([event.raw for event in expected]))


def test_a_key_split_as_s_and_k_across_deltas_is_redacted() -> None:
    """A key whose "s" ends one delta and "k-…" starts the next (no "sk" in any event's bytes)
    is still obfuscated in the record."""
    key = "sk-ant-api03-" + "P" * 30 + "WXYZ"
    events = [Event(n, b'event: content_block_delta\ndata: ' + orjson.dumps(
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": text}}) + b"\n\n")
        for n, text in enumerate(["my key is s", key[1:], " ok"])]
    out, _ = redact_stream("anthropic", events, decode_events([e.raw for e in events]))
    assert key[1:].encode() not in b"".join(e.raw for e in out)
    assert b"sk-ant-...WXYZ" in b"".join(e.raw for e in out)


# -- golden records ----------------------------------------------------------------------------


def test_sse_records_match_the_golden_ones_byte_for_byte() -> None:
    """Varied streams (``tests.sse_golden``: Anthropic and OpenAI, CRLF, split chunks, errors,
    unknown events, keys in pieces, gzip) give the same events, payloads, reassembled message,
    notes and response entry, serialized byte for byte, as main's code did before the SSE path
    was rewritten."""
    golden = orjson.loads(sse_golden.GOLDEN.read_bytes())
    produced = {name: sse_golden.summary(exchange) for name, exchange in sse_golden.cases()}
    assert produced.keys() == golden.keys()
    differing = [name for name in golden if produced[name] != golden[name]]
    assert differing == []


def test_sse_lines_end_only_at_cr_and_lf_so_unicode_line_separators_stay_in_the_text() -> None:
    """A delta whose text holds U+2028, U+2029 or U+0085 (legal unescaped in JSON, line breaks
    to ``str.splitlines``) is decoded whole and reassembled into the message, as the SSE spec
    ends lines only at CRLF, CR or LF."""
    text = "a\u2028b\u2029c\x85d"
    events = [sse_golden._start(), sse_golden._block(0, {"type": "text", "text": ""}),
              sse_golden._delta(0, "text_delta", "text", text),
              sse_golden._delta(0, "text_delta", "text", "!"), sse_golden._stop(0),
              *sse_golden._tail()]
    exchange = Exchange(
        id="u2028", provider="anthropic", upstream_url="https://a.example", method="POST",
        path="/v1/messages", query="", request_headers=[("content-type", "application/json")],
        request_body=orjson.dumps({"model": "m", "stream": True, "messages": []}), status=200,
        response_headers=[("content-type", "text/event-stream")],
        chunks=Chunks.of(enumerate(events)))
    record = Record(exchange=exchange)
    for processor in default_processors():
        processor(record)
    assert record.payloads[2][1]["delta"]["text"] == text
    assert record.parsed.output_message == {
        "role": "assistant", "content": [{"type": "text", "text": text + "!"}]}
    assert record.notes == []
