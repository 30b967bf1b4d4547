"""The recorder alone, given Claude-Code-shaped exchanges at a steady pace:
``python -m benchmarks.recorder_pace``.

    .venv/bin/python -m benchmarks.recorder_pace [--conversations 20] [--turns 12]
        [--interval-ms 22] [--stream-ms 450] [--rounds 3] [--src DIR ...]

Starts a real recorder process (``otelproxy.recorder.Recorder``, as the proxy does, with a
temporary log dir) and gives it ``--conversations`` x ``--turns`` exchanges of the benchmark's
Claude Code traffic (``benchmarks.traffic.conversation_request``: a growing conversation, each
with its session id header, and an answer of 150 SSE events): a new one every
``--interval-ms``, its request handed over at once (``Recorder.hand_over``, as the proxy does
when a stream begins) and the exchange submitted ``--stream-ms`` later (when it ends). The
defaults are the benchmark's Claude Code phase (20 conversations, about 44 exchanges a second).
``--interval-ms 0 --stream-ms 0`` gives everything at once.

Reported per round: the recorder process's CPU time per exchange (``/proc/PID/stat``) until
every exchange is recorded (``Recorder.drain``). ``--src DIR`` (repeatable) runs the otelproxy
package found in DIR instead of this checkout's (``git archive HEAD otelproxy | tar -x -C DIR``);
with several, rounds alternate between them, for an A/B in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import traffic
from benchmarks.recorder_burst import cpu_s

_ANSWER = traffic.answer_writes()


async def paced(conversations: int, turns: int, interval_s: float, stream_s: float) -> float:
    """One round in this process; the recorder's CPU ms per exchange."""
    from otelproxy import config
    from otelproxy.record import Chunks, Exchange
    from otelproxy.recorder import Recorder

    async def one(number: int, conversation: int, turn: int) -> None:
        now = time.monotonic_ns()
        exchange = Exchange(
            id=f"pace{number:08d}", provider="anthropic", upstream_url="http://127.0.0.1:1",
            method="POST", path="/v1/messages", query="beta=true",
            request_headers=[*traffic.HEADERS.items(),
                             ("X-Claude-Code-Session-Id", f"pace-{conversation:04d}")],
            request_body=traffic.conversation_request(f"pace{conversation}", turn),
            started_wall=time.time(), started_ns=now)
        exchange.status, exchange.headers_ns = 200, now
        exchange.response_headers = [("content-type", "text/event-stream; charset=utf-8")]
        recorder.hand_over(exchange)
        await asyncio.sleep(stream_s)
        began = time.monotonic_ns()
        exchange.chunks = Chunks.of((began + index, event) for index, event in enumerate(_ANSWER))
        exchange.finished_ns = time.monotonic_ns()
        recorder.submit(exchange)

    with tempfile.TemporaryDirectory() as work:
        recorder = Recorder(config.build({"log_dir": str(Path(work) / "logs")},
                                         list(config.DEFAULT_UPSTREAMS)), env={})
        await recorder.start()
        try:
            await asyncio.sleep(0.3)
            pid = recorder.process.pid
            before = cpu_s(pid)
            running = []
            number = 0
            for turn in range(turns):
                for conversation in range(conversations):
                    number += 1
                    running.append(asyncio.create_task(one(number, conversation, turn)))
                    await asyncio.sleep(interval_s)
            await asyncio.gather(*running)
            assert await recorder.drain(300), "the exchanges were not recorded"
            used = cpu_s(pid) - before
            written = recorder.counters()["records_written"]
            assert written == number, f"{written} recorded of {number}"
        finally:
            await recorder.stop(30)
    return used * 1000 / number


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recorder_pace",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--interval-ms", type=float, default=22.0)
    parser.add_argument("--stream-ms", type=float, default=450.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--src", metavar="DIR", action="append", default=[],
                        help="run the otelproxy package in DIR (repeatable: rounds alternate)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.conversations, args.turns, args.interval_ms / 1000, args.stream_ms / 1000)
    if args.one:  # one round, in a process whose sys.path the caller chose
        print(f"{asyncio.run(paced(*shape)):.3f}")
        return 0
    sources = [str(Path(src).resolve()) for src in args.src] or [""]
    here = str(Path(__file__).resolve().parent.parent)
    for round_number in range(1, args.rounds + 1):
        for src in sources:
            # the recorder process finds the package where its parent did (PYTHONPATH)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (src, here))))
            completed = subprocess.run(
                [sys.executable, "-m", "benchmarks.recorder_pace", "--one",
                 "--conversations", str(args.conversations), "--turns", str(args.turns),
                 "--interval-ms", str(args.interval_ms), "--stream-ms", str(args.stream_ms)],
                env=env, capture_output=True, text=True, check=True, cwd=src or here)
            print(f"round {round_number} {src or 'this checkout'}: "
                  f"{args.conversations * args.turns} exchanges, recorder CPU "
                  f"{completed.stdout.strip()} ms per exchange")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
