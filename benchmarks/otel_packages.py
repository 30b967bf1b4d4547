"""What two OpenTelemetry packages would cost otelproxy, measured (not project dependencies):

    bash benchmarks/install-peers.sh                 # once: makes benchmarks/.otel-venv
    .venv/bin/python -m benchmarks.otel_packages     # ~55 s; --json, --scale

encode      CPU per exchange of turning the same benchmark-shaped records into OTLP/HTTP
            protobuf request bodies, in one process, alternately, ``--encode-rounds`` times:
            ``otelproxy``: ``otelproxy.otlp.mapping.encode`` (attributes + ``otelproxy.otlp.wire``)
            and one ``Envelope.request`` per batch of 64 exchanges;
            ``sdk``: the same attributes, names, times and severities (the mapping's functions)
            through the SDK's objects: a ``TracerProvider`` span (SERVER, and the CLIENT child)
            and two ``LoggerProvider`` log records per exchange, collected by a processor that
            keeps them in a list (a batch processor's queue, without its thread), then per batch
            ``encode_spans(...).SerializePartialToString()`` as ``OTLPSpanExporter.export`` does
            before its POST, and ``encode_logs(...)`` likewise (opentelemetry-exporter-otlp-proto-
            http's encoders). The records are 144 exchanges of ``benchmarks.traffic`` (12
            conversations of 12 turns, 150-event streams) passed through the recorder's
            processors (``otelproxy.recorder.build_pipeline``), as the OTLP sink receives them.
passthrough CPU ms per exchange of a bare aiohttp pass-through (``benchmarks.servers``' ``bare``:
            otelproxy's upstream seam and streaming loop, no record) with and without
            opentelemetry-instrumentation-aiohttp-client on its upstream ``ClientSession``, header
            injection off (``OTEL_PROPAGATORS=none``: the global propagator is empty, so the
            instrumentation's ``inject`` adds nothing; each instrumented server checks this at
            start). Variants: ``off``; ``instrumented`` (an SDK ``TracerProvider`` records the
            CLIENT spans, no processor: they are dropped when they end); ``instrumented+export``
            (the same with a ``BatchSpanProcessor`` and ``OTLPSpanExporter`` sending them to a
            loopback receiver, schedule delay 1 s). Load as in ``benchmarks.run``: 20 clients
            sending Claude Code conversation turns (41 to 91 KB requests), answered twice over:
            with short JSON (``LOADS``: the instrumentation's cost is per request, and this
            baseline is steady) and with 150-event streams, deltas 3 ms apart (the Claude Code
            exchange). Each variant gets interleaved slices (ABC CBA ...), the mean over slices
            is reported with each slice's figure; the pass-throughs run on CPU 1, the load
            generator, fake upstream and receiver on CPU 0; CPU time is read from ``/proc``.

Both parts run in ``benchmarks/.otel-venv`` (made by ``install-peers.sh``: otelproxy editable plus
the SDK, exporter and instrumentation); the load generator runs in the calling interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from benchmarks import procs, traffic
from benchmarks.procs import HOST, Process

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OTEL_VENV = HERE / ".otel-venv"
PASS_THROUGH_VARIANTS = ("off", "instrumented", "instrumented+export")
ENCODE_BATCH = 64
"""Exchanges per export request in the encode comparison."""
CONVERSATIONS = 20
DELTA_INTERVAL_MS = 3.0

Json = dict[str, Any]


# -- encode: otelproxy's mapping + wire against the SDK + the exporter's encoders ------------------


def benchmark_records() -> list[Any]:
    """The records the OTLP sink would receive for 12 conversations of 12 turns each."""
    from otelproxy import config
    from otelproxy.record import Chunks, Exchange, Record
    from otelproxy.recorder import build_pipeline

    class Keep:
        """A sink that keeps every record."""

        name = "keep"

        def __init__(self) -> None:
            self.records: list[Record] = []

        def submit(self, record: Record) -> None:
            self.records.append(record)

        def flush(self, timeout: float) -> bool:
            return True

        def shutdown(self, timeout: float) -> bool:
            return True

        def counters(self) -> dict[str, int]:
            return {}

    events = traffic.answer_writes()
    headers = [(name, value) for name, value in traffic.HEADERS.items()]
    exchanges: list[Exchange] = []
    start = time.monotonic_ns()
    for conversation in range(12):
        for turn in range(traffic.MAX_TURNS):
            begin = start + len(exchanges) * 1_000_000_000
            chunks = [(begin + 300_000_000 + i * 3_000_000, event)
                      for i, event in enumerate(events)]
            exchanges.append(Exchange(
                id=f"bench-{len(exchanges):04d}", provider="anthropic",
                upstream_url="https://api.anthropic.com", method="POST", path="/v1/messages",
                query="beta=true", request_headers=headers,
                request_body=traffic.conversation_request(f"otel{conversation}", turn),
                started_wall=time.time(), started_ns=begin, forwarded_ns=begin + 200_000,
                status=200, reason="OK", headers_ns=begin + 250_000_000,
                response_headers=[("content-type", "text/event-stream; charset=utf-8"),
                                  ("request-id", "req_bench")],
                chunks=Chunks.of(chunks), finished_ns=chunks[-1][0] + 100_000))
    keep = Keep()
    with tempfile.TemporaryDirectory(prefix="otelproxy-otel-bench-") as log_dir:
        pipeline = build_pipeline(config.build({"log_dir": log_dir}, []), {}, [keep])
        for at in range(0, len(exchanges), 8):
            pipeline.handle_batch(list(exchanges[at:at + 8]))
        pipeline.close(30)
    return keep.records


class SdkPath:
    """The SDK's span and log objects, then the OTLP exporter's encoders."""

    def __init__(self, resource: dict[str, str]) -> None:
        from opentelemetry.sdk._logs import LoggerProvider, LogRecordProcessor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

        spans: list[Any] = []
        logs: list[Any] = []
        self.spans, self.logs = spans, logs

        class KeepSpans(SpanProcessor):
            def on_end(self, span: Any) -> None:
                spans.append(span)

        class KeepLogs(LogRecordProcessor):
            def on_emit(self, log_record: Any) -> None:
                logs.append(log_record)

            def shutdown(self) -> None:
                pass

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return True

        sdk_resource = Resource.create(resource)
        tracers = TracerProvider(resource=sdk_resource)
        tracers.add_span_processor(KeepSpans())
        loggers = LoggerProvider(resource=sdk_resource)
        loggers.add_log_record_processor(KeepLogs())
        from otelproxy import __version__

        self.tracer = tracers.get_tracer("otelproxy", __version__)
        self.logger = loggers.get_logger("otelproxy", __version__)

    def emit(self, record: Any, max_body: int) -> None:
        """One exchange: SERVER span, CLIENT child span, two log records in the span's context."""
        from opentelemetry import trace
        from opentelemetry._logs import SeverityNumber
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from otelproxy.otlp import mapping

        exchange = record.exchange
        common = mapping.common_attributes(record)
        start_ns = mapping.wall_ns(record, exchange.started_ns)
        end_ns = mapping.wall_ns(record, exchange.finished_ns)
        server = self.tracer.start_span(mapping.span_name(record), context=Context(),
                                        kind=SpanKind.SERVER, attributes=common,
                                        start_time=start_ns)
        error = mapping.server_span_error(record)
        if error is not None:
            server.set_status(Status(StatusCode.ERROR, error))
        server.end(end_time=end_ns)
        context = trace.set_span_in_context(server, Context())
        if mapping.has_client_span(record):
            attributes, client_error = mapping.client_span_attributes(record)
            client = self.tracer.start_span(
                mapping.client_span_name(record), context=context, kind=SpanKind.CLIENT,
                attributes=attributes, start_time=mapping.wall_ns(record, exchange.forwarded_ns))
            if client_error is not None:
                client.set_status(Status(StatusCode.ERROR, client_error))
            client.end(end_time=end_ns)
        number, text = mapping.severity(record)
        now = time.time_ns()
        for at, name, summary, own in (
                (start_ns, "request", mapping.request_summary(record),
                 mapping.request_record_attributes(record, max_body)),
                (end_ns, "response", mapping.response_summary(record),
                 mapping.response_record_attributes(record, max_body))):
            self.logger.emit(timestamp=at, observed_timestamp=now, context=context,
                             severity_number=SeverityNumber(number), severity_text=text,
                             body=summary, attributes={**common, "proxy.record": name, **own},
                             event_name=name)

    def requests(self) -> list[bytes]:
        """What the exporters would POST for what was emitted since the last call."""
        from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        bodies = [encode_spans(self.spans).SerializePartialToString(),
                  encode_logs(self.logs).SerializePartialToString()]
        self.spans.clear()
        self.logs.clear()
        return bodies


