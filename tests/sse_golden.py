"""Varied SSE streams and what the recorder makes of them, for the golden-record test.

``cases()`` builds deterministic exchanges (Anthropic text, thinking, tool_use with partial
JSON, citations, unknown deltas and events, errors mid-stream, OpenAI chat and Responses
streams, CRLF and CR line ends, comments, multi-line data, invalid UTF-8, keys split across
deltas, gzip, each cut into network chunks at random places). ``summary(case)`` runs one
through the decode and provider processors and serializes every field the record is made of
(events and body by hash, payloads, the reassembled message, usage, notes and the response
entry with its chunk entries) with orjson, key order included.
``tests/data/sse_golden.json`` holds the summaries main's code gave before the SSE path was
rewritten; regenerate only on purpose:

    .venv/bin/python -m tests.sse_golden --write
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import random
import sys
from pathlib import Path
from typing import Any

import orjson

from otelproxy.processors import default_processors
from otelproxy.providers import UNDECODABLE
from otelproxy.record import Chunks, Exchange, Record
from otelproxy.store import response_entry

GOLDEN = Path(__file__).parent / "data" / "sse_golden.json"
KEY = "sk-ant-api03-" + "Q" * 86 + "-QQQQQQQQ"
OPENAI_KEY = "sk-proj-" + "Z" * 40
Json = dict[str, Any]


def ev(name: str | None, data: Any, *, space: bool = True) -> bytes:
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    return head + (b"data: " if space else b"data:") + payload + b"\n\n"


def _delta(index: int, kind: str, key: str, value: Any) -> bytes:
    return ev("content_block_delta", {"type": "content_block_delta", "index": index,
                                      "delta": {"type": kind, key: value}})


def _start(message_id: str = "msg_1") -> bytes:
    return ev("message_start", {"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})


def _block(index: int, block: Json) -> bytes:
    return ev("content_block_start", {"type": "content_block_start", "index": index,
                                      "content_block": block})


def _stop(index: int) -> bytes:
    return ev("content_block_stop", {"type": "content_block_stop", "index": index})


def _tail(reason: str = "end_turn") -> list[bytes]:
    return [ev("message_delta", {"type": "message_delta",
                                 "delta": {"stop_reason": reason, "stop_sequence": None},
                                 "usage": {"output_tokens": 42}}),
            ev("message_stop", {"type": "message_stop"})]


def _words(rng: random.Random, n: int) -> str:
    vocabulary = ("alpha", "beta", "é", "ü", "日本", "\\", '"', "\n", "\t", "😀", "x", " ")
    return "".join(rng.choice(vocabulary) for _ in range(n))


def anthropic_streams(rng: random.Random) -> dict[str, list[bytes]]:
    text = [_words(rng, 5) for _ in range(40)]
    tool_json = '{"path": "/tmp/a b", "limit": 3, "nested": {"k": [1, 2, "é"]}}'
    cuts = sorted(rng.sample(range(1, len(tool_json)), 6))
    fragments = [tool_json[a:b] for a, b in zip([0, *cuts], [*cuts, len(tool_json)],
                                                 strict=True)]
    key_pieces = [KEY[:10], KEY[10:50], KEY[50:]]
    return {
        "text": [_start(), _block(0, {"type": "text", "text": ""}),
                 ev("ping", {"type": "ping"}),
                 *(_delta(0, "text_delta", "text", t) for t in text), _stop(0), *_tail()],
        "thinking_then_tool": [
            _start(), _block(0, {"type": "thinking", "thinking": "", "signature": ""}),
            *(_delta(0, "thinking_delta", "thinking", t) for t in text[:8]),
            _delta(0, "signature_delta", "signature", "sig1"),
            _delta(0, "signature_delta", "signature", "sig2"), _stop(0),
            _block(1, {"type": "text", "text": "pre"}),
            _delta(1, "text_delta", "text", "fix"), _stop(1),
            _block(2, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}),
            *(_delta(2, "input_json_delta", "partial_json", f) for f in fragments), _stop(2),
            _block(3, {"type": "tool_use", "id": "toolu_2", "name": "Ls", "input": {}}),
            _stop(3),
            _block(4, {"type": "server_tool_use", "id": "srv", "name": "web", "input": {}}),
            _delta(4, "input_json_delta", "partial_json", '{"q": '),
            _delta(4, "input_json_delta", "partial_json", "broken"), _stop(4),
            *_tail("tool_use")],
        "odd_blocks": [
            _start(), _delta(0, "text_delta", "text", "before start"),
            _block(1, {"type": "text", "text": "a"}),
            _delta(1, "citations_delta", "citation", {"url": "u", "cited_text": "c"}),
            _delta(1, "text_delta", "text", "b"), _delta(1, "mystery_delta", "x", 1),
            _delta(1, "text_delta", "text", 7), _stop(1),
            _block(2, {"type": "text", "text": "first"}), _delta(2, "text_delta", "text", "1"),
            _block(2, {"type": "text", "text": "second"}), _delta(2, "text_delta", "text", "2"),
            _stop(2),
            _block(3, {"type": "redacted_thinking", "data": "opaque"}), _stop(3),
            _block(5, {"type": "text"}), _delta(5, "thinking_delta", "thinking", "t"),
            _delta(5, "text_delta", "text", "late"),
            _block(6, {"type": "mystery"}),
            _delta(6, "input_json_delta", "partial_json", '{"a": 1}'),
            _delta(6, "input_json_delta", "partial_json", ""),
            _delta(7, "input_json_delta", "partial_json", '[1'),
            ev("content_block_delta", {"type": "content_block_delta", "index": "1",
                                       "delta": {"type": "text_delta", "text": "str index"}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": True,
                                       "delta": {"type": "text_delta", "text": "bool"}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                       "delta": "not a dict"}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                       "delta": {"type": "text_delta"}}),
            ev("brand_new", {"type": "brand_new", "x": [1]}),
            ev("content_block_delta", ["a", "list"]), ev("content_block_delta", b"17"),
            ev("named_only", {"no_type": True}), ev("not_json", b"{oops"),
            b"event: empty\n\n", b": a comment\n\n", b"id: 7\nretry: 10\n\n",
            *_tail()],
        "unhashable": [
            _start(), _block(0, {"type": "text", "text": ""}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": ["text_delta"], "text": "l"}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": {"a": 1}, "text": "d"}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": ["text_delta", "text"]}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": None}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": 1.5}}),
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "thinking_delta"}}),
            ev("content_block_delta", {"type": ["content_block_delta"], "index": 0}),
            ev("content_block_delta", b'"content_block_delta"'),
            ev("content_block_delta", b"null"), _stop(0), *_tail()],
        "unhashable_index": [
            _start(), ev("content_block_delta", {"type": "content_block_delta", "index": [0],
                                                 "delta": {"type": "text_delta", "text": "x"}}),
            *_tail()],
        "text_null_at_start": [
            _start(), _block(0, {"type": "text", "text": None}),
            _delta(0, "text_delta", "text", "x"), _stop(0), *_tail()],
        "interleaved_blocks": [
            _start(), _block(0, {"type": "text", "text": ""}),
            _block(1, {"type": "thinking", "thinking": ""}),
            *(_delta(i % 2, "text_delta" if i % 2 == 0 else "thinking_delta",
                     "text" if i % 2 == 0 else "thinking", t) for i, t in enumerate(text[:12])),
            _delta(0, "thinking_delta", "thinking", "t0"), _delta(0, "text_delta", "text", "z"),
            _block(0, {"type": "text", "text": "restart"}), _delta(0, "text_delta", "text", "!"),
            _stop(0), _stop(1), *_tail()],
        "error_mid_stream": [
            _start(), _block(0, {"type": "text", "text": ""}),
            *(_delta(0, "text_delta", "text", t) for t in text[:5]),
            ev("error", {"type": "error", "error": {"type": "overloaded_error",
                                                   "message": "Overloaded"}})],
        "error_only": [ev("error", {"type": "error", "error": {"type": "api_error",
                                                               "message": "boom"}})],
        "no_message_start": [_block(0, {"type": "text", "text": ""}),
                             _delta(0, "text_delta", "text", "x"), _stop(0),
                             ev("message_delta", {"type": "message_delta",
                                                  "delta": {"stop_reason": "max_tokens"},
                                                  "usage": "bad"})],
        "unknown_before_start": [ev("future", {"type": "future"}), _start(),
                                 ev("future", {"type": "future", "n": 2}), *_tail()],
        "key_in_pieces": [
            _start(), _block(0, {"type": "text", "text": ""}),
            *(_delta(0, "text_delta", "text", "the key is " + p if i == 0 else p)
              for i, p in enumerate(key_pieces)),
            _delta(0, "text_delta", "text", f" and whole: {KEY}."), _stop(0),
            _block(1, {"type": "tool_use", "id": "t", "name": "Bash", "input": {}}),
            _delta(1, "input_json_delta", "partial_json", '{"env": "' + KEY[:30]),
            _delta(1, "input_json_delta", "partial_json", KEY[30:] + '"}'), _stop(1),
            *_tail()],
        "key_escaped": [_start(), _block(0, {"type": "text", "text": ""}),
                        ev("content_block_delta",
                           b'{"type":"content_block_delta","index":0,"delta":{"type":'
                           b'"text_delta","text":"\\u0073k-ant-api03-' + b"W" * 86
                           + b'-WWWWWWWW"}}'), _stop(0), *_tail()],
        "crlf": [e.replace(b"\n", b"\r\n") for e in
                 [_start(), _block(0, {"type": "text", "text": ""}),
                  *(_delta(0, "text_delta", "text", t) for t in text[:6]), _stop(0), *_tail()]],
        "cr_only": [e.replace(b"\n", b"\r") for e in
                    [_start(), _block(0, {"type": "text", "text": ""}),
                     _delta(0, "text_delta", "text", "cr"), _stop(0), *_tail()]],
        "mixed_line_ends": [_start(),
                            b"event: content_block_start\r\ndata: " + orjson.dumps(
                                {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}) + b"\r\n\r\n",
                            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                            b"\n" b"data: \"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":"
                            b"\"multi\"}}\n\n",
                            b"event:content_block_delta\ndata:" + orjson.dumps(
                                {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": " nospace"}}) + b"\n\n",
                            b"event:  spaced  \ndata:  {\"type\":\"content_block_delta\","
                            b"\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}"
                            b"   \n\n",
                            b"data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":"
                            b"{\"type\":\"text_delta\",\"text\":\"nameless\"}}\n\n",
                            b"event: content_block_delta\n: comment inside\ndata: "
                            b"{\"type\":\"content_block_delta\",\"index\":0,\"delta\":"
                            b"{\"type\":\"text_delta\",\"text\":\"c\"}}\nid: 3\n\n",
                            b"data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":"
                            b"{\"type\":\"text_delta\",\"text\":\"bad \xff\xfe utf8\"}}\n\n",
                            b"event: \xffbad\ndata: {\"type\":\"ping\"}\n\n",
                            b"\xef\xbb\xbfevent: ping\ndata: {}\n\n",
                            _stop(0), *_tail(),
                            b"event: trailing\ndata: {\"type\":\"content_block_delta\"}"],
    }


def openai_streams(rng: random.Random) -> dict[str, list[bytes]]:
    def chunk(choices: list[Json], **extra: Any) -> bytes:
        return ev(None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                         "model": "gpt-x", "choices": choices, **extra}, space=rng.random() < 0.8)

    text = [_words(rng, 4) for _ in range(20)]
    return {
        "chat": [
            chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
            *(chunk([{"index": 0, "delta": {"content": t}}]) for t in text),
            chunk([{"index": 0, "delta": {"reasoning_content": "hm", "refusal": None}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "get_", "arguments": ""}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"name": "weather", "arguments": '{"city": "'}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": OPENAI_KEY[:12]}},
                {"index": 1, "id": "call_2", "function": {"name": "x", "arguments": "{}"}}]}}]),
            chunk([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": OPENAI_KEY[12:] + '"}'}}]}}]),
            chunk([{"index": 1, "delta": {"content": "second choice"}, "finish_reason": None}]),
            chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                  system_fingerprint="fp_1"),
            chunk([], usage={"prompt_tokens": 5, "completion_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 2}}),
            b"data: [DONE]\n\n"],
        "chat_error": [chunk([{"index": 0, "delta": {"content": "partial"}}]),
                       ev(None, {"error": {"message": "server error", "type": "server_error"}}),
                       b"data: [DONE]\n\n"],
        "responses": [
            ev("response.created", {"type": "response.created", "response": {
                "id": "resp_1", "object": "response", "status": "in_progress", "output": []}}),
            *(ev("response.output_text.delta", {
                "type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": t}) for t in text[:10]),
            ev("response.output_text.delta", {
                "type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": "key " + OPENAI_KEY[:20]}),
            ev("response.output_text.delta", {
                "type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": OPENAI_KEY[20:]}),
            ev("response.reasoning_summary_text.delta", {
                "type": "response.reasoning_summary_text.delta", "item_id": "rs_1",
                "output_index": 1, "summary_index": 0, "delta": "why"}),
            ev("response.completed", {"type": "response.completed", "response": {
                "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-x",
                "output": [{"type": "message", "content": [{"type": "output_text",
                                                            "text": "".join(text[:10])}]}],
                "usage": {"input_tokens": 3, "output_tokens": 4,
                          "input_tokens_details": {"cached_tokens": 1}}}})],
        "responses_failed": [
            ev("response.created", {"type": "response.created", "response": {"id": "r2"}}),
            ev("response.failed", {"type": "response.failed", "response": {
                "id": "r2", "object": "response", "status": "failed", "output": "odd"}})],
    }


def _chunks(rng: random.Random, stream: bytes, start_ns: int) -> list[tuple[int, bytes]]:
    """``stream`` cut at random places (sometimes one event a chunk, sometimes finer)."""
    if not stream:
        return []
    cuts = sorted(set(rng.sample(range(1, len(stream)), min(len(stream) - 1,
                                                            rng.randint(1, 40)))))
    bounds = [0, *cuts, len(stream)]
    return [(start_ns + 1_000_000 + at * 333_333 + rng.randint(0, 999), stream[a:b])
            for at, (a, b) in enumerate(itertools.pairwise(bounds))]


def cases() -> list[tuple[str, Exchange]]:
    """``(name, exchange)`` for every stream, each whole-event-chunked and randomly cut."""
    rng = random.Random(13)
    out: list[tuple[str, Exchange]] = []
    request = {"anthropic": {"model": "claude-x", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]},
               "chat": {"model": "gpt-x", "stream": True,
                        "messages": [{"role": "user", "content": "hi"}]},
               "responses": {"model": "gpt-x", "stream": True, "input": "hi"}}
    streams = [("anthropic", "/v1/messages", "anthropic", name, events)
               for name, events in anthropic_streams(rng).items()]
    for name, events in openai_streams(rng).items():
        kind = "responses" if name.startswith("responses") else "chat"
        path = "/v1/responses" if kind == "responses" else "/v1/chat/completions"
        streams.append(("openai", path, kind, name, events))
    for provider, path, kind, name, events in streams:
        for variant in ("events", "cut", "cut2", "gzip"):
            start_ns = 7_000_000_000 + len(out) * 10_000_000_000
            stream = b"".join(events)
            headers = [("content-type", "text/event-stream; charset=utf-8")]
            if variant == "events":
                chunks = [(start_ns + 1_000_000 + at * 1_234_567, e) for at, e in enumerate(events)]
            elif variant == "gzip":
                packed = gzip.compress(stream, mtime=0)
                chunks = _chunks(rng, packed, start_ns)
                headers.append(("content-encoding", "gzip"))
            else:
                chunks = _chunks(rng, stream, start_ns)
            out.append((f"{name}/{variant}", Exchange(
                id=f"golden-{len(out):03d}", provider=provider,
                upstream_url=f"https://{provider}.example", method="POST", path=path, query="",
                request_headers=[("content-type", "application/json")],
                request_body=orjson.dumps(request[kind]),
                started_wall=1_765_000_000.25 + len(out) * 0.7313, started_ns=start_ns,
                forwarded_ns=start_ns + 1000, status=200, reason="OK",
                response_headers=headers, headers_ns=start_ns + 500_000, chunks=Chunks.of(chunks),
                finished_ns=(chunks[-1][0] if chunks else start_ns) + 4321)))
    return out


def _plain(value: Any) -> Any:
    if value is UNDECODABLE:
        return {"__undecodable__": True}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def summary(exchange: Exchange) -> str:
    """Everything the decode and provider processors make of one exchange, as JSON text."""
    record = Record(exchange=exchange)
    result: dict[str, Any] = {}
    try:
        for processor in default_processors():
            processor(record)
    except Exception as exc:  # a processor failing is part of what is compared
        result["raised"] = f"{type(exc).__name__}: {exc}"
    parsed = record.parsed
    result.update({
        "events": [[e.ns, hashlib.sha256(e.raw).hexdigest()[:16]] for e in record.events],
        "response_body": hashlib.sha256(record.response_body).hexdigest(),
        "payloads": _plain(record.payloads),
        "response_json": _plain(parsed.response_json),
        "output_message": _plain(parsed.output_message),
        "response_id": parsed.response_id, "response_model": parsed.response_model,
        "finish_reasons": parsed.finish_reasons,
        "usage": [parsed.usage.input_tokens, parsed.usage.output_tokens,
                  parsed.usage.cache_read_input_tokens, parsed.usage.cache_creation_input_tokens],
        "tokens_per_second": parsed.tokens_per_second,
        "parse_error": parsed.parse_error, "notes": list(record.notes),
        "decode_error": record.decode_error,
    })
    try:
        result["response_entry"] = _plain(response_entry(record))
    except Exception as exc:
        result["response_entry_raised"] = f"{type(exc).__name__}: {exc}"
    return orjson.dumps(result).decode()


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print(__doc__)
        return 2
    GOLDEN.write_text(orjson.dumps({name: summary(exchange) for name, exchange in cases()},
                                   option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
