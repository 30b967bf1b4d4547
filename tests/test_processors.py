"""Record processors: content-encoding decoded on the record's copy, SSE split into events
stamped with the arrival of the network chunk that completed them."""

from __future__ import annotations

import base64
import gzip
import zlib
from typing import Any

import brotli
import httpx2
import orjson
import pytest

from otelproxy.processors import redact_stream, split_sse
from otelproxy.record import Event
from tests.conftest import RunningProxy
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
    events, payloads = redact_stream("openai", [Event(n, raw) for n, raw in enumerate(raws)])
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