def measure_encode(rounds: int) -> Json:
    """Both paths over the same records, alternately, ``rounds`` times; CPU ms per exchange."""
    from otelproxy import __version__
    from otelproxy.otlp import mapping, wire
    from otelproxy.otlp.settings import ExportSettings

    settings = ExportSettings("http://127.0.0.1:1/v1/traces", "http://127.0.0.1:1/v1/logs",
                              {}, {}, resource={"service.name": "otelproxy"})
    records = benchmark_records()
    sdk = SdkPath(dict(settings.resource))
    from opentelemetry.sdk.resources import Resource

    envelope = wire.Envelope(Resource.create(dict(settings.resource)).attributes, "otelproxy",
                             __version__)
    batches = [records[at:at + ENCODE_BATCH] for at in range(0, len(records), ENCODE_BATCH)]

    def ours() -> int:
        size = 0
        for batch in batches:
            spans: list[bytes] = []
            logs: list[bytes] = []
            for record in batch:
                encoded_spans, encoded_logs = mapping.encode(record, settings)
                spans += encoded_spans
                logs += encoded_logs
            size += len(envelope.request(spans)) + len(envelope.request(logs))
        return size

    def theirs() -> int:
        size = 0
        for batch in batches:
            for record in batch:
                sdk.emit(record, settings.max_body)
            size += sum(len(body) for body in sdk.requests())
        return size

    first = batches[0]
    spans, logs = [], []
    for record in first:
        encoded_spans, encoded_logs = mapping.encode(record, settings)
        spans += encoded_spans
        logs += encoded_logs
        sdk.emit(record, settings.max_body)
    same = _telemetry(envelope.request(spans), envelope.request(logs)) == _telemetry(
        *sdk.requests())
    per_exchange: dict[str, list[float]] = {"otelproxy": [], "sdk": []}
    sizes: dict[str, int] = {}
    ours(), theirs()  # warm-up: caches, imports
    for index in range(rounds):
        order = (("otelproxy", ours), ("sdk", theirs))
        for name, run in order if index % 2 == 0 else order[::-1]:
            began = time.process_time_ns()
            sizes[name] = run()
            per_exchange[name].append((time.process_time_ns() - began) / 1e6 / len(records))
    medians = {name: statistics.median(values) for name, values in per_exchange.items()}
    return {
        "exchanges": len(records), "rounds": rounds, "batch": ENCODE_BATCH,
        "ms_per_exchange": {name: round(value, 3) for name, value in medians.items()},
        "ms_per_exchange_rounds": {name: [round(v, 3) for v in values]
                                   for name, values in per_exchange.items()},
        "sdk_over_otelproxy": round(medians["sdk"] / medians["otelproxy"], 2),
        "same_telemetry": same,
        "request_bytes_per_exchange": {name: round(size / len(records))
                                       for name, size in sizes.items()},
        "versions": _versions("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http",
                              "opentelemetry-instrumentation-aiohttp-client"),
    }


