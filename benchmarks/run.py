"""The benchmark: ``python -m benchmarks.run [--quick] [--json | --markdown] [--targets a,b]``.

One run starts the fake upstream and the OTLP receiver (``benchmarks.servers``) and every target
(``benchmarks.targets``: bare pass-through, otelproxy, otelproxy with OTLP export, mitmproxy,
claude-tap), each in its own process. With two or more CPUs the load generator, the upstream,
the receiver and wrk run on CPU 0 and every measured proxy's whole process tree (otelproxy and
its recorder subprocess) on CPU 1, so a proxy's CPU time is its own and the figures are ratios
and differences within the run, never absolute times judged against a fixed number.

Phases, targets interleaved in each so noise on a shared machine hits them alike:

1. idle: resident memory of each proxy's tree after start and after a short warm-up;
2. latency: sequential non-streaming requests of about 100 KB (a late Claude Code turn) on one
   kept-alive connection; p50/p99 per target, differences to direct and to bare;
3. Claude Code: 20 concurrent conversations (``benchmarks.traffic``: ~15 KB system prompt,
   ~25 KB tools, messages growing each turn up to about 100 KB, 150-event streamed answers);
   CPU time of the proxy's tree per exchange, including the time otelproxy needs to finish its
   record (and its OTLP export) afterwards;
4. SSE at 1, 50 and 500 concurrent streams: gaps between events and the first event at the
   client, against direct; events lost; the tree's resident memory while 500 streams are open;
5. small POSTs with wrk: requests/s against bare.

Every loop is bounded in count and time; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import procs, servers, targets, traffic
from benchmarks.procs import HOST, Pinning, Process
from benchmarks.targets import OTHER, OTHER_OTLP, OURS, PEERS_VENV, PROXIES, Target

Json = dict[str, Any]

# The project's targets (issue 13), checked for otelproxy and otelproxy+otlp.
CPU_RATIO_MAX = {"otelproxy": 1.5, "otelproxy+otlp": 1.7}
ADDED_P50_MAX_MS = 0.5
ADDED_P99_MAX_MS = 2.0
GAP_P99_SLACK_MS = 1.0
FIRST_EVENT_SLACK_MS = 3.0
IDLE_RSS_MAX_MIB = 60.0
RSS_PER_100_STREAMS_MAX_MIB = 8.0

PHASES = ("latency", "claude_code", "sse", "wrk")
"""The phases after the idle one (which always runs: it warms every target up and gives the
resident set the SSE phase's per-stream figure starts from). ``sse1``, ``sse50``, ``sse500``
name one SSE level."""


@dataclass(frozen=True)
class StreamLevel:
    """One SSE phase: ``streams`` concurrent streams of ``deltas`` text deltas ``interval_ms``
    apart, ``repeats`` rounds per target; then ``probes`` short streams per target, one at a
    time, targets interleaved, to time more first events."""

    streams: int
    deltas: int
    interval_ms: float
    repeats: int
    probes: int = 0


@dataclass(frozen=True)
class Settings:
    """What one run does; ``quick`` shrinks every count (a smoke run for the tests)."""

    quick: bool = False
    targets: tuple[str, ...] = PROXIES
    latency_requests: int = 1000
    latency_rounds: int = 10
    conversations: int = 20
    cc_seconds: float = 20.0
    """Seconds of Claude Code traffic per target, in two slices (targets in ABBA order)."""
    cc_interval_ms: float = 3.0
    """Spacing of a Claude Code answer's deltas (so 144 deltas last about 0.43 s)."""
    levels: tuple[StreamLevel, ...] = (
        StreamLevel(1, traffic.DELTA_COUNT, 10.0, 3, probes=40),
        StreamLevel(50, traffic.DELTA_COUNT, 10.0, 3),
        StreamLevel(500, 40, 75.0, 3),
    )
    wrk_seconds: float = 4.0
    wrk_connections: int = 16
    peers_venv: str = str(PEERS_VENV)
    other_src: str = ""
    """``--other-src``: the code the ``otelproxy-other`` target runs."""
    phases: tuple[str, ...] = PHASES

    def runs(self, phase: str) -> bool:
        return phase in self.phases

    def runs_level(self, level: StreamLevel) -> bool:
        return "sse" in self.phases or f"sse{level.streams}" in self.phases

    @classmethod
    def quick_run(cls, names: tuple[str, ...], peers_venv: str) -> Settings:
        return cls(quick=True, targets=names, peers_venv=peers_venv, latency_requests=30,
                   latency_rounds=3,
                   cc_seconds=3.0, levels=(StreamLevel(1, 30, 5.0, 1, probes=5),
                                           StreamLevel(50, 30, 10.0, 1),
                                           StreamLevel(500, 8, 100.0, 1)),
                   wrk_seconds=1.0)


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


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference or math.isnan(value) or math.isnan(reference):
        return None
    return round(value / reference, 3)


def _minus(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or math.isnan(value) or math.isnan(reference):
        return None
    return round(value - reference, 3)


def rotations(names: Sequence[str], count: int) -> Iterator[list[str]]:
    """``count`` orders of ``names``, each rotated one further (every target goes first once)."""
    for round_no in range(count):
        shift = round_no % max(1, len(names))
        yield list(names[shift:]) + list(names[:shift])


# -- the client side -----------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What the client saw of one stream. With stamped deltas (``traffic.stamped_delta``) also
    each delta's delay, upstream write to client read, and how much each gap between two deltas
    exceeds the gap between their writes upstream (the gap with the upstream's pacing taken
    out: what the path in between added or took away)."""

    status: int = 0
    first_event_ns: int | None = None
    gaps_ns: list[int] = field(default_factory=list)
    delays_ns: list[int] = field(default_factory=list)
    added_gaps_ns: list[int] = field(default_factory=list)
    deltas: int = 0
    complete: bool = False


async def post(session: aiohttp.ClientSession, target: Target, body: bytes) -> int | None:
    """One non-streaming request; its latency in ns (the whole answer read), or None when it
    failed (counted in ``target.failures``)."""
    target.sent += 1
    began = time.perf_counter_ns()
    try:
        async with session.post(target.url, data=body, headers=traffic.HEADERS) as response:
            data = await response.read()
            if response.status == 200 and data.startswith(b"{"):
                return time.perf_counter_ns() - began
    except (aiohttp.ClientError, TimeoutError):
        pass
    target.failures += 1
    return None


async def stream(session: aiohttp.ClientSession, target: Target, body: bytes, deltas: int,
                 interval_ms: float, headers: dict[str, str] | None = None,
                 stamped: bool = False) -> StreamResult:
    """One SSE stream; each event is timed by the arrival of the chunk that completed it
    (``time.monotonic_ns``: CLOCK_MONOTONIC, the clock the upstream stamps deltas with when
    ``stamped``)."""
    result = StreamResult()
    target.sent += 1
    sent_headers = {**traffic.HEADERS, **(headers or {}), "x-bench-deltas": str(deltas),
                    "x-bench-interval-ms": str(interval_ms)}
    if stamped:
        sent_headers[traffic.STAMP_HEADER] = "1"
    last: int | None = None
    last_delay: int | None = None
    pending = b""
    began = time.monotonic_ns()
    try:
        async with session.post(target.url + "?beta=true", data=body,
                                headers=sent_headers) as response:
            result.status = response.status
            reader = response.content
            while True:
                data = await reader.readany()
                if not data:
                    break
                now = time.monotonic_ns()
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
                        sent = traffic.sent_stamp(event) if stamped else None
                        if sent is not None:
                            delay = now - sent
                            result.delays_ns.append(delay)
                            if last_delay is not None:
                                result.added_gaps_ns.append(delay - last_delay)
                            last_delay = delay
                    elif event.startswith(b"event: message_stop"):
                        result.complete = True
    except (aiohttp.ClientError, TimeoutError):
        pass
    if result.status != 200 or not result.complete or result.deltas != deltas:
        target.failures += 1
    return result


@contextlib.contextmanager
def collector_held() -> Iterator[None]:
    """The load generator's own garbage collector stays out of a measured round: it collects
    before, and not during. Its heap holds every round's results; at 500 streams a full
    collection of it took 54-143 ms and a young one up to 17 ms (logged with ``gc.callbacks``,
    2026-12-07 20:37 UTC), each stalling the reading of every stream in flight, charged to
    whichever target was running. A round's garbage is small (500 streams of 40 events: a few
    MB)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def client(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=180, sock_read=60), auto_decompress=False)


