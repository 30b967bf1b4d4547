"""The loopback benchmark: ``python -m otelproxy.bench [--quick] [--json] [--otlp]``.

One run starts, each in its own process (the machine may have only 2 cores, so servers never
share an interpreter with each other or with the load generator)::

    upstream    a minimal fake Anthropic API: POST /v1/messages answers a small JSON message, or
                with ``"stream": true`` an SSE stream of N ``content_block_delta`` events (~150
                bytes each) on a fixed schedule (``x-bench-events``, ``x-bench-interval-ms``)
    bare        an aiohttp pass-through with otelproxy's upstream seam and the same streaming loop
                (``readany`` -> ``write``), recording nothing: the reference
    otelproxy   the real ``Server`` recording into a temporary log dir (JSONL + SQLite)
    otlp-sink   with ``--otlp`` only: accepts POST /ingest/otlp/v1/{logs,traces}, answers 200

and this process is the load generator. Every figure is a difference or a ratio between targets
measured in the same run (``direct`` = the client talks to the upstream itself), never an absolute
time judged against a fixed number. Phases: warm-up; latency (1 connection, sequential,
interleaved in rounds); SSE (1 stream, then 50 concurrent); throughput (concurrency 32, fixed
time, bare and otelproxy alternated ABBA), first with every request a new one-message
conversation (a new session and a new JSONL file each: the record's worst case), then with
10-turn conversations (one session per conversation, as an agent sends them); then the record is
flushed, the proxy stopped and its JSONL ``request`` entries and SQLite ``exchanges`` rows are
counted against what was sent.

Every loop is bounded in count and in time; only 127.0.0.1 is contacted. uvloop is used in every
process when it is installed (it is a dependency of otelproxy on Linux and macOS, and otelproxy
itself runs on it), in none otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from otelproxy.server import loop_name, run

T = TypeVar("T")
Json = dict[str, Any]

HOST = "127.0.0.1"
MODEL = "claude-sonnet-4-5"
API_KEY = "sk-ant-api03-bench-0000000000000000000000000000000000000000"
TARGETS = ("direct", "bare", "otelproxy")
PROXIES = ("bare", "otelproxy")
EVENT_SIZE = 150
"""Bytes of one ``content_block_delta`` event on the wire, blank line included."""

# The targets the benchmark checks (printed PASS/FAIL; see README "Performance").
RPS_RATIO_MIN = 0.85
ADDED_P50_MAX_MS = 0.8
GAP_P99_SLACK_MS = 1.0
CONVERSATION_TURNS = 10
"""The second throughput phase: conversations of this many turns (the first: one each)."""

log = logging.getLogger("otelproxy.bench")


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What one run does; ``--quick`` shrinks every count so the run takes well under 60 s."""

    quick: bool = False
    requests: int = 2000
    """Sequential non-streaming requests per target in the latency phase."""
    latency_rounds: int = 10
    warmup: int = 200
    sse_events: int = 300
    sse_interval_ms: float = 10.0
    sse_concurrency: int = 50
    sse_single_repeats: int = 3
    """Rounds of one stream per target (targets interleaved; their gaps are pooled)."""
    sse_concurrent_repeats: int = 2
    """Rounds of ``sse_concurrency`` streams per target (targets interleaved)."""
    first_event_probes: int = 40
    """Short streams per target (targets interleaved) to time the first SSE event."""
    rps_concurrency: int = 32
    duration: float = 10.0
    """Seconds of the throughput phase per target (split in two slices, ABBA)."""
    otlp: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        base = cls(quick=True, requests=150, latency_rounds=5, warmup=30, sse_events=60,
                   sse_single_repeats=1, sse_concurrent_repeats=1, first_event_probes=10,
                   duration=1.0) if args.quick else cls()
        values: dict[str, Any] = {"otlp": args.otlp}
        if args.requests is not None:
            values["requests"] = args.requests
        if args.duration is not None:
            values["duration"] = args.duration
        if args.concurrency is not None:
            values["rps_concurrency"] = args.concurrency
        if args.sse_events is not None:
            values["sse_events"] = args.sse_events
        return Settings(**{**base.__dict__, **values})


def _positive(kind: Callable[[str], T], low: float, high: float) -> Callable[[str], T]:
    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= float(value) <= high:  # type: ignore[arg-type]
            raise argparse.ArgumentTypeError(f"{text} is out of range ({low:g}..{high:g})")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m otelproxy.bench",
        description="Loopback benchmark: fake upstream, bare aiohttp pass-through and otelproxy "
        "(recording on), each in its own process; prints added latency, SSE timing, requests/s, "
        "events lost, peak RSS and whether every exchange reached the record.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small counts (finishes in well under 60 s; used by the tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--requests", type=_positive(int, 10, 1_000_000), metavar="N",
                        help="sequential requests per target in the latency phase "
                        "(default 2000, quick 150)")
    parser.add_argument("--duration", type=_positive(float, 0.2, 600), metavar="S",
                        help="seconds of the requests/s phase per target (default 10, quick 1)")
    parser.add_argument("--concurrency", type=_positive(int, 1, 1000), metavar="N",
                        help="concurrent connections in the requests/s phase (default 32)")
    parser.add_argument("--sse-events", type=_positive(int, 2, 100_000), metavar="N",
                        help="content_block_delta events per stream (default 300, quick 60)")
    parser.add_argument("--otlp", action="store_true",
                        help="turn OTLP export on: start a loopback OTLP/HTTP sink and give "
                        "otelproxy its URL as seq_url")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a target is missed")
    return parser


# -- event loops and child processes -------------------------------------------------------------