def _telemetry(traces: bytes, logs: bytes) -> list[tuple[Any, ...]]:
    """What two export requests carry, ids aside: each span's name, kind, times, status and
    attributes; each log record's body, severity, time and attributes."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    def attributes(message: Any) -> list[tuple[str, bytes]]:
        return sorted((kv.key, kv.value.SerializeToString()) for kv in message.attributes)

    out: list[tuple[Any, ...]] = []
    for resource in ExportTraceServiceRequest.FromString(traces).resource_spans:
        out += [(span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano,
                 span.status.code, attributes(span))
                for scope in resource.scope_spans for span in scope.spans]
    for resource_logs in ExportLogsServiceRequest.FromString(logs).resource_logs:
        out += [(log.body.string_value, log.severity_number, log.time_unix_nano,
                 attributes(log)) for scope in resource_logs.scope_logs
                for log in scope.log_records]
    return out


def _versions(*distributions: str) -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in distributions}


# -- the pass-through, with and without the aiohttp-client instrumentation ------------------------


def serve_pass_through(variant: str, port: int, otlp_url: str) -> None:
    """Run ``benchmarks.servers``' bare pass-through, instrumented as ``variant`` says."""
    from benchmarks import servers

    if variant != "off":
        from opentelemetry import propagate
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider()
        if variant == "instrumented+export":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{otlp_url}/ingest/otlp/v1/traces"),
                schedule_delay_millis=1000))
        carrier: dict[str, str] = {}
        with provider.get_tracer("check").start_as_current_span("check"):
            propagate.inject(carrier)
        if carrier or propagate.get_global_textmap().fields:
            raise SystemExit("header injection is on (OTEL_PROPAGATORS="
                             f"{os.environ.get('OTEL_PROPAGATORS')!r}, injected "
                             f"{sorted(carrier)}): refusing to measure")
        AioHttpClientInstrumentor().instrument(tracer_provider=provider)
    servers.run(servers.serve(servers.BarePassThrough().app(), port))


