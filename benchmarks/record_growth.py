"""How the local record grows over one long Claude Code session, and how fast it appends.

    .venv/bin/python benchmarks/record_growth.py [--turns 300] [--json]
    .venv/bin/python benchmarks/record_growth.py --bench-traffic [--repeat 5]

Builds a Claude-Code-shaped session of ``--turns`` turns, starting from a real Claude Code
2.1.337 first request (``tests/data/claude_code/01_first_call.json``: system prompt, tools,
``role: system`` entries): each turn adds an assistant message (text + a Read/Bash tool_use)
and a user ``tool_result`` of 0.3 to 6 KB; the ``cache_control`` marker moves to the newest block
every turn and, every 60 turns, an old tool result is cleared (as Claude Code's micro-compaction
does). Answers are real Messages API SSE streams (``tests.fake_upstream.anthropic_sse``).

The exchanges go through the recorder's own pipeline (``otelproxy.recorder.build_pipeline``:
redact → decode → provider parse → session → local store), in batches of 8, twice: as
otelproxy records them (request bodies as deltas, ``otelproxy.compact``) and with deltas off —
the naive record, every body whole. Reported: bytes on disk of each (JSONL files and the SQLite
index), their ratio, exchanges per second through the pipeline, and a check that every request
body comes back byte for byte from the compact record (``otelproxy.browse.raw_bodies``).
Exchanges per second are given on the wall clock and on the process's CPU time (on a shared
machine the latter is the steadier figure).

``--bench-traffic`` instead measures the recorder's CPU time per exchange on the benchmark's
traffic (``benchmarks.traffic``: 20 conversations of 12 turns, 41 to 91 KB requests, answers of
150 SSE events), recorded in the order the load generator sends them, in batches of 8: an
in-process microbenchmark of the recorder alone (no proxy, no sockets, no pipe).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import traffic  # noqa: E402
from otelproxy import browse, config, db  # noqa: E402
from otelproxy.compact import DeltaEncoder  # noqa: E402
from otelproxy.record import Chunks, Exchange  # noqa: E402
from otelproxy.recorder import build_pipeline  # noqa: E402
from otelproxy.store import LocalStore  # noqa: E402
from tests.fake_upstream import Reply, anthropic_sse  # noqa: E402

FIRST_CALL = ROOT / "tests" / "data" / "claude_code" / "01_first_call.json"
CLIENT_SESSION = "3c1d2b7e-5f00-4a8e-9d7c-2f4b6a8c0e11"
BATCH = 8


def _words(rng: random.Random, n: int) -> str:
    vocabulary = ("def", "return", "self", "import", "class", "the", "value", "config", "path",
                  "record", "session", "for", "in", "if", "None", "await", "async", "test")
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def session_turns(turns: int, seed: int = 7) -> list[tuple[bytes, list[bytes]]]:
    """``(request body, SSE events)`` for each turn of one growing Claude Code session."""
    rng = random.Random(seed)
    body: dict[str, Any] = orjson.loads(FIRST_CALL.read_bytes())
    messages: list[dict[str, Any]] = body["messages"]
    out: list[tuple[bytes, list[bytes]]] = []
    for turn in range(1, turns + 1):
        for message in messages:  # the marker moves to the newest block
            content = message.get("content")
            for block in content if isinstance(content, list) else []:
                block.pop("cache_control", None)
        last = messages[-1]["content"]
        if isinstance(last, list):
            last[-1]["cache_control"] = {"type": "ephemeral"}
        if turn % 60 == 0:  # micro-compaction clears an old tool result
            for message in messages[4:]:
                content = message.get("content")
                if isinstance(content, list) and content and \
                        content[0].get("type") == "tool_result" and \
                        content[0]["content"] != "[Old tool result content cleared]":
                    content[0]["content"] = "[Old tool result content cleared]"
                    break
        request = orjson.dumps(body)
        tool_id = f"toolu_{turn:04d}{rng.randrange(16 ** 8):08x}"
        tool = rng.choice(("Read", "Bash"))
        tool_input = ({"file_path": f"/workspace/src/module_{turn % 37}.py"} if tool == "Read"
                      else {"command": f"pytest -q tests/test_{turn % 23}.py",
                            "description": "run the tests"})
        blocks: list[dict[str, Any]] = [
            {"type": "text", "text": f"Step {turn}: " + _words(rng, 40)},
            {"type": "tool_use", "id": tool_id, "name": tool, "input": tool_input}]
        events = anthropic_sse(Reply(blocks=blocks), body["model"])
        out.append((request, events))
        messages.append({"role": "assistant", "content": blocks})
        result = _words(rng, rng.randint(50, 1000))
        messages.append({"role": "user", "content": [
            {"tool_use_id": tool_id, "type": "tool_result", "content": result}]})
    return out


def exchanges(turns: list[tuple[bytes, list[bytes]]]) -> list[Exchange]:
    headers = [("content-type", "application/json"), ("anthropic-version", "2023-06-01"),
               ("x-api-key", "sk-ant-api03-" + "b" * 86 + "-BBBBBBBB"), ("x-app", "cli"),
               ("user-agent", "claude-cli/2.1.337 (external, sdk-cli)"),
               ("X-Claude-Code-Session-Id", CLIENT_SESSION)]
    out = []
    now_ns = time.monotonic_ns()
    wall = time.time()
    for n, (request, events) in enumerate(turns):
        start = now_ns + n * 10_000_000_000
        chunks = [(start + 300_000_000 + i * 20_000_000, event) for i, event in enumerate(events)]
        out.append(Exchange(
            id=f"bench-{n:05d}", provider="anthropic", upstream_url="https://api.anthropic.com",
            method="POST", path="/v1/messages", query="beta=true", request_headers=headers,
            request_body=request, started_wall=wall + n * 10, started_ns=start,
            forwarded_ns=start + 100_000, status=200, reason="OK",
            response_headers=[("content-type", "text/event-stream; charset=utf-8")],
            headers_ns=start + 250_000_000, chunks=Chunks.of(chunks),
            finished_ns=chunks[-1][0] + 1000,
        ))
    return out


def disk_bytes(log_dir: Path) -> dict[str, int]:
    jsonl = sum(p.stat().st_size for p in log_dir.rglob("*.jsonl"))
    index = sum(p.stat().st_size for p in log_dir.glob("sessions.db*"))
    return {"jsonl": jsonl, "index": index, "total": jsonl + index}


def traffic_exchanges(conversations: int = 20, turns: int = traffic.MAX_TURNS) -> list[Exchange]:
    """The benchmark's Claude-Code-shaped exchanges, turn after turn of every conversation."""
    events = traffic.answer_writes()
    headers = list(traffic.HEADERS.items())
    out: list[Exchange] = []
    start = time.monotonic_ns()
    for turn in range(turns):
        for number in range(conversations):
            body = traffic.conversation_request(f"c{number:02d}", turn)
            at = start + len(out) * 50_000_000
            chunks = [(at + 1_000_000 + i * 100_000, event) for i, event in enumerate(events)]
            out.append(Exchange(
                id=f"traffic-{len(out):05d}", provider="anthropic",
                upstream_url="https://api.anthropic.com", method="POST", path="/v1/messages",
                query="beta=true", request_headers=headers, request_body=body,
                started_wall=time.time(), started_ns=at, forwarded_ns=at + 100_000, status=200,
                reason="OK", response_headers=[("content-type", "text/event-stream")],
                headers_ns=at + 500_000, chunks=Chunks.of(chunks),
                finished_ns=chunks[-1][0] + 1000))
    return out


