"""The OTLP wire encoder (``otelproxy.otlp.wire``) decoded by ``opentelemetry-proto``, and the
exporter that sends its batches (``otelproxy.otlp.export._Exporter``) against the real receiver."""

from __future__ import annotations

import dataclasses
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from otelproxy.config import Config
from otelproxy.errors import ConfigError
from otelproxy.otlp import export, wire
from otelproxy.otlp.settings import BatchSettings, TlsFiles, resolve
from tests.otlp_receiver import LOGS_PATH, TRACES_PATH, OtlpReceiver, any_value, attributes
from tests.otlp_receiver import unused_url as unused_receiver_url

TRACE_ID = bytes(range(1, 17))
SPAN_ID = bytes(range(21, 29))
PARENT_ID = bytes(range(31, 39))
ENVELOPE = wire.Envelope({"service.name": "otelproxy-test", "service.version": "9.9"},
                              "otelproxy", "1.2.3")


def decode_spans(items: list[bytes]) -> list[Span]:
    request = ExportTraceServiceRequest.FromString(ENVELOPE.request(items))
    (resource_spans,) = request.resource_spans
    assert attributes(resource_spans.resource.attributes) == {
        "service.name": "otelproxy-test", "service.version": "9.9"}
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("otelproxy", "1.2.3")
    return list(scope_spans.spans)


def round_trip(value: Any) -> Any:
    """``value`` as one attribute of a span, decoded again."""
    span = wire.span(wire.SpanContext(TRACE_ID, SPAN_ID), None, "s", 2, 1, 2,
                          wire.span_attributes(wire.key_values({"k": value})))
    (decoded,) = decode_spans([wire.Envelope.item(span)])
    (pair,) = decoded.attributes
    assert pair.key == "k"
    return any_value(pair.value)


@pytest.mark.parametrize("value", [
    "", "plain", "ünïcødé ✓ 😀", "x" * 20_000, "y" * 3_000_000,
    True, False,
    0, 1, 127, 128, 16_383, 16_384, 2**31, 2**63 - 1, -1, -2**63,
    0.0, 1.5, -2.25e-9, 1e300,
    [], [1, 2, 300], ["a", "ü"], [True, False], [0.5],
])
def test_attribute_values_decode_to_themselves(value: Any) -> None:
    assert round_trip(value) == value


def test_int_arrays_at_every_width_decode_and_match_per_item_encoding() -> None:
    """An array of ints (a stream's chunk offsets) round-trips at each varint width and beside
    bools, negatives and other types, byte for byte as each item encoded on its own."""
    value = [0, 1, 127, 128, 16_383, 16_384, 2**40, -1, True, False, "x", 0.5, 70_000, 5]
    assert round_trip(value) == value
    assert round_trip(list(range(0, 20_000, 7))) == list(range(0, 20_000, 7))
    items = b"".join(wire.field(b"\x0a", wire.any_value(item)) for item in value)
    assert wire.any_value(value) == wire.field(b"\x2a", items)


def test_integers_beyond_int64_are_kept_exact_as_text() -> None:
    assert round_trip(2**64 + 5) == str(2**64 + 5)
    assert round_trip(-2**63 - 1) == str(-2**63 - 1)


def test_every_varint_width_decodes() -> None:
    for bits in range(64):
        for value in (2**bits - 1, 2**bits):
            if value <= 2**63 - 1:
                assert round_trip(value) == value


def test_none_is_skipped_and_unknown_types_are_refused() -> None:
    assert wire.key_values({"a": None}) == []
    with pytest.raises(TypeError, match="dict"):
        wire.key_values({"a": {"nested": 1}})


def test_keys_past_the_cache_still_encode() -> None:
    many = {f"k{i}": i for i in range(wire._KEY_CACHE_SIZE + 10)}
    span = wire.span(wire.SpanContext(TRACE_ID, SPAN_ID), None, "s", 2, 1, 2,
                          wire.span_attributes(wire.key_values(many)))
    (decoded,) = decode_spans([wire.Envelope.item(span)])
    assert attributes(decoded.attributes) == many