@dataclass(frozen=True)
class Load:
    """One kind of load: Claude-Code-shaped requests, streamed answers or short JSON ones."""

    name: str
    stream: bool
    seconds: float
    rounds: int


LOADS: Final = (Load("JSON", False, 2.0, 4), Load("streamed", True, 2.5, 2))
"""The instrumentation's cost is per request: short JSON answers show it against a steady
baseline (many exchanges, a fixed number of reads and writes each); the streamed answers give
the Claude Code exchange it would be added to (the forwarding loop's chunking varies more)."""


async def _conversation_client(url: str, session: Any, load: Load, bodies: Sequence[bytes],
                               until: float, counts: dict[str, int]) -> None:
    """One client sending a conversation's turns (then a new conversation) until ``until``."""
    import aiohttp

    headers = {**traffic.HEADERS, "x-bench-deltas": str(traffic.DELTA_COUNT),
               "x-bench-interval-ms": str(DELTA_INTERVAL_MS)}
    end = b"message_stop" if load.stream else b'"end_turn"'
    while time.monotonic() < until:
        for body in bodies:
            if time.monotonic() >= until:
                return
            tail = b""
            try:
                async with session.post(url + "?beta=true", headers=headers,
                                        data=body) as answer:
                    async for data in answer.content.iter_any():
                        tail = (tail + data)[-256:]
                    ok = answer.status == 200 and end in tail
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            counts["exchanges" if ok else "failures"] += 1
            if not ok:
                break


async def _load(url: str, load: Load, seconds: float) -> dict[str, int]:
    """``CONVERSATIONS`` clients for ``seconds``; exchanges that came back whole, failures."""
    import aiohttp

    bodies = [traffic.conversation_request("otel", turn, load.stream)
              for turn in range(traffic.MAX_TURNS)]
    counts = {"exchanges": 0, "failures": 0}
    connector = aiohttp.TCPConnector(limit=CONVERSATIONS, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_conversation_client(url, session, load, bodies, until, counts)
                               for _ in range(CONVERSATIONS)))
    return counts