def traffic_cpu_ms(repeat: int) -> list[float]:
    """CPU milliseconds per exchange of the recorder pipeline on ``traffic_exchanges``, one
    figure a run (a fresh record each time)."""
    figures = []
    for _ in range(repeat):
        items = traffic_exchanges()
        work = Path(tempfile.mkdtemp(prefix="otelproxy-traffic-", dir=os.environ.get("TMPDIR")))
        try:
            pipeline = build_pipeline(config.build({"log_dir": str(work)}, []), {})
            started = time.process_time()
            for at in range(0, len(items), BATCH):
                pipeline.handle_batch(list(items[at:at + BATCH]))
            figures.append(1000 * (time.process_time() - started) / len(items))
            pipeline.close(30)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return figures


def record(items: list[Exchange], log_dir: Path, *, deltas: bool) -> tuple[float, float]:
    """Runs the recorder pipeline over the exchanges; returns the seconds it took (wall clock,
    CPU time of the process)."""
    cfg = config.build({"log_dir": str(log_dir)}, [])
    pipeline = build_pipeline(cfg, {})
    if not deltas:
        for sink in pipeline.sinks:
            if isinstance(sink, LocalStore):
                sink._deltas = DeltaEncoder(max_bytes=0)  # remembers nothing: every body whole
    started, cpu = time.perf_counter(), time.process_time()
    for at in range(0, len(items), BATCH):
        pipeline.handle_batch(list(items[at:at + BATCH]))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    pipeline.close(30)
    return elapsed, cpu