def test_span_fields() -> None:
    context = wire.SpanContext(TRACE_ID, SPAN_ID, "vendor=abc")
    event = wire.event(1_700_000_000_500_000_000, "stream.chunk",
                            wire.key_values({"stream.chunk.index": 3}))
    server = wire.span(context, PARENT_ID, "chat claude-x", wire.SPAN_KIND_SERVER,
                            1_700_000_000_000_000_000, 1_700_000_001_000_000_000,
                            wire.span_attributes(wire.key_values(
                                {"session.id": "s-1", "session.seq": 2})),
                            [event], "upstream reset", parent_is_remote=True)
    plain = wire.span(wire.SpanContext(TRACE_ID, PARENT_ID), None, "GET /v1/models",
                           wire.SPAN_KIND_CLIENT, 5, 6, b"", error="")
    first, second = decode_spans([wire.Envelope.item(server), wire.Envelope.item(plain)])

    assert (first.trace_id, first.span_id, first.parent_span_id) == (TRACE_ID, SPAN_ID, PARENT_ID)
    assert first.trace_state == "vendor=abc"
    assert (first.name, first.kind) == ("chat claude-x", Span.SpanKind.SPAN_KIND_SERVER)
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == (
        1_700_000_000_000_000_000, 1_700_000_001_000_000_000)
    assert attributes(first.attributes) == {"session.id": "s-1", "session.seq": 2}
    assert (first.status.code, first.status.message) == (2, "upstream reset")
    assert first.flags == 0x301  # sampled, parent's remoteness known, parent remote
    (decoded_event,) = first.events
    assert (decoded_event.name, decoded_event.time_unix_nano) == (
        "stream.chunk", 1_700_000_000_500_000_000)
    assert attributes(decoded_event.attributes) == {"stream.chunk.index": 3}

    assert second.parent_span_id == b"" and second.trace_state == ""
    assert second.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert (second.status.code, second.status.message) == (2, "")
    assert second.flags == 0x101
    assert not second.attributes and not second.events


def test_span_without_error_has_unset_status() -> None:
    span = wire.span(wire.SpanContext(TRACE_ID, SPAN_ID), None, "s", 2, 1, 2, b"")
    (decoded,) = decode_spans([wire.Envelope.item(span)])
    assert decoded.status.code == 0 and not decoded.HasField("status")


def test_log_record_fields() -> None:
    context = wire.SpanContext(TRACE_ID, SPAN_ID)
    shared = wire.log_attributes(wire.key_values({"session.id": "s-1"}))
    own = wire.log_attributes(wire.key_values({"proxy.record": "response"}))
    record = wire.log_record(context, 10, 20, 17, "ERROR", "POST /v1/messages 502 ✗",
                                  shared + own, "response")
    request = ExportLogsServiceRequest.FromString(
        ENVELOPE.request([wire.Envelope.item(record)]))
    (scope_logs,) = request.resource_logs[0].scope_logs
    (decoded,) = scope_logs.log_records
    assert (decoded.time_unix_nano, decoded.observed_time_unix_nano) == (10, 20)
    assert (decoded.severity_number, decoded.severity_text) == (17, "ERROR")
    assert decoded.body.string_value == "POST /v1/messages 502 ✗"
    assert attributes(decoded.attributes) == {"session.id": "s-1", "proxy.record": "response"}
    assert (decoded.trace_id, decoded.span_id) == (TRACE_ID, SPAN_ID)
    assert (decoded.flags, decoded.event_name) == (1, "response")


# -- the exporter ----------------------------------------------------------------------------------


class Losses:
    def __init__(self) -> None:
        self.reports = 0

    def __call__(self) -> None:
        self.reports += 1


def exporter(receiver_url: str, *, batch: int = 4, delay_ms: int = 60_000,
             timeout_s: float = 5.0, compression: str = "none",
             api_key: str = "seq-test-api-key", env: dict[str, str] | None = None,
             export_timeout_ms: int = 30_000) -> tuple[export._Exporter, export._Tally, Losses]:
    settings = resolve(Config(seq_url=receiver_url, seq_api_key=api_key), env or {})
    assert settings is not None
    settings = dataclasses.replace(settings, timeout_s=timeout_s, compression=compression)
    tally = export._Tally({"traces": 100, "logs": 100})
    losses = Losses()
    assert settings.traces_endpoint is not None
    made = export._Exporter("traces", settings.traces_endpoint, settings.traces_headers,
                            BatchSettings(delay_ms, 100, batch, export_timeout_ms), settings,
                            ENVELOPE, tally, losses)
    made.start()
    return made, tally, losses


def spans(count: int, first: int = 0) -> list[bytes]:
    out = []
    for index in range(first, first + count):
        span = wire.span(wire.SpanContext(TRACE_ID, index.to_bytes(8, "big")), None,
                              f"span {index}", wire.SPAN_KIND_SERVER, 1, 2, b"")
        out.append(wire.Envelope.item(span))
    return out


def queue(target: export._Exporter, tally: export._Tally, items: list[bytes]) -> None:
    assert tally.reserve({"traces": len(items)})
    target.add(items)