class Control:
    """What the load generator asks of the servers: CPU, memory, and 'have you caught up?'."""

    def __init__(self, upstream_port: int, otlp_port: int | None,
                 http: aiohttp.ClientSession) -> None:
        self.upstream_stats = f"http://{HOST}:{upstream_port}/stats"
        self.upstream_collector = f"http://{HOST}:{upstream_port}/collector"
        self.otlp_stats = None if otlp_port is None else f"http://{HOST}:{otlp_port}/stats"
        self.http = http

    @contextlib.asynccontextmanager
    async def measuring(self) -> AsyncIterator[None]:
        """A measured round: neither the load generator's garbage collector (``collector_held``)
        nor the upstream's runs during it. The upstream's pacing is in every target's gaps,
        and a stall of it moves only the round it falls in: a 500-stream round of ``relay-c``
        once measured a gap p99 20 ms over direct's with an added gap p99 (the pacing taken
        out) 2 ms over direct's. Its collector is the stall the bench can keep out."""
        async with self.http.post(self.upstream_collector, params={"hold": "1"}) as answer:
            answer.raise_for_status()
        try:
            with collector_held():
                yield
        finally:
            async with self.http.post(self.upstream_collector, params={"hold": "0"}) as answer:
                answer.raise_for_status()

    async def json(self, url: str) -> Json:
        async with self.http.get(url) as response:
            answer: Json = await response.json()
            return answer

    async def settle(self, target: Target, limit_s: float = 120.0) -> float:
        """Wait until the target has finished the work its requests caused: otelproxy's
        record written (``/healthz``: nothing in flight or pending) and, with export on, one
        SERVER span per exchange at the receiver; any other target until its process tree is
        at rest (``_tree_at_rest``). Returns the seconds waited."""
        began = time.monotonic()
        deadline = began + limit_s
        await asyncio.sleep(0.3)
        if target.health_url is None:
            await _tree_at_rest(target, deadline)
            return round(time.monotonic() - began, 3)
        health: Json = {}
        while time.monotonic() < deadline:
            try:
                health = await self.json(target.health_url)
            except aiohttp.ClientError as exc:  # it died: the run goes on, and says so
                target.notes.append(f"/healthz failed: {type(exc).__name__}")
                return round(time.monotonic() - began, 3)
            if health.get("in_flight", 0) == 0 and health.get("records_pending", 0) == 0:
                break
            await asyncio.sleep(0.05)
        else:
            target.notes.append(f"record still pending after {limit_s:g} s")
        if targets.exports(target.name) and self.otlp_stats is not None:
            served = int(health.get("exchanges", 0))
            while time.monotonic() < deadline:
                stats = await self.json(self.otlp_stats)
                if (not stats["decoded"]
                        or stats["server_spans_by_service"].get(target.name, 0) >= served):
                    break
                await asyncio.sleep(0.1)
            else:
                target.notes.append(f"OTLP export incomplete after {limit_s:g} s")
        return round(time.monotonic() - began, 3)


REST_S = 0.5
"""A peer is at rest once its process tree used at most ``REST_CPU_S`` in this many seconds."""
REST_CPU_S = 0.01