def verify(log_dir: Path, turns: list[tuple[bytes, list[bytes]]]) -> int:
    """Every request body rebuilt from the compact record equals the one sent; returns count."""
    conn = db.connect(log_dir / "sessions.db", readonly=True)
    [session] = [row["id"] for row in conn.execute("SELECT id FROM sessions")]
    for seq, (request, _) in enumerate(turns, 1):
        bodies = browse.raw_bodies(conn, log_dir, session, seq)
        assert bodies is not None and bodies[0] == request, f"turn {seq} differs"
    conn.close()
    return len(turns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--bench-traffic", action="store_true",
                        help="CPU ms per exchange on the benchmark's traffic instead")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if args.bench_traffic:
        figures = traffic_cpu_ms(args.repeat)
        median = sorted(figures)[len(figures) // 2]
        print("recorder CPU ms per exchange (benchmark traffic): "
              + " ".join(f"{ms:.3f}" for ms in figures) + f"  median {median:.3f}")
        return 0
    turns = session_turns(args.turns)
    work = Path(tempfile.mkdtemp(prefix="otelproxy-growth-", dir=os.environ.get("TMPDIR")))
    try:
        naive_s, naive_cpu = record(exchanges(turns), work / "naive", deltas=False)
        compact_s, compact_cpu = record(exchanges(turns), work / "compact", deltas=True)
        naive, compact = disk_bytes(work / "naive"), disk_bytes(work / "compact")
        checked = verify(work / "compact", turns)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sent = sum(len(request) for request, _ in turns)
    result = {
        "turns": args.turns,
        "request_bytes_sent": sent,
        "last_request_bytes": len(turns[-1][0]),
        "naive": naive, "compact": compact,
        "compact_share_of_naive": round(compact["total"] / naive["total"], 4),
        "exchanges_per_s_compact": round(args.turns / compact_s, 1),
        "exchanges_per_s_naive": round(args.turns / naive_s, 1),
        "exchanges_per_cpu_s_compact": round(args.turns / compact_cpu, 1),
        "exchanges_per_cpu_s_naive": round(args.turns / naive_cpu, 1),
        "bodies_rebuilt_byte_for_byte": checked,
    }
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        mib = 1024 * 1024
        print(f"{args.turns} turns, requests sent {sent / mib:.1f} MiB "
              f"(last {len(turns[-1][0]) / 1024:.0f} KiB)")
        print(f"naive record   {naive['total'] / mib:8.2f} MiB  "
              f"({result['exchanges_per_s_naive']} exchanges/s, "
              f"{result['exchanges_per_cpu_s_naive']} per CPU second)")
        print(f"compact record {compact['total'] / mib:8.2f} MiB  "
              f"({result['exchanges_per_s_compact']} exchanges/s, "
              f"{result['exchanges_per_cpu_s_compact']} per CPU second)  = "
              f"{100 * result['compact_share_of_naive']:.1f}% of naive")
        print(f"request bodies rebuilt byte for byte: {checked}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