def _proc_stat(pid: int | str) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def descendants() -> list[int]:
    """Every live process below this one (a recorder subprocess, say); empty without /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            children.setdefault(int(_proc_stat(name)[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    todo = [os.getpid()]
    while todo and len(found) < 1000:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_cpu_s() -> float:
    """CPU seconds (user + system, every thread) of this process and its descendants."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in descendants():
        try:
            fields = _proc_stat(pid)
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def _status_kb(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _memory_mb() -> dict[str, float]:
    """Resident set now and at its peak (``VmRSS``/``VmHWM``) in MB, of this process and of
    this process plus its live descendants (``tree_*``)."""
    rss, peak = _status_kb("self", "VmRSS"), _status_kb("self", "VmHWM")
    if rss is None or peak is None:
        import resource

        mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return {"peak_rss_mb": mb, "tree_peak_rss_mb": mb}
    tree_rss, tree_peak = rss, peak
    for pid in descendants():
        tree_rss += _status_kb(pid, "VmRSS") or 0
        tree_peak += _status_kb(pid, "VmHWM") or 0
    return {"rss_mb": round(rss / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "tree_rss_mb": round(tree_rss / 1024, 1),
            "tree_peak_rss_mb": round(tree_peak / 1024, 1)}


class Role:
    """A server run in a child process: started, asked for figures, stopped."""

    async def start(self) -> int:
        raise NotImplementedError

    async def command(self, name: str) -> Json:
        return {}

    async def stop(self) -> Json:
        raise NotImplementedError


async def _start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, backlog=1024)
    await site.start()
    return runner, int(runner.addresses[0][1])


# -- the fake upstream ---------------------------------------------------------------------------


def _sse(event: str, data: Json) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_DELTA_HEAD = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
               b'"delta":{"type":"text_delta","text":"')
_DELTA_TAIL = b'"}}\n\n'
_FILLER = b" the quick brown fox jumps over the lazy dog" * 4


def delta_event(index: int) -> bytes:
    """The ``index``-th text delta, exactly ``EVENT_SIZE`` bytes long."""
    text = b"tok %06d" % index
    room = EVENT_SIZE - len(_DELTA_HEAD) - len(_DELTA_TAIL) - len(text)
    return _DELTA_HEAD + text + _FILLER[:room] + _DELTA_TAIL


def _message(payload: Json, text: str, output_tokens: int) -> Json:
    return {
        "id": "msg_01BenchBenchBenchBenchBench", "type": "message", "role": "assistant",
        "model": payload.get("model", MODEL), "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def _last_user_text(payload: Json) -> str:
    messages = payload.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        if isinstance(content, str):
            return content
    return "ok"


class UpstreamRole(Role):
    """Minimal and fast: JSON echo, or an SSE stream of deltas on an absolute schedule."""

    def __init__(self) -> None:
        self.deltas_sent = 0
        self.requests = 0
        self.streams: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        self.runner, port = await _start_app(app)
        return port

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return web.json_response({"type": "error", "error": {
                "type": "invalid_request_error", "message": "body is not JSON"}}, status=400)
        if payload.get("stream"):
            return await self.stream(request, payload)
        reply = _message(payload, _last_user_text(payload), 3)
        return web.Response(body=orjson.dumps(reply), content_type="application/json",
                            headers={"request-id": "req_bench"})

    async def stream(self, request: web.Request, payload: Json) -> web.StreamResponse:
        events = min(max(int(request.headers.get("x-bench-events", "300")), 0), 100_000)
        interval = min(max(float(request.headers.get("x-bench-interval-ms", "10")), 0.0),
                       1000.0) / 1000
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "request-id": "req_bench"})
        await response.prepare(request)
        start = _message(payload, "", 1)
        start["content"], start["stop_reason"] = [], None
        await response.write(_sse("message_start", {"type": "message_start", "message": start}))
        await response.write(
            _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}})
            + _sse("ping", {"type": "ping"}))
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for index in range(events):
            delay = begin + (index + 1) * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await response.write(delta_event(index))
            self.deltas_sent += 1
        await response.write(
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _sse("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": events}})
            + _sse("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response

    async def stop(self) -> Json:
        await self.runner.cleanup()
        return {"requests": self.requests, "deltas_sent": self.deltas_sent, **_memory_mb()}


# -- the bare pass-through (the reference) -------------------------------------------------------


class BareRole(Role):
    """otelproxy's forwarding loop without the recording: no Exchange, no timings, no pipeline.

    Same upstream seam (``otelproxy.upstream.Upstream``: one shared ``ClientSession``, same
    connector and timeouts), same header filtering, same ``iter_any`` body read and the same
    ``readany()`` -> ``write()`` response loop, same ``AppRunner`` options.
    """

    async def start(self) -> int:
        from otelproxy import config as config_module
        from otelproxy.upstream import Upstream

        self.upstream = Upstream(config_module.build({}, list(config_module.DEFAULT_UPSTREAMS)))
        await self.upstream.start()
        app = web.Application(client_max_size=32 * 1024 * 1024 + 1)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner, port = await _start_app(app)
        return port

    async def forward(self, request: web.Request) -> web.StreamResponse:
        from otelproxy.upstream import request_headers, response_headers

        raw_path, _, query = request.raw_path.partition("?")
        segments = raw_path.split("/", 3)  # "", provider, host:port, rest
        if len(segments) < 4:
            return web.Response(status=404)
        url = f"http://{segments[2]}/{segments[3]}" + ("?" + query if query else "")
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
        headers = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                   for k, v in request.raw_headers]
        upstream = await self.upstream.send(request.method, url, request_headers(headers),
                                            bytes(body))
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason,
                headers=response_headers([
                    (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                    for k, v in upstream.raw_headers]),
            )
            await response.prepare(request)
            reader = upstream.content
            while True:
                data = await reader.readany()
                if not data:
                    break
                await response.write(data)
            await response.write_eof()
        return response

    async def stop(self) -> Json:
        await self.runner.cleanup()
        await self.upstream.close()
        return _memory_mb()


# -- otelproxy, recording ------------------------------------------------------------------------


