"""The record model: ``Chunks``, the packed response body the proxy holds per exchange."""

from __future__ import annotations

import pickle

from otelproxy.record import Chunks, Exchange
from otelproxy.recorder import without_bodies

PAIRS = [(1_000, b"event: a\ndata: {}\n\n"), (2_500, b""), (2_501, b"\x00\xff" * 70),
         (2**62, b"data: [DONE]\n\n")]
"""Chunk times up to the monotonic clock's range, an empty chunk and bytes that are no text."""


def _exchange(chunks: Chunks) -> Exchange:
    return Exchange(id="x", provider="anthropic", upstream_url="https://a.example",
                    method="POST", path="/v1/messages", query="", request_headers=[],
                    request_body=b"r" * 40_000, headers_ns=500, chunks=chunks)


def test_chunks_give_back_every_chunk_as_appended() -> None:
    chunks = Chunks()
    for ns, data in PAIRS:
        chunks.append(ns, data)
    assert list(chunks) == PAIRS
    assert all(type(data) is bytes for _, data in chunks)
    assert len(chunks) == 4 and chunks
    assert chunks.nbytes == sum(len(data) for _, data in PAIRS) == len(chunks.data)
    assert list(Chunks.of(PAIRS)) == PAIRS


def test_chunks_survive_a_pickle_round_trip_in_an_exchange() -> None:
    exchange = _exchange(Chunks.of(PAIRS))
    copy = pickle.loads(pickle.dumps(exchange, pickle.HIGHEST_PROTOCOL))
    assert list(copy.chunks) == PAIRS and copy.chunks is not exchange.chunks
    assert copy.first_byte_ns == 1_000 and copy.response_size == exchange.response_size
    assert copy.held_bytes == 40_000 + exchange.chunks.nbytes
    copy.chunks.append(7, b"more")  # the copy's own buffer, still growable
    assert list(copy.chunks)[-1] == (7, b"more") and list(exchange.chunks) == PAIRS


def test_no_chunks() -> None:
    """An empty body: nothing to iterate, no bytes, the first byte's time is the head's."""
    exchange = _exchange(Chunks())
    copy = pickle.loads(pickle.dumps(exchange, pickle.HIGHEST_PROTOCOL))
    for chunks in (exchange.chunks, copy.chunks, Chunks.of([])):
        assert list(chunks) == [] and len(chunks) == 0 and not chunks and chunks.nbytes == 0
    assert exchange.first_byte_ns == copy.first_byte_ns == 500
    assert exchange.response_size == 0 and exchange.held_bytes == 40_000


def test_an_exchange_without_bodies_keeps_the_first_byte_time_and_sizes() -> None:
    kept = without_bodies(_exchange(Chunks.of(PAIRS)))
    assert list(kept.chunks) == [(1_000, b"")] and kept.first_byte_ns == 1_000
    assert kept.response_cut is not None
    assert kept.response_cut.size == sum(len(data) for _, data in PAIRS)
    assert list(without_bodies(_exchange(Chunks())).chunks) == []