@pytest.fixture
def seq() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def test_a_full_batch_leaves_at_once_and_the_rest_on_flush(seq: OtlpReceiver) -> None:
    target, tally, losses = exporter(seq.url, batch=4)
    try:
        queue(target, tally, spans(6))
        seq.wait_for_spans(4, timeout=5)
        time.sleep(0.2)  # the other two wait for the (one-minute) schedule or a flush
        assert [s.name for s in seq.spans()] == [f"span {i}" for i in range(4)]
        assert target.flush(5)
        assert [s.name for s in seq.spans()] == [f"span {i}" for i in range(6)]
        assert [r.size > 0 for r in seq.requests] == [True, True]
        assert tally.exported["traces"] == 6 and tally.outstanding["traces"] == 0
        assert losses.reports == 0
    finally:
        assert target.stop(5)


def test_the_schedule_delay_sends_a_partial_batch(seq: OtlpReceiver) -> None:
    target, tally, _ = exporter(seq.url, batch=100, delay_ms=100)
    try:
        began = time.monotonic()
        queue(target, tally, spans(2))
        seq.wait_for_spans(2, timeout=5)
        assert time.monotonic() - began >= 0.09
    finally:
        target.stop(5)


def test_retryable_answers_are_retried_honouring_retry_after(seq: OtlpReceiver) -> None:
    seq.answers = [503, 429]
    seq.retry_after = "0.3"
    target, tally, losses = exporter(seq.url, batch=2)
    try:
        queue(target, tally, spans(2))
        seq.wait_for_spans(2, timeout=5)
        assert target.flush(5)  # the tally is updated once the answer is read
        statuses = [r.status for r in seq.requests]
        assert statuses == [503, 429, 200]
        gaps = [b.at - a.at for a, b in zip(seq.requests, seq.requests[1:], strict=False)]
        assert all(gap >= 0.28 for gap in gaps), gaps
        assert tally.exported["traces"] == 2 and sum(tally.failed.values()) == 0
        assert losses.reports == 0
    finally:
        target.stop(5)


def test_refusals_that_cannot_improve_fail_at_once(seq: OtlpReceiver) -> None:
    target, tally, losses = exporter(seq.url, batch=2, api_key="wrong-key")
    try:
        queue(target, tally, spans(2))
        assert target.flush(5)
        assert [r.status for r in seq.requests] == [401]
        assert tally.failed["traces"] == 2 and tally.exported["traces"] == 0
        assert target.last_error == "HTTP 401" and losses.reports == 1
    finally:
        target.stop(5)


@pytest.mark.parametrize(("timeout_s", "export_timeout_ms"), [(1.5, 30_000), (60.0, 1_500)])
def test_retries_stop_at_the_export_timeout(seq: OtlpReceiver, timeout_s: float,
                                            export_timeout_ms: int) -> None:
    """The exporter timeout, or the batch processor's export timeout when shorter."""
    seq.status = 503
    target, tally, _ = exporter(seq.url, batch=1, timeout_s=timeout_s,
                                export_timeout_ms=export_timeout_ms)
    try:
        began = time.monotonic()
        queue(target, tally, spans(1))
        assert target.flush(10)
        assert time.monotonic() - began < 3
        assert 1 <= len(seq.requests) <= 2  # first try, then backoff ~1 s, ~2 s > the rest
        assert tally.failed["traces"] == 1 and target.last_error == "HTTP 503"
    finally:
        target.stop(5)


def test_unreachable_receiver_is_retried_then_counted_failed() -> None:
    target, tally, _ = exporter(unused_receiver_url(), batch=1, timeout_s=1.0)
    try:
        queue(target, tally, spans(1))
        assert target.flush(10)
        assert tally.failed["traces"] == 1
        assert target.last_error is not None and target.last_error.startswith(
            "connection failed")
    finally:
        target.stop(5)


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_exports_decode(seq: OtlpReceiver, compression: str) -> None:
    target, tally, _ = exporter(seq.url, batch=3, compression=compression)
    try:
        queue(target, tally, spans(3))
        seq.wait_for_spans(3, timeout=5)
        (request,) = seq.requests
        assert request.headers["Content-Encoding"] == compression
        assert int(request.headers["Content-Length"]) < request.size  # three alike spans shrink
    finally:
        target.stop(5)


def test_stop_sends_what_is_queued(seq: OtlpReceiver) -> None:
    target, tally, _ = exporter(seq.url, batch=50)
    queue(target, tally, spans(5))
    assert target.stop(5)
    assert len(seq.spans()) == 5 and seq.accepted(TRACES_PATH) == 1
    assert seq.accepted(LOGS_PATH) == 0


def test_batches_share_one_kept_alive_connection(seq: OtlpReceiver) -> None:
    """Every POST of an exporter goes on the one connection it keeps open."""
    target, tally, _ = exporter(seq.url, batch=2)
    try:
        for first in (0, 2, 4):
            queue(target, tally, spans(2, first=first))
            assert target.flush(5)
        assert [r.status for r in seq.requests] == [200, 200, 200]
        assert len({r.client_port for r in seq.requests}) == 1
    finally:
        target.stop(5)