class ProxyRole(Role):
    """The real ``Server`` with a temporary log dir; OTLP export when ``seq_url`` is given."""

    def __init__(self, upstream_url: str, log_dir: str, seq_url: str | None) -> None:
        self.upstream_url = upstream_url
        self.log_dir = log_dir
        self.seq_url = seq_url

    async def start(self) -> int:
        from otelproxy import config as config_module
        from otelproxy.server import Server

        values: dict[str, Any] = {"port": 0, "log_dir": self.log_dir, "grace_period": 5,
                                  "log_level": "warning"}
        if self.seq_url is not None:
            values["seq_url"] = self.seq_url
            values["seq_api_key"] = "bench-api-key"
        config = config_module.build(
            values, [*config_module.DEFAULT_UPSTREAMS, self.upstream_url])
        self.server = Server(config)
        await self.server.start()
        return self.server.port

    async def command(self, name: str) -> Json:
        if name != "flush":
            return {}
        pipeline = self.server.pipeline
        pending = int(getattr(pipeline, "pending", 0))
        began = time.perf_counter()
        flushed = await asyncio.to_thread(pipeline.flush, 120.0)
        return {"flushed": flushed, "flush_s": round(time.perf_counter() - began, 3),
                "pending": pending, **_memory_mb()}

    async def stop(self) -> Json:
        server = self.server
        memory = _memory_mb()  # before a recorder subprocess, if any, goes away
        await server.stop()
        memory.update({key: max(value, memory.get(key, 0.0))
                       for key, value in _memory_mb().items() if "peak" in key})
        counters = server.pipeline.counters()
        return {
            "submitted": getattr(server.pipeline, "submitted", None),
            "exchanges": server.state.stats.exchanges,
            "counters": counters,
            "otlp_sink_active": getattr(server, "otlp", None) is not None
            or any(key.startswith("otlp_") for key in counters),
            **memory,
        }


# -- the OTLP/HTTP sink (--otlp) -----------------------------------------------------------------


class OtlpSinkRole(Role):
    """Accepts OTLP/HTTP exports on Seq's paths and answers 200 with an empty response.

    It counts spans (SERVER spans apart) and log records by decoding the protobuf with
    ``opentelemetry-proto`` (installed with the OTLP exporter) when the run is over: the bodies
    are kept until then, so decoding them (which is Seq's work, not the proxy's) does not take
    CPU from the measured phases on the shared cores.
    """

    def __init__(self) -> None:
        self.posts: dict[str, int] = {"logs": 0, "traces": 0}
        self.bytes = 0
        self.api_keys: set[str] = set()
        self.spans = 0
        self.server_spans = 0
        self.log_records = 0
        self.undecoded = 0
        self.received: list[tuple[str, bytes]] = []

    async def start(self) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/ingest/otlp/v1/{signal:logs|traces}", self.ingest)
        self.runner, port = await _start_app(app)
        return port

    async def ingest(self, request: web.Request) -> web.Response:
        body = await request.read()
        signal = request.match_info["signal"]
        self.posts[signal] += 1
        self.bytes += len(body)
        self.api_keys.add(request.headers.get("X-Seq-ApiKey", ""))
        self.received.append((signal, body))  # aiohttp has decoded any Content-Encoding
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    def count(self, signal: str, body: bytes) -> None:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        if signal == "traces":
            traces = ExportTraceServiceRequest.FromString(body)
            for resource in traces.resource_spans:
                for scope in resource.scope_spans:
                    self.spans += len(scope.spans)
                    self.server_spans += sum(
                        span.kind == Span.SpanKind.SPAN_KIND_SERVER for span in scope.spans)
        else:
            logs = ExportLogsServiceRequest.FromString(body)
            for resource_logs in logs.resource_logs:
                for scope_logs in resource_logs.scope_logs:
                    self.log_records += len(scope_logs.log_records)

    async def stop(self) -> Json:
        await self.runner.cleanup()
        for signal, body in self.received:
            try:
                self.count(signal, body)
            except Exception:  # a payload we cannot read is counted, never fatal
                self.undecoded += 1
        return {"posts": self.posts, "bytes": self.bytes, "spans": self.spans,
                "server_spans": self.server_spans, "log_records": self.log_records,
                "undecoded_posts": self.undecoded,
                "api_key_seen": "bench-api-key" in self.api_keys}


def _make_role(name: str, options: Mapping[str, Any]) -> Role:
    if name == "upstream":
        return UpstreamRole()
    if name == "bare":
        return BareRole()
    if name == "otelproxy":
        return ProxyRole(str(options["upstream_url"]), str(options["log_dir"]),
                         options.get("seq_url"))
    if name == "otlp-sink":
        return OtlpSinkRole()
    raise ValueError(f"unknown role {name!r}")


def child_main(name: str, conn: Connection, options: Mapping[str, Any]) -> None:
    """Entry point of a server process: start, answer commands on ``conn``, stop on "stop"."""
    for key in [key for key in os.environ if key.startswith("OTEL_")]:
        del os.environ[key]  # export goes to the bench's own loopback sink or nowhere
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    try:
        run(_serve_child(_make_role(name, options), conn))
    except BaseException:
        conn.send({"error": traceback.format_exc()})
        raise