async def _tree_at_rest(target: Target, deadline: float) -> None:
    """Until the target's process tree has stopped using the CPU (``REST_CPU_S`` in ``REST_S``),
    or ``deadline``: the work a round left it (closing the round's connections, writing its
    record) is not done during the next target's round. When the pool closed a round's 500
    connections during the next round, mitmproxy used 0.40-0.53 s of CPU 1 in it (2026-12-08
    04:10 UTC, ``others_cpu_s_by_round``), and direct's round, the floor, measured a 7.2 ms
    added gap p99 (0.7 and 3.1 in its others)."""
    if target.process is None:
        return
    used = procs.tree_cpu_s(target.process.pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(REST_S)
        now = procs.tree_cpu_s(target.process.pid)
        if now - used <= REST_CPU_S:
            return
        used = now


def cpu_s(target: Target) -> dict[str, float]:
    """CPU seconds so far per process of the target's tree (see ``procs.tree_cpu_by_process``)."""
    return {} if target.process is None else procs.tree_cpu_by_process(target.process.pid)


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {label: after[label] - before.get(label, 0.0) for label in after}


def _ms_per_exchange(cpu: dict[str, float], complete: int) -> dict[str, float]:
    """CPU seconds per process → ms per complete exchange (NaN when none completed)."""
    return {label: round(used * 1000 / (complete or math.nan), 3) for label, used in cpu.items()}


def rss_mib(target: Target) -> float | None:
    return None if target.process is None else procs.tree_rss_mib(target.process.pid)


# -- the phases ----------------------------------------------------------------------------------


class LoadGenerator:
    """Runs the phases against ``targets`` ("direct" first, then the proxies that started)."""

    def __init__(self, settings: Settings, targets: list[Target], control: Control,
                 progress: Callable[[str], None]) -> None:
        self.settings = settings
        self.targets = {target.name: target for target in targets}
        self.proxies = [t.name for t in targets if t.name != "direct"]
        self.everyone = [t.name for t in targets]
        self.control = control
        self.progress = progress
        self.conversations = 0
        self.peak_split: dict[str, dict[str, float]] = {}

    async def run(self) -> Json:
        results: Json = {"phase_s": {}}
        began = time.monotonic()

        def phase(name: str) -> None:
            nonlocal began
            results["phase_s"][name] = round(time.monotonic() - began, 1)
            began = time.monotonic()

        self.progress("idle memory and warm-up")
        results["memory"] = memory = await self.idle()
        phase("idle")
        results["latency"] = results["claude_code"] = results["sse"] = {}
        if self.settings.runs("latency"):
            self.progress("latency: ~100 KB requests, 1 connection, sequential")
            results["latency"] = await self.latency()
            phase("latency")
        if self.settings.runs("claude_code"):
            self.progress(f"Claude Code traffic: {self.settings.conversations} conversations")
            results["claude_code"] = await self.claude_code()
            phase("claude_code")
        results["sse"] = {}
        for level in self.settings.levels:
            if not self.settings.runs_level(level):
                continue
            self.progress(f"SSE: {level.streams} concurrent stream(s)")
            results["sse"][str(level.streams)] = await self.sse(level, memory)
            phase(f"sse_{level.streams}")
        bare = memory.get("bare", {}).get("per_100_streams_mib")
        for name in self.proxies:
            memory[name]["per_100_streams_over_bare_mib"] = _minus(
                memory[name].get("per_100_streams_mib"), bare)
        return results

    async def idle(self) -> Json:
        out: Json = {name: {"start_mib": rss_mib(self.targets[name])} for name in self.proxies}
        async with client(4) as session:
            for name in self.everyone:
                target = self.targets[name]
                for turn in range(3):
                    await post(session, target, traffic.conversation_request("warm", turn, False))
                await asyncio.gather(*(
                    stream(session, target, traffic.conversation_request(f"warm{n}", 0), 10, 1.0)
                    for n in range(4)))
        for name in self.proxies:
            await self.control.settle(self.targets[name])
        await asyncio.sleep(1.0)
        for name in self.proxies:
            out[name]["idle_mib"] = rss_mib(self.targets[name])
            process = self.targets[name].process
            if process is not None:
                out[name]["idle_unique_mib"] = procs.tree_unique_mib(process.pid)
                out[name]["processes"] = procs.tree_members(process.pid)
        return out

    async def latency(self) -> Json:
        s = self.settings
        body = traffic.conversation_request("latency", traffic.MAX_TURNS, stream=False)
        samples: dict[str, list[int]] = {name: [] for name in self.everyone}
        sessions = {name: client(1) for name in self.everyone}
        per_round = max(1, s.latency_requests // s.latency_rounds)
        try:
            for order in rotations(self.everyone, s.latency_rounds):
                for name in order:
                    target = self.targets[name]
                    async with self.control.measuring():
                        for _ in range(per_round):
                            took = await asyncio.wait_for(post(sessions[name], target, body),
                                                          60)
                            if took is not None:
                                samples[name].append(took)
                    await self.control.settle(target)
        finally:
            for session in sessions.values():
                await session.close()
        out: Json = {"body_bytes": len(body), "requests_per_target": per_round * s.latency_rounds}
        for name in self.everyone:
            out[name] = {"p50_ms": _ms(percentile(samples[name], 0.5)),
                         "p99_ms": _ms(percentile(samples[name], 0.99))}
        for name in self.proxies:
            row = out[name]
            row["over_direct_p50_ms"] = _minus(row["p50_ms"], out["direct"]["p50_ms"])
            row["over_direct_p99_ms"] = _minus(row["p99_ms"], out["direct"]["p99_ms"])
            if "bare" in out:
                row["over_bare_p50_ms"] = _minus(row["p50_ms"], out["bare"]["p50_ms"])
                row["over_bare_p99_ms"] = _minus(row["p99_ms"], out["bare"]["p99_ms"])
        return out

    async def _conversations(self, target: Target, session: aiohttp.ClientSession,
                             seconds: float) -> tuple[int, int]:
        """``conversations`` clients, each running conversations of up to MAX_TURNS turns
        one after another until ``seconds`` have passed; (exchanges, incomplete ones)."""
        s = self.settings
        deadline = time.monotonic() + seconds
        done = 0
        broken = 0

        async def client_loop() -> None:
            nonlocal done, broken
            while time.monotonic() < deadline:
                self.conversations += 1
                name = f"cc{self.conversations}"
                headers = {"X-Claude-Code-Session-Id": str(uuid.uuid4())}
                for turn in range(traffic.MAX_TURNS):
                    if time.monotonic() >= deadline:
                        return
                    result = await stream(session, target,
                                          traffic.conversation_request(name, turn),
                                          traffic.DELTA_COUNT, s.cc_interval_ms, headers)
                    done += 1
                    if not result.complete:
                        broken += 1
                        break  # a client would not continue a broken conversation

        await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(s.conversations))),
                               seconds + 120)
        return done, broken

    async def claude_code(self) -> Json:
        s = self.settings
        order = [*self.proxies, *reversed(self.proxies)]  # ABBA: each target twice
        exchanges = dict.fromkeys(self.proxies, 0)
        broken = dict.fromkeys(self.proxies, 0)
        cpu: dict[str, dict[str, float]] = {name: {} for name in self.proxies}
        catch_up = dict.fromkeys(self.proxies, 0.0)
        slices: dict[str, list[dict[str, float]]] = {name: [] for name in self.proxies}
        async with client(s.conversations) as session:
            for name in order:
                target = self.targets[name]
                before = cpu_s(target)
                count, failed = await self._conversations(target, session, s.cc_seconds / 2)
                catch_up[name] += await self.control.settle(target)
                used_now = cpu_used(before, cpu_s(target))
                for label, used in used_now.items():
                    cpu[name][label] = cpu[name].get(label, 0.0) + used
                slices[name].append(_ms_per_exchange(used_now, count - failed))
                exchanges[name] += count
                broken[name] += failed
        out: Json = {"conversations": s.conversations, "seconds_per_target": s.cc_seconds,
                     "max_turns": traffic.MAX_TURNS,
                     "last_turn_bytes": len(
                         traffic.conversation_request("x", traffic.MAX_TURNS - 1))}
        for name in self.proxies:
            by_process = _ms_per_exchange(cpu[name], exchanges[name] - broken[name])
            out[name] = {"exchanges": exchanges[name], "incomplete": broken[name],
                         "cpu_ms_per_exchange": round(sum(by_process.values()), 3),
                         "cpu_ms_per_exchange_by_process": by_process,
                         "cpu_ms_per_exchange_by_slice": slices[name],
                         "settle_s": round(catch_up[name], 3)}
        for name in self.proxies:
            out[name]["ratio_to_bare"] = _ratio(out[name]["cpu_ms_per_exchange"],
                                                out.get("bare", {}).get("cpu_ms_per_exchange"))
        return out

    async def sse(self, level: StreamLevel, memory: Json) -> Json:
        body = traffic.conversation_request("sse", 0)
        pooled: dict[str, list[StreamResult]] = {name: [] for name in self.everyone}
        busy: dict[str, list[dict[int, float]]] = {name: [] for name in self.everyone}
        by_round: dict[str, list[float]] = {name: [] for name in self.everyone}
        others: dict[str, list[dict[str, float]]] = {name: [] for name in self.everyone}
        waits: dict[str, dict[str, list[int]]] = {}
        peaks: dict[str, float] = {}
        before: dict[str, float | None] = {}
        before_split: dict[str, dict[str, float]] = {}
        bound = 120 + level.deltas * level.interval_ms / 1000 * 4
        ramp = min(1.0, level.deltas * level.interval_ms / 1000 / 3)
        small = traffic.small_request()

        async def ramped(target: Target, index: int, session: aiohttp.ClientSession
                         ) -> StreamResult:
            await asyncio.sleep(ramp * index / level.streams)
            return await stream(session, target, body, level.deltas, level.interval_ms,
                                stamped=True)

        async with client(level.streams) as session:
            for order in rotations(self.everyone, level.repeats * len(self.everyone)):
                name = order[0]
                target = self.targets[name]
                if name not in before:  # the first round's: no connection of it open yet
                    before[name] = rss_mib(target)
                    before_split[name] = ({} if target.process is None
                                          else procs.tree_rss_by_process(target.process.pid))
                # each round on connections of its own, closed before the target settles: kept
                # open, a round's 500 connections were closed by the pool during the next
                # target's round, and mitmproxy used 0.4-0.5 s of CPU 1 closing them then
                # (``others_cpu_s_by_round``, 2026-12-08 04:13 UTC)
                async with client(level.streams) as rounds:
                    # open every connection first (client to proxy, proxy to upstream): the round
                    # then measures streams, not connection set-up
                    await asyncio.wait_for(asyncio.gather(*(
                        post(rounds, target, small) for _ in range(level.streams))), bound)
                    sampler = asyncio.create_task(self._sample_rss(target, peaks))
                    neighbours = self._cpu_of_others(name)
                    ticks = procs.cpu_ticks()
                    sched = self._sched(target)
                    try:
                        async with self.control.measuring():
                            this_round = await asyncio.wait_for(asyncio.gather(*(
                                ramped(target, index, rounds) for index in range(level.streams))),
                                bound)
                        pooled[name] += this_round
                        by_round[name].append(_ms(percentile(
                            [gap for r in this_round for gap in r.added_gaps_ns], 0.99)))
                    finally:
                        busy[name].append(procs.cpu_busy(ticks, procs.cpu_ticks()))
                        others[name].append(self._used_by_others(neighbours))
                        for label, (ran, waited) in self._sched(target).items():
                            was_ran, was_waited = sched.get(label, (0, 0))
                            total = waits.setdefault(name, {}).setdefault(label, [0, 0])
                            total[0] += ran - was_ran
                            total[1] += waited - was_waited
                        sampler.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sampler
                await self.control.settle(target)
            probes: dict[str, list[StreamResult]] = {name: [] for name in self.everyone}
            for order in rotations(self.everyone, level.probes):
                async with self.control.measuring():
                    for name in order:
                        probes[name].append(await asyncio.wait_for(
                            stream(session, self.targets[name], body, 3, 1.0), 60))
            for name in self.proxies if level.probes else ():
                await self.control.settle(self.targets[name])
        out: Json = {"streams": level.streams, "deltas": level.deltas,
                     "interval_ms": level.interval_ms, "repeats": level.repeats,
                     "ramp_s": round(ramp, 3), "first_event_probes": level.probes}
        for name in self.everyone:
            results = pooled[name]
            gaps = [gap for r in results for gap in r.gaps_ns]
            firsts = [r.first_event_ns for r in results + probes[name]
                      if r.first_event_ns is not None]
            expected = len(results) * level.deltas
            received = sum(r.deltas for r in results)
            delays = [delay for r in results for delay in r.delays_ns]
            added = [gap for r in results for gap in r.added_gaps_ns]
            out[name] = {
                "first_event_p50_ms": _ms(percentile(firsts, 0.5)),
                "first_event_p99_ms": _ms(percentile(firsts, 0.99)),
                "gap_p50_ms": _ms(percentile(gaps, 0.5)),
                "gap_p99_ms": _ms(percentile(gaps, 0.99)),
                "delay_p50_ms": _ms(percentile(delays, 0.5)),
                "delay_p99_ms": _ms(percentile(delays, 0.99)),
                "added_gap_p99_ms": _ms(percentile(added, 0.99)),
                "added_gap_p99_by_round_ms": by_round[name],
                "cpu_busy_by_round": [{f"cpu{cpu}": share for cpu, share in b.items()}
                                      for b in busy[name]],
                "others_cpu_s_by_round": others[name],
                "events_sent": expected, "events_lost": expected - received,
                "incomplete_streams": sum(not r.complete for r in results),
                "cpu_busy": {f"cpu{cpu}": round(sum(b.get(cpu, 0.0) for b in busy[name])
                                                / max(1, len(busy[name])), 3)
                             for cpu in sorted({c for b in busy[name] for c in b})},
            }
            if name in waits:  # CPU run and run-queue wait of the tree's processes, per event
                out[name]["sched_us_per_event"] = {
                    label: {"ran": round(ran / 1000 / max(1, received), 1),
                            "waited": round(waited / 1000 / max(1, received), 1)}
                    for label, (ran, waited) in waits[name].items()}
        for name in self.proxies:
            row, direct = out[name], out["direct"]
            row["gap_p99_over_direct_ms"] = _minus(row["gap_p99_ms"], direct["gap_p99_ms"])
            for key in ("delay_p50", "delay_p99", "added_gap_p99"):
                row[f"{key}_over_direct_ms"] = _minus(row[f"{key}_ms"], direct[f"{key}_ms"])
            row["first_event_p50_over_direct_ms"] = _minus(row["first_event_p50_ms"],
                                                           direct["first_event_p50_ms"])
            row["first_event_p99_over_direct_ms"] = _minus(row["first_event_p99_ms"],
                                                           direct["first_event_p99_ms"])
            if peaks.get(name):  # 0: the process was gone
                idle, ahead = memory[name]["idle_mib"], before.get(name)
                row["peak_rss_mib"] = peaks[name]
                memory[name][f"peak_{level.streams}_streams_mib"] = peaks[name]
                if level.streams >= 100 and ahead is not None:
                    # from the tree's resident set just before the round's connections opened:
                    # what earlier phases left behind (heap, the recorder's caches) is not
                    # counted as the streams' memory
                    memory[name][f"before_{level.streams}_streams_mib"] = ahead
                    peak_split = self.peak_split.get(name, {})
                    memory[name]["per_100_streams_by_process_mib"] = {
                        label: round((mib - before_split[name].get(label, 0.0)) * 100
                                     / level.streams, 2)
                        for label, mib in peak_split.items()}
                    memory[name]["per_100_streams_mib"] = round(
                        (peaks[name] - ahead) * 100 / level.streams, 2)
                    if idle is not None:
                        memory[name]["per_100_streams_from_idle_mib"] = round(
                            (peaks[name] - idle) * 100 / level.streams, 2)
        return out

    def _cpu_of_others(self, name: str) -> dict[str, dict[str, float]]:
        """CPU seconds so far of every target but ``name``, by process."""
        return {other: cpu_s(self.targets[other]) for other in self.proxies if other != name}

    def _used_by_others(self, before: dict[str, dict[str, float]]) -> dict[str, float]:
        """CPU seconds the other targets' processes used since ``before`` (5 ms or more)."""
        return {f"{other} {label}": round(used, 3)
                for other, was in before.items()
                for label, used in cpu_used(was, cpu_s(self.targets[other])).items()
                if used >= 0.005}

    @staticmethod
    def _sched(target: Target) -> dict[str, tuple[int, int]]:
        return {} if target.process is None else procs.tree_sched_by_process(target.process.pid)

    async def _sample_rss(self, target: Target, peaks: dict[str, float]) -> None:
        """The tree's peak resident set, and each process's resident set at that peak."""
        if target.process is None:
            return
        sampler = procs.RssSampler(target.process.pid)
        while True:
            members = sampler.sample()
            value = round(sum(members.values()), 1)
            if value > peaks.get(target.name, 0.0):
                peaks[target.name] = value
                self.peak_split[target.name] = members
            await asyncio.sleep(0.1)