def test_a_connection_the_server_dropped_while_idle_is_replaced_without_a_failure() -> None:
    """A kept connection the server closed while it was idle is replaced at once: the batch
    goes out on a new connection, no attempt counts as failed and the health stays ok."""
    with OtlpReceiver(keepalive_timeout=0.2) as seq:
        target, tally, losses = exporter(seq.url, batch=2)
        try:
            queue(target, tally, spans(2))
            assert target.flush(5)
            time.sleep(0.6)  # the receiver closes the idle connection
            queue(target, tally, spans(2, first=2))
            assert target.flush(5)
            assert [r.status for r in seq.requests] == [200, 200]
            assert seq.requests[0].client_port != seq.requests[1].client_port
            assert tally.exported["traces"] == 4 and tally.failed["traces"] == 0
            assert target.last_error is None and target.trouble() is None
            assert losses.reports == 0
        finally:
            target.stop(5)


def test_an_answer_later_than_the_timeout_fails_the_batch_at_the_timeout(
        seq: OtlpReceiver) -> None:
    """A backend that takes longer than the export timeout to answer: the batch fails at the
    timeout, named by the exception's type."""
    seq.delay = 5.0
    target, tally, _ = exporter(seq.url, batch=1, timeout_s=0.5)
    try:
        began = time.monotonic()
        queue(target, tally, spans(1))
        assert target.flush(10)
        assert time.monotonic() - began < 3
        assert tally.failed["traces"] == 1 and target.last_error == "TimeoutError"
    finally:
        target.stop(5)


def test_a_host_name_is_looked_up_and_each_address_tried(seq: OtlpReceiver) -> None:
    """A host name (``localhost``) is looked up, off the exporter's thread, and the export
    reaches an address of it that accepts (the receiver listens on 127.0.0.1 only)."""
    target, tally, _ = exporter(seq.url.replace("127.0.0.1", "localhost"), batch=1)
    try:
        queue(target, tally, spans(1))
        assert target.flush(5)
        assert [r.status for r in seq.requests] == [200] and target.last_error is None
    finally:
        target.stop(5)


def test_user_info_in_the_endpoint_is_sent_as_basic_authentication(seq: OtlpReceiver) -> None:
    """``http://user:password@host`` (percent-encoded) becomes an Authorization header."""
    url = seq.url.replace("http://", "http://otel%20user:p%40ss@")
    target, tally, _ = exporter(url, batch=1)
    try:
        queue(target, tally, spans(1))
        assert target.flush(5)
        (request,) = seq.requests
        assert request.status == 200
        assert request.headers["Authorization"] == "Basic b3RlbCB1c2VyOnBAc3M="  # otel user:p@ss
    finally:
        target.stop(5)


def test_abort_gives_up_a_retry_and_counts_what_is_left(seq: OtlpReceiver) -> None:
    seq.status = 503
    seq.retry_after = "30"
    target, tally, _ = exporter(seq.url, batch=2, timeout_s=60)
    queue(target, tally, spans(2))
    deadline = time.monotonic() + 5
    while not seq.requests:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queue(target, tally, spans(3, first=2))
    began = time.monotonic()
    stopped = threading.Event()

    def stop() -> None:
        target.stop(0.2)
        stopped.set()

    threading.Thread(target=stop, daemon=True).start()
    assert stopped.wait(5)
    assert time.monotonic() - began < 2  # not the 30 s Retry-After
    assert tally.failed["traces"] == 5 and tally.outstanding["traces"] == 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl CLI."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_https_endpoint_trusts_the_certificate_variable(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with OtlpReceiver(ssl_context=context) as seq:
        assert seq.url.startswith("https://")
        trusted, tally, _ = exporter(seq.url, batch=1,
                                     env={"OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert)})
        try:
            queue(trusted, tally, spans(1))
            assert seq.wait_for_spans(1, timeout=5)[0].name == "span 0"
        finally:
            trusted.stop(5)
        untrusted, tally, _ = exporter(seq.url, batch=1, timeout_s=0.5)
        try:
            queue(untrusted, tally, spans(1, first=1))
            assert untrusted.flush(10)
            assert tally.failed["traces"] == 1
            assert untrusted.last_error == "connection failed (SSLCertVerificationError)"
        finally:
            untrusted.stop(5)
        assert len(seq.spans()) == 1


def test_client_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="CLIENT_KEY"):
        resolve(Config(seq_url="https://seq:5341"),
                     {"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/etc/client.pem"})
    settings = resolve(Config(seq_url="https://seq:5341"), {
        "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE": "/c.pem",
        "OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY": "/k.pem"})
    assert settings is not None
    assert settings.tls == {"logs": TlsFiles(None, "/c.pem", "/k.pem")}