def measure_pass_through(python: Path, loads: Sequence[Load]) -> Json:
    """CPU ms per exchange of each pass-through variant under each load (module docstring)."""
    pinning = procs.pin_load_generator()
    work = Path(tempfile.mkdtemp(prefix="otelproxy-otel-bench-"))
    upstream_port, otlp_port = procs.free_port(), procs.free_port()
    helpers = [Process(role, [sys.executable, "-m", "benchmarks.servers", role, "--port",
                              str(port)], dict(os.environ), work / f"{role}.log",
                       pinning.for_load())
               for role, port in (("upstream", upstream_port), ("otlp", otlp_port))]
    started: dict[str, tuple[Process, int]] = {}
    try:
        for helper, port in zip(helpers, (upstream_port, otlp_port), strict=True):
            helper.start()
            procs.wait_listening(port, helper.popen, 30)
        for variant in PASS_THROUGH_VARIANTS:
            port = procs.free_port()
            env = {key: value for key, value in os.environ.items()
                   if not key.startswith("OTEL_")}
            env["OTEL_PROPAGATORS"] = "none"
            env["PYTHONPATH"] = str(ROOT)  # benchmarks.*; otelproxy is installed in the venv
            process = Process(variant, [str(python), "-m", "benchmarks.otel_packages",
                                        "serve", variant, "--port", str(port), "--otlp-url",
                                        f"http://{HOST}:{otlp_port}"],
                              env, work / f"pass-through-{variant}.log", pinning.for_proxy())
            process.start()
            started[variant] = (process, port)
        for variant, (process, port) in started.items():
            try:
                procs.wait_listening(port, process.popen, 60)
            except RuntimeError as exc:
                raise RuntimeError(f"{variant}: {exc}; {process.log_tail(600)!r}") from None
        urls = {variant: f"http://{HOST}:{port}/anthropic/{HOST}:{upstream_port}/v1/messages"
                for variant, (_, port) in started.items()}
        pids = {variant: process.pid for variant, (process, _) in started.items()}

        async def measure() -> Json:
            for url in urls.values():  # warm-up: connections, imports, first spans
                await _load(url, loads[0], 1.0)
            out: Json = {"pinned": pinning.active, "pinning_note": pinning.reason,
                         "conversations": CONVERSATIONS,
                         "idle_rss_mib": {v: procs.tree_rss_mib(pid) for v, pid in pids.items()}}
            for load in loads:
                out[load.name] = await _measure_load(urls, pids, load)
            return out

        return asyncio.run(measure())
    finally:
        for process, _ in started.values():
            process.stop()
        for helper in helpers:
            helper.stop()


async def _measure_load(urls: dict[str, str], pids: dict[str, int], load: Load) -> Json:
    """``load.rounds`` slices per variant, the variants' order reversed every round."""
    cpu_ms: dict[str, list[float]] = {variant: [] for variant in urls}
    exchanges = dict.fromkeys(urls, 0)
    failures = dict.fromkeys(urls, 0)
    names = list(urls)
    for index in range(load.rounds):
        for variant in names if index % 2 == 0 else names[::-1]:
            before = procs.tree_cpu_s(pids[variant])
            counts = await _load(urls[variant], load, load.seconds)
            if variant == "instrumented+export":
                await asyncio.sleep(1.2)  # its last batch leaves (schedule delay 1 s)
            used = procs.tree_cpu_s(pids[variant]) - before
            exchanges[variant] += counts["exchanges"]
            failures[variant] += counts["failures"]
            if counts["exchanges"]:
                cpu_ms[variant].append(used * 1000 / counts["exchanges"])
    mean = {variant: statistics.mean(values) if values else None
            for variant, values in cpu_ms.items()}
    off = mean["off"]
    return {
        "stream": load.stream, "seconds_per_slice": load.seconds, "rounds": load.rounds,
        "exchanges": exchanges, "failures": failures,
        "cpu_ms_per_exchange": {v: None if x is None else round(x, 3) for v, x in mean.items()},
        "cpu_ms_per_exchange_slices": {v: [round(x, 3) for x in values]
                                       for v, values in cpu_ms.items()},
        "added_ms_per_exchange": {v: None if x is None or off is None else round(x - off, 3)
                                  for v, x in mean.items()},
    }