async def _serve_child(role: Role, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(str(conn.recv()))
        except EOFError:  # the load generator is gone: stop
            loop.remove_reader(conn.fileno())
            commands.put_nowait("stop")

    port = await role.start()
    conn.send({"port": port, **_memory_mb()})
    loop.add_reader(conn.fileno(), readable)
    while True:
        name = await commands.get()
        if name == "stop":
            break
        if name == "cpu":
            times = os.times()
            conn.send({"cpu_s": tree_cpu_s(), "main_cpu_s": times.user + times.system})
            continue
        conn.send(await role.command(name))
    loop.remove_reader(conn.fileno())
    conn.send(await role.stop())


class BenchError(Exception):
    """The benchmark could not run to the end (a server failed, a reply timed out)."""


class Child:
    """The load generator's handle on one server process."""

    def __init__(self, ctx: SpawnContext, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=child_main, args=(name, theirs, dict(options)),
                                   name=f"otelproxy-bench-{name}", daemon=False)
        # not a daemon: a server may start processes of its own (a recorder); close() ends it
        self.process.start()
        theirs.close()
        self.started: Json = {}

    def ready(self, timeout: float = 60.0) -> int:
        self.started = self.reply(timeout)
        return int(self.started["port"])

    def reply(self, timeout: float) -> Json:
        if not self.conn.poll(timeout):
            raise BenchError(f"{self.name} did not answer within {timeout:g} s")
        try:
            answer: Json = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.name} exited (status {self.process.exitcode})") from None
        if "error" in answer:
            raise BenchError(f"{self.name} failed:\n{answer['error']}")
        return answer

    def call(self, command: str, timeout: float) -> Json:
        self.conn.send(command)
        return self.reply(timeout)

    def close(self) -> None:
        """Make sure the process is gone (it normally exits by itself after "stop")."""
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("stop")  # a no-op when "stop" was sent already
            self.process.join(15)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


# -- figures -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 < fraction <= 1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def _over_direct(samples: Mapping[str, Sequence[int]]) -> Json:
    """Per target, p50 and p99 of ``samples`` (ns) in ms; for the proxies, p50 added to direct."""
    out: Json = {target: {"p50_ms": _ms(percentile(samples[target], 0.5)),
                          "p99_ms": _ms(percentile(samples[target], 0.99))}
                 for target in TARGETS}
    for target in PROXIES:
        out[target]["added_p50_ms"] = round(out[target]["p50_ms"] - out["direct"]["p50_ms"], 3)
    return out


# -- the load generator --------------------------------------------------------------------------


def _request_body(stream: bool, turn: int = 0) -> bytes:
    return orjson.dumps({
        "model": MODEL, "max_tokens": 1024, "stream": stream,
        "messages": [{"role": "user", "content": f"Say hello, bench turn {turn}."}],
    })


def conversation_body(conversation: str, turn: int) -> bytes:
    """Turn ``turn`` (0-based) of a conversation, as a client resends it: every earlier user
    message with the answer the bench upstream gave it (it echoes the user's text), then the
    new user message. The proxy sees one session growing, as with a real agent."""
    messages: list[Json] = []
    for index in range(turn + 1):
        text = f"{conversation}: turn {index}, say hello."
        messages.append({"role": "user", "content": text})
        if index < turn:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return orjson.dumps({"model": MODEL, "max_tokens": 1024, "stream": False,
                         "messages": messages})


HEADERS = {"content-type": "application/json", "x-api-key": API_KEY,
           "anthropic-version": "2023-06-01", "user-agent": "otelproxy-bench"}


@dataclass
class Targets:
    urls: dict[str, str]
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TARGETS, 0))


async def _post(session: aiohttp.ClientSession, targets: Targets, target: str,
                body: bytes) -> int:
    """One non-streaming request; returns its latency in ns (the whole body read)."""
    targets.sent[target] += 1
    began = time.perf_counter_ns()
    async with session.post(targets.urls[target], data=body, headers=HEADERS) as response:
        data = await response.read()
        if response.status != 200 or not data.startswith(b"{"):
            targets.errors[target] += 1
    return time.perf_counter_ns() - began


@dataclass
class StreamResult:
    first_event_ns: int | None = None
    gaps_ns: list[int] = field(default_factory=list)
    deltas: int = 0
    complete: bool = False


async def _stream(session: aiohttp.ClientSession, targets: Targets, target: str,
                  events: int, interval_ms: float) -> StreamResult:
    """One SSE stream; each event is stamped with the arrival time of the chunk that ended it."""
    result = StreamResult()
    headers = {**HEADERS, "x-bench-events": str(events), "x-bench-interval-ms": str(interval_ms)}
    targets.sent[target] += 1
    began = time.perf_counter_ns()
    last: int | None = None
    pending = b""
    async with session.post(targets.urls[target], data=_request_body(True),
                            headers=headers) as response:
        if response.status != 200:
            targets.errors[target] += 1
        reader = response.content
        while True:
            data = await reader.readany()
            if not data:
                break
            now = time.perf_counter_ns()
            pending += data
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                if result.first_event_ns is None:
                    result.first_event_ns = now - began
                if event.startswith(b"event: content_block_delta"):
                    result.deltas += 1
                    if last is not None:
                        result.gaps_ns.append(now - last)
                    last = now
                elif event.startswith(b"event: message_stop"):
                    result.complete = True
    return result


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=120, sock_read=30), auto_decompress=False,
    )