# -- wrk -----------------------------------------------------------------------------------------


_WRK_SCRIPT = """wrk.method = "POST"
wrk.body = {body}
{headers}
"""


def wrk_script(work: Path) -> Path:
    body = traffic.small_request().decode()
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in traffic.HEADERS.items())
    path = work / "post.lua"
    path.write_text(_WRK_SCRIPT.format(body=orjson.dumps(body).decode(), headers=headers))
    return path


def run_wrk(url: str, script: Path, settings: Settings, pinning: Pinning) -> Json:
    argv = ["wrk", "-t1", f"-c{settings.wrk_connections}", f"-d{settings.wrk_seconds:g}s",
            "-s", str(script), url]
    completed = subprocess.run(argv, capture_output=True, text=True, check=False,
                               timeout=settings.wrk_seconds + 60, preexec_fn=pinning.for_load())
    text = completed.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    if completed.returncode != 0 or rps is None or total is None:
        return {"error": (completed.stderr or text)[-500:]}
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)),
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "socket_errors": errors.group(1).strip() if errors else ""}


async def wrk_phase(names: list[str], everyone: dict[str, Target], control: Control,
                    settings: Settings, pinning: Pinning, work: Path) -> Json:
    if shutil.which("wrk") is None:
        return {"error": "wrk is not installed (apt-get install wrk)"}
    script = wrk_script(work)
    order = ["bare", *[n for n in names if n != "bare"], "bare"] if "bare" in names else names
    runs: dict[str, list[Json]] = {name: [] for name in names}
    for name in order:
        target = everyone[name]
        before = cpu_s(target)
        figures = await asyncio.to_thread(run_wrk, target.url, script, settings, pinning)
        figures["settle_s"] = await control.settle(target)
        if "requests" in figures and target.process is not None:
            target.sent += figures["requests"]
            used = sum(cpu_used(before, cpu_s(target)).values())
            figures["cpu_ms_per_request"] = round(used * 1000 / max(1, figures["requests"]), 3)
        runs[name].append(figures)
    out: Json = {"connections": settings.wrk_connections, "seconds": settings.wrk_seconds}
    for name in names:
        good = [r for r in runs[name] if "rps" in r]
        if not good:
            out[name] = {"error": runs[name][0].get("error", "no run")}
            continue
        out[name] = {"rps": round(sum(r["rps"] for r in good) / len(good), 1),
                     "non_2xx": sum(r["non_2xx"] for r in good),
                     "socket_errors": [r["socket_errors"] for r in good if r["socket_errors"]],
                     "settle_s": max(r["settle_s"] for r in good)}
        cpus = [r["cpu_ms_per_request"] for r in good if "cpu_ms_per_request" in r]
        if cpus:
            out[name]["cpu_ms_per_request"] = round(sum(cpus) / len(cpus), 3)
    for name in names:
        if "rps" in out[name]:
            out[name]["ratio_to_bare"] = _ratio(out[name]["rps"], out.get("bare", {}).get("rps"))
    return out


