"""The recorder alone, given a burst of exchanges: ``python -m benchmarks.recorder_burst``.

    .venv/bin/python -m benchmarks.recorder_burst [--exchanges 500] [--group 500]
        [--interval-ms 0] [--rounds 3] [--src DIR]

Starts a real recorder process (``otelproxy.recorder.Recorder``, as the proxy does, with a
temporary log dir), records 5 exchanges to warm it up, then hands it ``--exchanges`` exchanges
shaped like those of the benchmark's 500-stream SSE round (``benchmarks.traffic``: a 40 KB
request, an answer of 40 deltas, each one its own network chunk), ``--group`` of them per event
loop iteration, ``--interval-ms`` apart (the defaults: all in one iteration, as when hundreds of
streams end together). Reported per round: the recorder process's peak resident set
(``VmRSS`` from ``/proc``, sampled every 10 ms) over its resident set before the burst, the
seconds until every exchange is recorded (``Recorder.drain``) and the recorder's CPU time per
exchange meanwhile (``/proc/PID/stat``; on a shared machine the steadier figure). ``--src DIR``
runs the otelproxy package found in DIR (e.g. ``git archive main otelproxy | tar -x -C DIR``),
for an A/B of two versions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def exchange(number: int, body: bytes, answer: list[bytes]) -> Any:
    """One finished SSE exchange; its bodies are its own objects, as unpickled ones are."""
    from benchmarks import traffic
    from otelproxy.record import Chunks, Exchange

    now = time.monotonic_ns()
    ex = Exchange(id=f"burst{number:08d}", provider="anthropic",
                  upstream_url="http://127.0.0.1:1", method="POST", path="/v1/messages",
                  query="beta=true", request_headers=list(traffic.HEADERS.items()),
                  request_body=bytes(bytearray(body)))
    ex.status, ex.headers_ns, ex.finished_ns = 200, now, now
    ex.response_headers = [("content-type", "text/event-stream")]
    ex.chunks = Chunks.of((now + index, chunk) for index, chunk in enumerate(answer))
    return ex


def cpu_s(pid: int | None) -> float:
    """CPU time (user + system) the process has used, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | None) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def burst(count: int, group: int, interval_ms: float) -> dict[str, float]:
    """One round: a new recorder, warmed up, given ``count`` exchanges."""
    from benchmarks import traffic
    from otelproxy import config
    from otelproxy.recorder import Recorder

    body = traffic.conversation_request("burst", 0)
    answer = traffic.answer_writes(40)
    with tempfile.TemporaryDirectory() as work:
        recorder = Recorder(config.build({"log_dir": str(Path(work) / "logs")},
                                         list(config.DEFAULT_UPSTREAMS)), env={})
        await recorder.start()
        try:
            for number in range(5):
                recorder.submit(exchange(number, body, answer))
            assert await recorder.drain(60), "the warm-up was not recorded"
            await asyncio.sleep(0.3)
            pid = recorder.process.pid
            before = peak = rss_mib(pid)
            done = asyncio.Event()

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_mib(pid))
                    await asyncio.sleep(0.01)

            sampler = asyncio.create_task(sample())
            waiting = [exchange(5 + number, body, answer) for number in range(count)]
            began, cpu_before = time.monotonic(), cpu_s(pid)
            for start in range(0, count, group):
                for ex in waiting[start:start + group]:
                    recorder.submit(ex)
                waiting[start:start + group] = [None] * len(waiting[start:start + group])
                await asyncio.sleep(interval_ms / 1000)
            assert await recorder.drain(300), "the burst was not recorded"
            took, cpu = time.monotonic() - began, cpu_s(pid) - cpu_before
            done.set()
            await sampler
            written = recorder.counters()["records_written"]
            assert written == 5 + count, f"{written} recorded of {5 + count}"
        finally:
            await recorder.stop(30)
    return {"recorder_before_mib": round(before, 1),
            "recorder_peak_over_mib": round(peak - before, 1), "seconds": round(took, 2),
            "cpu_ms_per_exchange": round(cpu * 1000 / count, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recorder_burst",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--exchanges", type=int, default=500)
    parser.add_argument("--group", type=int, default=0,
                        help="exchanges per event loop iteration (default: all of them)")
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--src", metavar="DIR", default="",
                        help="run the otelproxy package in DIR instead of this checkout's")
    args = parser.parse_args(argv)
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import otelproxy

    print(f"otelproxy from {Path(otelproxy.__file__).parent}")
    for round_number in range(1, args.rounds + 1):
        result = asyncio.run(burst(args.exchanges, args.group or args.exchanges,
                                   args.interval_ms))
        print(f"round {round_number}: {args.exchanges} exchanges, recorder peak "
              f"+{result['recorder_peak_over_mib']} MiB over {result['recorder_before_mib']} MiB, "
              f"recorded in {result['seconds']} s, recorder CPU "
              f"{result['cpu_ms_per_exchange']} ms per exchange")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