class LoadGenerator:
    """Runs the phases against the three targets; ``flush()`` drains otelproxy's record."""

    def __init__(self, settings: Settings, targets: Targets,
                 control: Mapping[str, Callable[[str], Json]],
                 progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.targets = targets
        self.control = control
        """Per proxy target: send a command ("cpu", "flush") to its process, get the answer."""
        self.progress = progress
        self.pools: dict[str, aiohttp.ClientSession] = {}
        """Per target, for the concurrent phases (warmed up, so no phase pays for connects)."""
        self.singles: dict[str, aiohttp.ClientSession] = {}
        """Per target, one connection for the sequential latency phase."""
        self.slices = 0
        """Throughput slices run so far: conversation names never repeat between slices."""

    async def _flush(self) -> Json:
        """Wait until otelproxy has recorded everything sent so far."""
        return await asyncio.to_thread(self.control["otelproxy"], "flush")

    async def _cpu(self, target: str) -> tuple[float, float]:
        """CPU seconds (user + system, all threads) the target's process tree and its main
        process have used so far."""
        if target not in self.control:
            return 0.0, 0.0
        answer = await asyncio.to_thread(self.control[target], "cpu")
        return float(answer["cpu_s"]), float(answer["main_cpu_s"])

    async def run(self) -> Json:
        width = max(self.settings.rps_concurrency, self.settings.sse_concurrency)
        self.pools = {t: _session(width) for t in TARGETS}
        self.singles = {t: _session(1) for t in TARGETS}
        try:
            return await self._phases()
        finally:
            for session in [*self.pools.values(), *self.singles.values()]:
                await session.close()

    async def _phases(self) -> Json:
        results: Json = {}
        self.progress("warm-up")
        await self.warmup()
        await self._flush()
        self.progress("latency: 1 connection, sequential")
        results["latency"] = await self.latency()
        await self._flush()
        self.progress("SSE: first-event delay")
        results["first_event"] = await self.first_event()
        await self._flush()
        sse: Json = {}
        for streams in (1, self.settings.sse_concurrency):
            self.progress(f"SSE: {streams} concurrent stream(s)")
            sse[str(streams)] = await self.sse(streams)
            await self._flush()
        results["sse"] = sse
        self.progress(f"requests/s: concurrency {self.settings.rps_concurrency}, "
                      "a new conversation each request")
        results["rps"] = await self.rps()
        self.progress(f"requests/s: {CONVERSATION_TURNS}-turn conversations")
        results["rps_conversations"] = await self.rps(CONVERSATION_TURNS)
        return results

    async def warmup(self) -> None:
        """Sequential and concurrent requests and streams, filling every connection pool."""
        s = self.settings
        width = max(s.rps_concurrency, s.sse_concurrency)
        for target in TARGETS:
            for turn in range(s.warmup):
                await asyncio.wait_for(_post(self.singles[target], self.targets, target,
                                             _request_body(False, turn)), 30)
            pool = self.pools[target]
            await asyncio.wait_for(asyncio.gather(*(
                _post(pool, self.targets, target, _request_body(False)) for _ in range(width))),
                60)
            await asyncio.wait_for(asyncio.gather(*(
                _stream(pool, self.targets, target, 20, 1.0) for _ in range(width))), 60)

    async def latency(self) -> Json:
        """Sequential requests on one kept-alive connection per target, targets interleaved."""
        s = self.settings
        samples: dict[str, list[int]] = {t: [] for t in TARGETS}
        cpu = dict.fromkeys(TARGETS, 0.0)
        main_cpu = dict.fromkeys(TARGETS, 0.0)
        body = _request_body(False)
        per_round = max(1, s.requests // s.latency_rounds)
        for round_no in range(s.latency_rounds):
            order = TARGETS[round_no % 3:] + TARGETS[:round_no % 3]
            last = round_no == s.latency_rounds - 1
            count = s.requests - per_round * (s.latency_rounds - 1) if last else per_round
            for target in order:
                cpu_before, main_before = await self._cpu(target)
                for _ in range(count):
                    samples[target].append(await asyncio.wait_for(
                        _post(self.singles[target], self.targets, target, body), 30))
                if target == "otelproxy":
                    await self._flush()  # its recording work is part of its cost
                cpu_after, main_after = await self._cpu(target)
                cpu[target] += cpu_after - cpu_before
                main_cpu[target] += main_after - main_before
        out: Json = {"requests": s.requests, **_over_direct(samples)}
        for target in PROXIES:
            out[target]["added_p99_ms"] = round(
                out[target]["p99_ms"] - out["direct"]["p99_ms"], 3)
            out[target]["cpu_ms_per_request"] = round(cpu[target] * 1000 / s.requests, 3)
            out[target]["main_cpu_ms_per_request"] = round(
                main_cpu[target] * 1000 / s.requests, 3)
        out["otelproxy"]["over_bare_p50_ms"] = round(
            out["otelproxy"]["p50_ms"] - out["bare"]["p50_ms"], 3)
        return out

    async def first_event(self) -> Json:
        """Request sent -> first SSE event received, over short single streams."""
        s = self.settings
        delays: dict[str, list[int]] = {t: [] for t in TARGETS}
        for probe in range(s.first_event_probes):
            for target in TARGETS[probe % 3:] + TARGETS[:probe % 3]:
                result = await asyncio.wait_for(
                    _stream(self.singles[target], self.targets, target, 3, 1.0), 30)
                if result.first_event_ns is not None:
                    delays[target].append(result.first_event_ns)
        return {"probes": s.first_event_probes, **_over_direct(delays)}

    async def sse(self, streams: int) -> Json:
        s = self.settings
        repeats = s.sse_single_repeats if streams == 1 else s.sse_concurrent_repeats
        out: Json = {"streams": streams, "repeats": repeats, "events": s.sse_events,
                     "interval_ms": s.sse_interval_ms}
        bound = 60 + s.sse_events * s.sse_interval_ms / 1000 * 3
        pooled: dict[str, list[StreamResult]] = {t: [] for t in TARGETS}
        for round_no in range(repeats):  # rounds interleave the targets: noise hits all alike
            for target in TARGETS[round_no % 3:] + TARGETS[:round_no % 3]:
                pooled[target].extend(await asyncio.wait_for(asyncio.gather(*(
                    _stream(self.pools[target], self.targets, target, s.sse_events,
                            s.sse_interval_ms)
                    for _ in range(streams))), bound))
                if target == "otelproxy":
                    await self._flush()  # each round starts with nothing left to record
        for target in TARGETS:
            results = pooled[target]
            gaps = [gap for r in results for gap in r.gaps_ns]
            firsts = [r.first_event_ns for r in results if r.first_event_ns is not None]
            expected = len(results) * s.sse_events
            received = sum(r.deltas for r in results)
            out[target] = {
                "first_event_p50_ms": _ms(percentile(firsts, 0.5)),
                "first_event_max_ms": _ms(max(firsts, default=math.nan)),
                "gap_p50_ms": _ms(percentile(gaps, 0.5)),
                "gap_p99_ms": _ms(percentile(gaps, 0.99)),
                "gap_max_ms": _ms(max(gaps, default=math.nan)),
                "events_sent": expected, "events_received": received,
                "events_lost": expected - received,
                "incomplete_streams": sum(not r.complete for r in results),
            }
        for target in PROXIES:
            out[target]["gap_p99_over_direct_ms"] = round(
                out[target]["gap_p99_ms"] - out["direct"]["gap_p99_ms"], 3)
            out[target]["first_event_added_ms"] = round(
                out[target]["first_event_p50_ms"] - out["direct"]["first_event_p50_ms"], 3)
        out["otelproxy"]["gap_p99_over_bare_ms"] = round(
            out["otelproxy"]["gap_p99_ms"] - out["bare"]["gap_p99_ms"], 3)
        return out

    async def _throughput(self, target: str, seconds: float,
                          turns: int) -> tuple[int, float]:
        """Requests completed by ``rps_concurrency`` workers in ``seconds`` (all awaited).
        With ``turns`` 1 every request is the same one-message conversation (a new session
        each time); otherwise each worker runs conversations of ``turns`` turns, one after
        another, each with its own first message."""
        s = self.settings
        single = _request_body(False)
        session = self.pools[target]
        done = 0
        began = time.perf_counter()
        deadline = began + seconds
        self.slices += 1

        async def worker(number: int) -> None:
            nonlocal done
            for index in range(10_000_000):
                if time.perf_counter() >= deadline:
                    return
                if turns == 1:
                    body = single
                else:
                    name = f"bench {self.slices}.{number}.{index // turns}"
                    body = conversation_body(name, index % turns)
                await _post(session, self.targets, target, body)
                done += 1

        await asyncio.wait_for(
            asyncio.gather(*(worker(n) for n in range(s.rps_concurrency))), seconds + 60)
        return done, time.perf_counter() - began

    async def rps(self, turns: int = 1) -> Json:
        """Bare and otelproxy alternated ABBA; otelproxy's time includes recording its backlog.

        After each otelproxy slice the load generator waits until the record is flushed, so a
        backlog never steals CPU from the next slice, and otelproxy's sustained figure counts
        the time its pipeline needed to record what it served. ``turns``: see ``_throughput``.
        """
        s = self.settings
        half = s.duration / 2
        done = dict.fromkeys(TARGETS, 0)
        served = dict.fromkeys(TARGETS, 0.0)
        recording = dict.fromkeys(TARGETS, 0.0)
        cpu = dict.fromkeys(TARGETS, 0.0)
        main_cpu = dict.fromkeys(TARGETS, 0.0)
        backlog = 0
        order = ("direct", "bare", "otelproxy", "otelproxy", "bare")
        for target in order if turns == 1 else order[1:]:
            cpu_before, main_before = await self._cpu(target)
            count, seconds = await self._throughput(target, half, turns)
            done[target] += count
            served[target] += seconds
            if target == "otelproxy":
                began = time.perf_counter()
                backlog = max(backlog, int((await self._flush())["pending"]))
                recording[target] += time.perf_counter() - began
            cpu_after, main_after = await self._cpu(target)
            cpu[target] += cpu_after - cpu_before
            main_cpu[target] += main_after - main_before
        out: Json = {"concurrency": s.rps_concurrency, "duration_s": s.duration,
                     "turns_per_conversation": turns}
        for target in TARGETS if turns == 1 else PROXIES:
            out[target] = {"requests": done[target],
                           "rps": round(done[target] / served[target], 1)}
        for target in PROXIES:
            out[target]["cpu_ms_per_request"] = round(cpu[target] * 1000 / done[target], 3)
            out[target]["main_cpu_ms_per_request"] = round(
                main_cpu[target] * 1000 / done[target], 3)
        proxy = out["otelproxy"]
        proxy["rps_served"] = proxy["rps"]
        proxy["record_backlog"] = backlog
        proxy["record_flush_s"] = round(recording["otelproxy"], 3)
        proxy["rps"] = round(done["otelproxy"] / (served["otelproxy"]
                                                  + recording["otelproxy"]), 1)
        out["ratio"] = round(proxy["rps"] / out["bare"]["rps"], 3)
        out["ratio_served"] = round(proxy["rps_served"] / out["bare"]["rps"], 3)
        return out


# -- the record ----------------------------------------------------------------------------------


def count_record(log_dir: Path) -> Json:
    """``request`` entries in every JSONL file and rows of the SQLite ``exchanges`` table."""
    requests = 0
    files = 0
    for path in log_dir.rglob("*.jsonl"):
        files += 1
        for line in path.read_bytes().splitlines():
            if line and orjson.loads(line).get("type") == "request":
                requests += 1
    rows = -1
    sessions = longest = None
    db_path = log_dir / "sessions.db"
    if db_path.exists():
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            rows = int(conn.execute("SELECT count(*) FROM exchanges").fetchone()[0])
            sessions, longest = conn.execute(
                "SELECT count(DISTINCT session_id), max(seq) FROM exchanges").fetchone()
        finally:
            conn.close()
    return {"jsonl_files": files, "jsonl_requests": requests, "sqlite_exchanges": rows,
            "sessions": sessions, "longest_session": longest}


# -- one run -------------------------------------------------------------------------------------


def _targets(results: Json) -> list[Json]:
    latency, rps = results["latency"], results["rps"]
    checks = [
        {"name": "requests/s >= 0.85 x bare pass-through",
         "value": rps["ratio"], "limit": RPS_RATIO_MIN, "pass": rps["ratio"] >= RPS_RATIO_MIN},
        {"name": "added latency p50 <= 0.8 ms (1 connection)",
         "value": latency["otelproxy"]["added_p50_ms"], "limit": ADDED_P50_MAX_MS,
         "pass": latency["otelproxy"]["added_p50_ms"] <= ADDED_P50_MAX_MS},
    ]
    for streams, sse in results["sse"].items():
        over = sse["otelproxy"]["gap_p99_over_direct_ms"]
        checks.append({"name": f"SSE gap p99 within 1 ms of direct ({streams} stream(s))",
                       "value": over, "limit": GAP_P99_SLACK_MS,
                       "pass": over <= GAP_P99_SLACK_MS})
    checks.append({"name": "no SSE event lost", "value": results["events_lost"], "limit": 0,
                   "pass": results["events_lost"] == 0})
    checks.append({"name": "every exchange in the record (JSONL and SQLite)",
                   "value": results["recorded"], "limit": results["sent"],
                   "pass": results["all_recorded"]})
    otlp = results.get("otlp")
    if otlp is not None:
        checks.append({"name": "every exchange exported over OTLP (one SERVER span each)",
                       "value": otlp["server_spans"], "limit": results["sent"],
                       "pass": otlp["server_spans"] == results["sent"]})
    return checks


def bench(settings: Settings, progress: Callable[[str], None]) -> Json:
    """Start the servers, run the phases, stop everything; return every figure."""
    ctx = multiprocessing.get_context("spawn")
    work = Path(tempfile.mkdtemp(prefix="otelproxy-bench-"))
    log_dir = work / "logs"
    children: list[Child] = []
    try:
        progress("starting upstream, bare pass-through and otelproxy processes")
        upstream = Child(ctx, "upstream", {})
        children.append(upstream)
        sink: Child | None = None
        if settings.otlp:
            sink = Child(ctx, "otlp-sink", {})
            children.append(sink)
        upstream_port = upstream.ready()
        upstream_authority = f"{HOST}:{upstream_port}"
        seq_url = f"http://{HOST}:{sink.ready()}" if sink is not None else None
        bare = Child(ctx, "bare", {})
        children.append(bare)
        proxy = Child(ctx, "otelproxy", {"upstream_url": f"http://{upstream_authority}",
                                         "log_dir": str(log_dir), "seq_url": seq_url})
        children.append(proxy)
        route = f"/anthropic/{upstream_authority}/v1/messages"
        targets = Targets({
            "direct": f"http://{upstream_authority}/v1/messages",
            "bare": f"http://{HOST}:{bare.ready()}{route}",
            "otelproxy": f"http://{HOST}:{proxy.ready()}{route}",
        })

        control = {
            "bare": lambda command: bare.call(command, 30),
            "otelproxy": lambda command: proxy.call(command, 180),
        }
        results = run(LoadGenerator(settings, targets, control, progress).run())

        progress("stopping; counting the record")
        proxy_stats = proxy.call("stop", 120)
        bare_stats = bare.call("stop", 30)
        upstream_stats = upstream.call("stop", 30)
        sink_stats = sink.call("stop", 30) if sink is not None else None
        record = count_record(log_dir)
    finally:
        for child in children:
            child.close()
        shutil.rmtree(work, ignore_errors=True)

    sse_lost = {t: sum(results["sse"][k][t]["events_lost"] for k in results["sse"])
                for t in TARGETS}
    sent = targets.sent["otelproxy"]
    recorded = record["jsonl_requests"]
    counters = proxy_stats["counters"]
    results.update({
        "settings": {**settings.__dict__, "loop": loop_name(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "aiohttp": aiohttp.__version__},
        "events_lost": sse_lost["otelproxy"],
        "events_lost_by_target": sse_lost,
        "upstream_deltas_sent": upstream_stats["deltas_sent"],
        "sent": sent,
        "recorded": recorded,
        "all_recorded": recorded == sent and record["sqlite_exchanges"] == sent,
        "record": {**record, "sent": sent, "records_dropped": counters.get("records_dropped", 0),
                   "sink_errors": counters.get("sink_errors", 0),
                   "records_written": counters.get("records_written", 0)},
        "errors": targets.errors,
        "requests_sent": targets.sent,
        "memory": {"otelproxy_peak_rss_mb": proxy_stats.get("tree_peak_rss_mb"),
                   "otelproxy_main_peak_rss_mb": proxy_stats.get("peak_rss_mb"),
                   "otelproxy_start_rss_mb": proxy.started.get("tree_rss_mb"),
                   "bare_peak_rss_mb": bare_stats.get("peak_rss_mb")},
        "otlp": None if sink_stats is None else {
            "seq_url": seq_url, "sink_active": proxy_stats["otlp_sink_active"],
            "counters": {k: v for k, v in counters.items() if k.startswith("otlp")},
            **sink_stats},
    })
    results["targets"] = _targets(results)
    results["pass"] = all(check["pass"] for check in results["targets"])
    return results


# -- output --------------------------------------------------------------------------------------


def format_report(r: Json) -> str:
    s, lat, rps = r["settings"], r["latency"], r["rps"]
    lines = [
        f"otelproxy benchmark: loopback, Python {s['python']}, aiohttp {s['aiohttp']}, "
        f"{s['loop']} loop, {s['cpus']} CPU(s); recording on (JSONL + SQLite)"
        + (", OTLP export on" if s["otlp"] else "") + (" [quick]" if s["quick"] else ""),
        "",
        f"Latency: non-streaming POST /v1/messages, 1 connection, sequential, "
        f"{lat['requests']} requests per target",
        f"  {'target':<10} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10} "
        f"{'CPU ms/req':>10}",
    ]
    for target in TARGETS:
        row = lat[target]
        added = ("" if target == "direct" else
                 f" {row['added_p50_ms']:>10.3f} {row['added_p99_ms']:>10.3f} "
                 f"{row['cpu_ms_per_request']:>10.3f}")
        lines.append(f"  {target:<10} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f}{added}")
    lines.append(f"  recording's share (otelproxy p50 - bare p50): "
                 f"{lat['otelproxy']['over_bare_p50_ms']:.3f} ms; otelproxy's main process "
                 f"{lat['otelproxy']['main_cpu_ms_per_request']:.3f} CPU ms/req")
    first = r["first_event"]
    lines += ["", f"SSE first-event delay (request sent -> first event), {first['probes']} short "
              "streams per target, 1 connection:"]
    for target in TARGETS:
        added = "" if target == "direct" else f", added p50 {first[target]['added_p50_ms']:.3f}"
        lines.append(f"  {target:<10} p50 {first[target]['p50_ms']:.3f} ms, "
                     f"p99 {first[target]['p99_ms']:.3f} ms{added}")
    for key, sse in r["sse"].items():
        lines += [
            "",
            f"SSE: {sse['events']} events {sse['interval_ms']:g} ms apart, {key} concurrent "
            f"stream(s) x {sse['repeats']} run(s); gaps measured at the client",
            f"  {'target':<10} {'1st evt p50':>11} {'gap p50':>8} {'gap p99':>8} "
            f"{'gap max':>8} {'p99-direct':>10} {'lost':>5}",
        ]
        for target in TARGETS:
            row = sse[target]
            over = "" if target == "direct" else f"{row['gap_p99_over_direct_ms']:.3f}"
            lines.append(
                f"  {target:<10} {row['first_event_p50_ms']:>11.3f} {row['gap_p50_ms']:>8.3f} "
                f"{row['gap_p99_ms']:>8.3f} {row['gap_max_ms']:>8.3f} {over:>10} "
                f"{row['events_lost']:>5}")
        lines.append(f"  otelproxy gap p99 - bare gap p99: "
                     f"{sse['otelproxy']['gap_p99_over_bare_ms']:.3f} ms")
    proxy = rps["otelproxy"]
    lines += [
        "",
        f"Requests/s: concurrency {rps['concurrency']}, {rps['duration_s']:g} s per target "
        "(bare and otelproxy alternated ABBA; otelproxy's time includes flushing its record)",
        f"  {'direct':<10} {rps['direct']['rps']:>9.1f} req/s ({rps['direct']['requests']} "
        "requests)",
        f"  {'bare':<10} {rps['bare']['rps']:>9.1f} req/s ({rps['bare']['requests']} requests, "
        f"{rps['bare']['cpu_ms_per_request']:.3f} CPU ms/req)",
        f"  {'otelproxy':<10} {proxy['rps']:>9.1f} req/s ({proxy['requests']} requests, "
        f"{proxy['cpu_ms_per_request']:.3f} CPU ms/req, {proxy['main_cpu_ms_per_request']:.3f} "
        f"in the main process; served at {proxy['rps_served']:.1f} "
        f"req/s, then {proxy['record_flush_s']:.2f} s to record a backlog of up to "
        f"{proxy['record_backlog']})",
        f"  otelproxy / bare = {rps['ratio']:.3f} (served only: {rps['ratio_served']:.3f})",
    ]
    talk = r["rps_conversations"]
    lines += [
        f"Requests/s in {talk['turns_per_conversation']}-turn conversations (bare and otelproxy "
        "only, BAAB): bare "
        f"{talk['bare']['rps']:.1f} req/s ({talk['bare']['cpu_ms_per_request']:.3f} CPU ms/req), "
        f"otelproxy {talk['otelproxy']['rps']:.1f} req/s "
        f"({talk['otelproxy']['cpu_ms_per_request']:.3f} CPU ms/req, served at "
        f"{talk['otelproxy']['rps_served']:.1f})",
        f"  otelproxy / bare = {talk['ratio']:.3f} (served only: {talk['ratio_served']:.3f})",
    ]
    rec, mem = r["record"], r["memory"]
    lines += [
        "",
        f"Record: {rec['sent']} requests sent to otelproxy; {rec['jsonl_requests']} JSONL "
        f"request entries in {rec['jsonl_files']} file(s); {rec['sqlite_exchanges']} SQLite rows "
        f"in {rec['sessions']} session(s), the longest {rec['longest_session']} turns; "
        f"dropped {rec['records_dropped']}, sink errors {rec['sink_errors']}",
        f"otelproxy process: peak RSS {mem['otelproxy_peak_rss_mb']} MB with its subprocesses, "
        f"{mem['otelproxy_main_peak_rss_mb']} MB the main process (at start "
        f"{mem['otelproxy_start_rss_mb']} MB; bare pass-through peak "
        f"{mem['bare_peak_rss_mb']} MB)",
        f"Events lost: otelproxy {r['events_lost']}; by target {r['events_lost_by_target']}",
    ]
    if any(r["errors"].values()):
        lines.append(f"Non-200 answers: {r['errors']}")
    if r["otlp"] is not None:
        otlp = r["otlp"]
        state = "active" if otlp["sink_active"] else (
            "NOT active (otlp.build_sink returned None; seq_url was passed)")
        lines.append(f"OTLP: export {state}; sink got {otlp['posts']['traces']} trace and "
                     f"{otlp['posts']['logs']} log POST(s), {otlp['bytes']} bytes: "
                     f"{otlp['spans']} spans ({otlp['server_spans']} SERVER), "
                     f"{otlp['log_records']} log records; proxy counters {otlp['counters']}")
    lines += ["", "Targets:"]
    for check in r["targets"]:
        lines.append(f"  {'PASS' if check['pass'] else 'FAIL'}  {check['name']}: "
                     f"{check['value']} (limit {check['limit']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_args(args)
    began = time.monotonic()

    def progress(message: str) -> None:
        sys.stderr.write(f"[bench {time.monotonic() - began:6.1f} s] {message}\n")
        sys.stderr.flush()

    try:
        results = bench(settings, progress)
    except BenchError as exc:
        sys.stderr.write(f"otelproxy bench: error: {exc}\n")
        return 2
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(format_report(results) + f"\n\n(run took {results['elapsed_s']} s)\n")
    return 1 if args.check and not results["pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