# -- one run -------------------------------------------------------------------------------------


def check_targets(r: Json) -> list[Json]:
    """The project's targets for otelproxy (and with OTLP export)."""
    checks: list[Json] = []

    def check(name: str, value: Any, limit: float, ok: bool | None) -> None:
        checks.append({"name": name, "value": value, "limit": limit,
                       "pass": bool(ok) if ok is not None else None})

    def at_most(name: str, value: float | None, limit: float) -> None:
        check(name, value, limit, None if value is None else value <= limit)

    for name in OURS:
        if name not in r["claude_code"]:
            continue
        at_most(f"{name}: CPU per Claude Code exchange / bare",
                r["claude_code"][name]["ratio_to_bare"], CPU_RATIO_MAX[name])
    if "otelproxy" in r["latency"]:
        row = r["latency"]["otelproxy"]
        at_most("otelproxy: added latency p50 over bare (~100 KB)", row.get("over_bare_p50_ms"),
                ADDED_P50_MAX_MS)
        at_most("otelproxy: added latency p99 over bare (~100 KB)", row.get("over_bare_p99_ms"),
                ADDED_P99_MAX_MS)
    for streams, level in r["sse"].items():
        if "otelproxy" not in level:
            continue
        sse = level["otelproxy"]
        at_most(f"otelproxy: SSE gap p99 over direct, {streams} stream(s)",
                sse["gap_p99_over_direct_ms"], GAP_P99_SLACK_MS)
        at_most(f"otelproxy: SSE first event p50 over direct, {streams} stream(s)",
                sse["first_event_p50_over_direct_ms"], FIRST_EVENT_SLACK_MS)
    if "otelproxy" in r["memory"]:
        memory = r["memory"]["otelproxy"]
        at_most("otelproxy: idle RSS of its tree (MiB)", memory.get("idle_mib"), IDLE_RSS_MAX_MIB)
        at_most("otelproxy: idle RSS of its tree, each physical page once (MiB)",
                memory.get("idle_unique_mib"), IDLE_RSS_MAX_MIB)
        if "per_100_streams_mib" in memory:
            at_most("otelproxy: RSS per 100 open streams (MiB)", memory["per_100_streams_mib"],
                    RSS_PER_100_STREAMS_MAX_MIB)
    for name in OURS:
        levels = [level[name] for level in r["sse"].values() if name in level]
        if levels:
            lost = sum(level["events_lost"] for level in levels)
            check(f"{name}: SSE events lost", lost, 0, lost == 0)
    for name, record in r.get("record", {}).items():
        check(f"{name}: every exchange it was handed is in the record (SQLite rows)",
              record.get("exchanges"), record.get("submitted"), record.get("complete"))
    return checks