# -- the command ----------------------------------------------------------------------------------


def _in_otel_venv(python: Path, argv: Sequence[str]) -> Json:
    done = subprocess.run([str(python), "-m", "benchmarks.otel_packages", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-1500:]}")
    answer: Json = json.loads(done.stdout)
    return answer


def report(result: Json) -> str:
    encode, passing = result["encode"], result["pass_through"]
    ms = encode["ms_per_exchange"]
    lines = [
        f"encode ({encode['exchanges']} exchanges, {encode['rounds']} rounds, batches of "
        f"{encode['batch']}; {', '.join(f'{k} {v}' for k, v in encode['versions'].items())}):",
        f"  otelproxy mapping + wire   {ms['otelproxy']:.3f} ms CPU per exchange "
        f"({encode['request_bytes_per_exchange']['otelproxy']} bytes)",
        f"  SDK objects + encoders     {ms['sdk']:.3f} ms CPU per exchange "
        f"({encode['request_bytes_per_exchange']['sdk']} bytes)  = "
        f"{encode['sdk_over_otelproxy']} x; same spans and log records: "
        f"{encode['same_telemetry']}",
        f"pass-through ({passing['conversations']} conversations, pinned: {passing['pinned']}"
        f"{'' if passing['pinned'] else ' - ' + passing['pinning_note']}; idle RSS MiB "
        f"{', '.join(f'{k} {v}' for k, v in passing['idle_rss_mib'].items())}):",
    ]
    for load in LOADS:
        measured = passing[load.name]
        lines.append(f"  {load.name} answers ({measured['rounds']} slices of "
                     f"{measured['seconds_per_slice']:g} s per variant):")
        for variant in PASS_THROUGH_VARIANTS:
            slices = measured["cpu_ms_per_exchange_slices"][variant] or [None]
            lines.append(
                f"    {variant:<20} {measured['cpu_ms_per_exchange'][variant]} ms CPU per "
                f"exchange (+{measured['added_ms_per_exchange'][variant]} ms; slices "
                f"{min(slices)}..{max(slices)}; {measured['exchanges'][variant]} exchanges, "
                f"{measured['failures'][variant]} failed)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.otel_packages",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every pass-through slice's length (default 1)")
    parser.add_argument("--encode-rounds", type=int, default=6)
    parser.add_argument("--otel-venv", default=str(OTEL_VENV), metavar="DIR")
    sub = parser.add_subparsers(dest="step")
    encode = sub.add_parser("encode", help="(inside the otel venv) the encode comparison")
    encode.add_argument("--rounds", type=int, default=6)
    serve = sub.add_parser("serve", help="(inside the otel venv) one pass-through variant")
    serve.add_argument("variant", choices=PASS_THROUGH_VARIANTS)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--otlp-url", required=True)
    args = parser.parse_args(argv)
    if args.step == "encode":
        print(json.dumps(measure_encode(args.rounds)))
        return 0
    if args.step == "serve":
        serve_pass_through(args.variant, args.port, args.otlp_url)
        return 0
    python = Path(args.otel_venv) / "bin" / "python"
    if not python.exists():
        print(f"not installed: no {python} (bash benchmarks/install-peers.sh)", file=sys.stderr)
        return 1
    began = time.monotonic()
    result: Json = {
        "encode": _in_otel_venv(python, ["encode", "--rounds", str(args.encode_rounds)]),
        "pass_through": measure_pass_through(python, [
            Load(load.name, load.stream, load.seconds * args.scale, load.rounds)
            for load in LOADS]),
    }
    result["seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