def bench(settings: Settings, progress: Callable[[str], None]) -> Json:
    """Start every server, run the phases, stop everything; return every figure."""
    pinning = procs.pin_load_generator()
    work = Path(tempfile.mkdtemp(prefix="otelproxy-bench-"))
    helpers: list[Process] = []
    everyone: list[Target] = []
    try:
        upstream_port, otlp_port = procs.free_port(), procs.free_port()
        for role, port in (("upstream", upstream_port), ("otlp", otlp_port)):
            server = Process(role, [sys.executable, "-m", "benchmarks.servers", role, "--port",
                                    str(port)], targets.clean_env(), work / f"{role}.log")
            server.start()
            helpers.append(server)
            procs.wait_listening(port, server.popen, 60)
        progress(f"starting {', '.join(settings.targets)} (pinning: "
                 f"{'CPU 0 load, CPU 1 proxy' if pinning.active else pinning.reason})")
        targets.compile_sources(settings.other_src)
        everyone = [targets.build(name, upstream_port, otlp_port, work, pinning,
                                  Path(settings.peers_venv), settings.other_src)
                    for name in ("direct", *settings.targets)]
        for target in everyone:
            targets.wait_ready(target)
        running = [t for t in everyone if t.available]
        results = servers.run(_phases(settings, running, upstream_port, otlp_port, pinning,
                                      work, progress))
        progress("stopping; reading the record")
        for target in everyone:
            if target.process is not None:
                status = target.process.stop()
                if status not in (0, None, -15):  # it died: say how, in its own words
                    target.notes.append(f"exit status {status}; its output ends with: "
                                        f"{target.process.log_tail(1500)!r}")
        results["record"] = {name: count_record(work / f"{name}-record", health)
                             for name, health in results["health"].items()}
        results["record_bytes"] = {t.name: targets.record_bytes(t) for t in running
                                   if t.process is not None}
    finally:
        for target in everyone:
            if target.process is not None:
                target.process.stop(5)
        for server in helpers:
            server.stop(5)
        shutil.rmtree(work, ignore_errors=True)
    results["targets"] = {
        t.name: {"status": "measured" if t.available else "unavailable", "error": t.error,
                 "version": t.version, "requests_sent": t.sent, "failures": t.failures,
                 "notes": t.notes}
        for t in everyone}
    results["settings"] = {
        **{k: v for k, v in asdict(settings).items() if k != "levels"},
        "levels": [asdict(level) for level in settings.levels],
        "pinning": "load generator, upstream, receiver and wrk on CPU 0; each proxy's tree on "
                   "CPU 1" if pinning.active else f"off: {pinning.reason}",
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "aiohttp": aiohttp.__version__, "load_average": os.getloadavg()}
    results["checks"] = check_targets(results)
    return results


async def _phases(settings: Settings, running: list[Target], upstream_port: int, otlp_port: int,
                  pinning: Pinning, work: Path, progress: Callable[[str], None]) -> Json:
    async with client(8) as http:
        control = Control(upstream_port, otlp_port, http)
        results = await LoadGenerator(settings, running, control, progress).run()
        results["wrk"] = {}
        if settings.runs("wrk"):
            progress("small POSTs with wrk")
            began = time.monotonic()
            results["wrk"] = await wrk_phase([t.name for t in running],
                                             {t.name: t for t in running}, control, settings,
                                             pinning, work)
            results["phase_s"]["wrk"] = round(time.monotonic() - began, 1)
        results["health"] = {}
        for target in running:
            if target.health_url is not None:
                try:
                    results["health"][target.name] = await control.json(target.health_url)
                except aiohttp.ClientError as exc:
                    results["health"][target.name] = {"error": type(exc).__name__}
        results["upstream"] = await control.json(control.upstream_stats)
        results["otlp_receiver"] = await control.json(control.otlp_stats or "")
    return results


def count_record(log_dir: Path, health: Json) -> Json:
    """Rows of otelproxy's SQLite ``exchanges`` table against the exchanges it forwarded and
    those it handed to the record (``/healthz`` at the end of the run: ``exchanges``, and
    ``records_submitted``, which also counts requests rejected or given up by their client
    before being forwarded), and what it dropped."""
    import sqlite3

    db_path = log_dir / "sessions.db"
    served = int(health.get("exchanges", -1))
    submitted = int(health.get("records_submitted", -1))
    out: Json = {"served": served, "submitted": submitted,
                 "dropped": health.get("records_dropped"), "sink_errors": health.get("sink_errors")}
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            rows, sessions, longest = conn.execute(
                "SELECT count(*), count(DISTINCT session_id), max(seq) FROM exchanges").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        out["error"] = f"cannot read {db_path}: {exc}"
        return out
    out.update({"exchanges": rows, "sessions": sessions, "longest_session": longest,
                "complete": rows == submitted >= served})
    return out


# -- output --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _measured(r: Json) -> list[str]:
    return [n for n, t in r["targets"].items() if n != "direct" and t["status"] == "measured"]


def _per_proxy(r: Json) -> Iterator[tuple[str, Json, Json, Json, Json]]:
    """Per measured proxy: its Claude Code, latency, memory and wrk figures."""
    for name in _measured(r):
        wrk = r["wrk"].get(name)
        yield (name, r["claude_code"].get(name, {}), r["latency"].get(name, {}),
               r["memory"].get(name, {}), wrk if isinstance(wrk, dict) else {})


def format_report(r: Json) -> str:
    s = r["settings"]
    names = _measured(r)
    lines = [f"otelproxy benchmark: Python {s['python']}, aiohttp {s['aiohttp']}, {s['cpus']} "
             f"CPUs, pinning {s['pinning']}; load average at the end "
             f"{' '.join(f'{x:.2f}' for x in s['load_average'])}" + (" [quick]" if s["quick"]
                                                                    else ""), ""]
    for name, t in r["targets"].items():
        state = f"{t['status']}" + (f" ({t['error']})" if t["error"] else "")
        lines.append(f"  {name:<15} {t['version'] or '':<10} {state}; {t['requests_sent']} "
                     f"requests, {t['failures']} failed" + (f"; {'; '.join(t['notes'])}"
                                                            if t["notes"] else ""))
    cc, lat, mem, wrk = r["claude_code"], r["latency"], r["memory"], r["wrk"]
    lines += ["", f"Claude Code traffic: {cc.get('conversations', '-')} conversations, up to "
              f"{cc.get('max_turns', '-')} turns (last request {cc.get('last_turn_bytes', '-')} "
              f"bytes), 150-event answers; latency on {lat.get('body_bytes', '-')}-byte "
              f"requests; wrk {wrk.get('connections', '-')} connections; phases run: "
              f"{', '.join(s.get('phases', PHASES))}", ""]
    header = (f"  {'target':<15} {'CPU ms/exch':>11} {'x bare':>7} {'p50 ms':>7} {'+bare':>6} "
              f"{'p99 ms':>7} {'+bare':>6} {'idle MiB':>8} {'MiB/100str':>10} {'wrk r/s':>8} "
              f"{'x bare':>7}")
    lines.append(header)
    for name, c, la, m, w in _per_proxy(r):
        lines.append(
            f"  {name:<15} {_fmt(c.get('cpu_ms_per_exchange'), 3):>11} "
            f"{_fmt(c.get('ratio_to_bare')):>7} {_fmt(la.get('p50_ms'), 3):>7} "
            f"{_fmt(la.get('over_bare_p50_ms'), 3):>6} {_fmt(la.get('p99_ms'), 3):>7} "
            f"{_fmt(la.get('over_bare_p99_ms'), 3):>6} {_fmt(m.get('idle_mib'), 1):>8} "
            f"{_fmt(m.get('per_100_streams_mib')):>10} {_fmt(w.get('rps'), 0):>8} "
            f"{_fmt(w.get('ratio_to_bare')):>7}")
    if "direct" in lat:
        lines.append(f"  {'direct':<15} {'':>11} {'':>7} {_fmt(lat['direct']['p50_ms'], 3):>7} "
                     f"{'':>6} {_fmt(lat['direct']['p99_ms'], 3):>7}")
    lines += ["", "SSE, over direct (ms): gap p99 / first event p50 / first event p99 / "
              "delay p50 / delay p99 / added gap p99; events lost; CPUs busy during the rounds"]
    for streams, level in r["sse"].items():
        direct = level["direct"]
        lines.append(f"  {streams} stream(s), {level['deltas']} deltas {level['interval_ms']:g} "
                     f"ms apart (direct: gap p99 {_fmt(direct['gap_p99_ms'], 3)}, first "
                     f"event p50 {_fmt(direct['first_event_p50_ms'], 3)}, delay p50 / p99 "
                     f"{_fmt(direct.get('delay_p50_ms'), 3)} / "
                     f"{_fmt(direct.get('delay_p99_ms'), 3)}, added gap p99 "
                     f"{_fmt(direct.get('added_gap_p99_ms'), 3)}; busy {direct.get('cpu_busy')})")
        for name in names:
            row = level[name]
            lines.append(f"    {name:<15} {_fmt(row['gap_p99_over_direct_ms'], 3):>8} "
                         f"{_fmt(row['first_event_p50_over_direct_ms'], 3):>8} "
                         f"{_fmt(row['first_event_p99_over_direct_ms'], 3):>8} "
                         f"{_fmt(row.get('delay_p50_over_direct_ms'), 3):>8} "
                         f"{_fmt(row.get('delay_p99_over_direct_ms'), 3):>8} "
                         f"{_fmt(row.get('added_gap_p99_over_direct_ms'), 3):>8}   lost "
                         f"{row['events_lost']}, incomplete {row['incomplete_streams']}; "
                         f"busy {row.get('cpu_busy')}; sched us/event "
                         f"{row.get('sched_us_per_event')}")
    lines += ["", "CPU ms per Claude Code exchange by process of the tree:"]
    for name, c, *_ in _per_proxy(r):
        split = c.get("cpu_ms_per_exchange_by_process", {})
        lines.append(f"  {name:<15} " + ", ".join(f"{label} {used:.3f}"
                                                 for label, used in split.items()))
    lines += ["", "Idle resident MiB of each tree, VmRSS summed / each physical page once "
              "(a page of libpython or libcrypto both processes map is counted once):"]
    for name in names:
        lines.append(f"  {name:<15} {_fmt(mem.get(name, {}).get('idle_mib'), 1):>6} / "
                     f"{_fmt(mem.get(name, {}).get('idle_unique_mib'), 1)}")
    lines += ["", "Process trees when idle (allowed CPUs, resident MiB):"]
    for name in names:
        for member in mem.get(name, {}).get("processes", []):
            lines.append(f"  {name:<15} cpus {member['cpus']} {member['rss_mib']:>6} MiB  "
                         f"{member['command'][:70]}")
    if "error" in wrk:
        lines.append(f"\nwrk: {wrk['error']}")
    lines.append("")
    for name, record in r.get("record", {}).items():
        lines.append(f"{name} record: {record}")
    sizes = r.get("record_bytes", {})
    lines.append("Record on disk after the run (MB): " + ", ".join(
        f"{name} {_fmt(None if size is None else size / 1e6, 1)}" for name, size in sizes.items()))
    lines += ["", "Targets (issue 13):"]
    for item in r["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[item["pass"]]
        lines.append(f"  {verdict}  {item['name']}: {item['value']} (limit {item['limit']})")
    return "\n".join(lines)


def format_markdown(r: Json) -> str:
    """The README's tables: one row per measured proxy."""
    names = _measured(r)
    rows = ["| target | CPU ms per exchange (x bare) | latency p50 / p99 over bare, ms | "
            "idle RSS, MiB (each page once) | RSS per 100 streams, MiB | wrk req/s (x bare) |",
            "|---|---|---|---|---|---|"]
    for name, c, la, m, w in _per_proxy(r):
        rows.append(
            f"| {name} | {_fmt(c.get('cpu_ms_per_exchange'))} ({_fmt(c.get('ratio_to_bare'))}) "
            f"| {_fmt(la.get('over_bare_p50_ms'))} / {_fmt(la.get('over_bare_p99_ms'))} "
            f"| {_fmt(m.get('idle_mib'), 1)} ({_fmt(m.get('idle_unique_mib'), 1)}) "
            f"| {_fmt(m.get('per_100_streams_mib'), 1)} "
            f"| {_fmt(w.get('rps'), 0)} ({_fmt(w.get('ratio_to_bare'))}) |")
    levels = list(r["sse"])
    rows += ["", "| target | " + " | ".join(
        f"{streams} stream(s): gap p99 / first event p50 over direct, ms; lost"
        for streams in levels) + " |", "|---|" + "---|" * len(levels)]
    for name in names:
        cells = [f"{_fmt(r['sse'][k][name]['gap_p99_over_direct_ms'], 1)} / "
                 f"{_fmt(r['sse'][k][name]['first_event_p50_over_direct_ms'], 1)}; "
                 f"{r['sse'][k][name]['events_lost']}" for k in levels]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="otelproxy beside a bare pass-through, mitmproxy and claude-tap on "
        "Claude-Code-shaped loopback traffic, CPUs pinned; prints ratios.")
    parser.add_argument("--quick", action="store_true",
                        help="small counts: a smoke run of every phase (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README's tables (ratios and differences) only")
    parser.add_argument("--from", dest="saved", metavar="FILE",
                        help="run nothing: print the report of a run saved with --json")
    parser.add_argument("--targets", metavar="LIST", default=",".join(PROXIES),
                        help=f"comma-separated, from {', '.join(PROXIES)} (default: all)")
    parser.add_argument("--peers-venv", metavar="DIR", default=str(PEERS_VENV),
                        help="the virtualenv holding mitmproxy and claude-tap (default "
                        "benchmarks/.peers-venv, made by benchmarks/install-peers.sh)")
    parser.add_argument("--phases", metavar="LIST", default=",".join(PHASES),
                        help=f"comma-separated, from {', '.join(PHASES)}, sse1, sse50, sse500 "
                        "(default: all; the idle phase always runs)")
    parser.add_argument("--sse-repeats", metavar="N", type=int, default=None,
                        help="rounds per target at each SSE level (default: 3)")
    parser.add_argument("--other-src", metavar="DIR", default="",
                        help=f"also run target {OTHER}: otelproxy from DIR (a directory holding "
                        "an otelproxy package, e.g. `git archive REV otelproxy | tar -x -C DIR`), "
                        "for an A/B of two versions in one run; it records without export, "
                        f"and --targets may add {OTHER_OTLP}, the same exporting OTLP")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a target figure is missed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = tuple(name.strip() for name in args.targets.split(",") if name.strip())
    if args.other_src:
        if not (Path(args.other_src) / "otelproxy" / "__init__.py").is_file():
            sys.stderr.write(f"benchmarks.run: error: no otelproxy package in {args.other_src}\n")
            return 2
        names = (*names, OTHER) if OTHER not in names else names
    unknown = [name for name in names if name not in (*PROXIES, OTHER)
               and not (name == OTHER_OTLP and args.other_src)]
    if unknown:
        sys.stderr.write(f"benchmarks.run: error: unknown target(s) {unknown}\n")
        return 2
    phases = tuple(name.strip() for name in args.phases.split(",") if name.strip())
    unknown = [name for name in phases if name not in (*PHASES, "sse1", "sse50", "sse500")]
    if unknown:
        sys.stderr.write(f"benchmarks.run: error: unknown phase(s) {unknown}\n")
        return 2
    settings = (Settings.quick_run(names, args.peers_venv) if args.quick
                else Settings(targets=names, peers_venv=args.peers_venv))
    settings = dataclasses.replace(settings, phases=phases,
                                   other_src=str(Path(args.other_src).resolve()) if args.other_src
                                   else "")
    if args.sse_repeats is not None:
        settings = dataclasses.replace(settings, levels=tuple(
            dataclasses.replace(level, repeats=max(1, args.sse_repeats))
            for level in settings.levels))
    began = time.monotonic()

    def progress(message: str) -> None:
        sys.stderr.write(f"[bench {time.monotonic() - began:6.1f} s] {message}\n")
        sys.stderr.flush()

    if args.saved:
        results: Json = orjson.loads(Path(args.saved).read_bytes())
    else:
        results = bench(settings, progress)
        results["elapsed_s"] = round(time.monotonic() - began, 1)
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.markdown:
        sys.stdout.write(format_markdown(results) + "\n")
    else:
        sys.stdout.write(format_report(results) + f"\n\n(run took {results['elapsed_s']} s)\n")
    missed = any(item["pass"] is False for item in results["checks"])
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
