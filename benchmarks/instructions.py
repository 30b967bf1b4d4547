"""Instructions per Claude Code exchange, counted by valgrind.

    .venv/bin/python -m benchmarks.instructions [--exchanges 24] [--recorded 228]
        [--src DIR] [--only bare,proxy,recorder] [--json]

A CPU time read on a shared two-core machine moves by 10 to 20 % from one run to the next, and
the benchmark's Claude Code figure with it; the number of instructions a program runs moves far
less (five counts of the same proxy process spanned 0.7 %, bare's 0.1 %, the recorder's 0.02 %;
the proxies' depend a little on timing). This counts them with ``valgrind --tool=callgrind``
(``PYTHONHASHSEED=0``), so that two versions of the code can be told apart by a few per cent:

bare, proxy   the proxy process of bare (``benchmarks.servers bare``) and of otelproxy
              (``python -m otelproxy``; its recorder process, a child, is not traced), each
              serving ``--exchanges`` Claude-Code-shaped exchanges one after the other (growing
              requests of ``benchmarks.traffic``, answers of 150 events ``INTERVAL_MS`` apart from
              the benchmark's fake upstream) to a client outside valgrind, then, started again,
              none: the difference over the number of exchanges is what one costs, start-up and
              shutdown taken out.
recorder      the recorder's pipeline (``otelproxy.recorder_process.build_pipeline``, as the
              recorder process runs it, minus the pipe) recording ``--recorded`` of the
              benchmark's exchanges (``benchmarks.record_growth.traffic_exchanges``), 12 a
              batch after a first batch of 12, against the first batch alone.

``--src DIR`` counts the otelproxy package in DIR (``git archive REV otelproxy | tar -x -C
DIR``) instead of this checkout's. A count is not a time: the kernel's work (every socket read
and write) is not counted; under valgrind a large ``memcpy`` (``rep movsb``) counts one
instruction per byte and the clock is read without the vDSO; SHA-256's rounds run several
instructions a cycle. Compare versions of the same code with it, not one proxy with another.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from benchmarks import traffic
from benchmarks.procs import HOST, Process, free_port, wait_listening
from benchmarks.targets import clean_env, compile_sources, serving

HERE = Path(__file__).resolve().parent.parent
PARTS = ("bare", "proxy", "recorder")
_COLLECTED = re.compile(rb"Collected : (\d+)")
INTERVAL_MS = 10
"""Milliseconds between two deltas of an answer. A proxy under valgrind relays an event in
about 1.5 ms; given them faster (3 ms apart, as the benchmark does) with another count running
beside it, it fell behind, read several events at a time and ran 1 % fewer instructions. At
10 ms apart it reads each event as it comes, as it does outside valgrind."""
_START_S = 600.0
"""Seconds a program under valgrind gets to start listening (about 15 here)."""


def valgrind_argv(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]


def collected(stderr: bytes) -> int:
    """The instruction count valgrind printed at the program's exit."""
    found = _COLLECTED.search(stderr)
    if found is None:
        raise RuntimeError("valgrind printed no count: "
                           + stderr.decode("utf-8", "replace")[-500:])
    return int(found.group(1))


def _env(src: Path) -> dict[str, str]:
    """The benchmark's clean environment, a fixed hash seed, ``src`` first on the path."""
    return clean_env(PYTHONHASHSEED="0",
                     PYTHONPATH=os.pathsep.join(dict.fromkeys((str(src), str(HERE)))))


async def exchanges(url: str, count: int) -> None:
    """``count`` streamed Claude Code turns, one after the other (a conversation of up to
    ``MAX_TURNS``, then the next)."""
    async with aiohttp.ClientSession() as session:
        for number in range(count):
            conversation = f"instructions-{number // traffic.MAX_TURNS}"
            headers = {**traffic.HEADERS, "X-Claude-Code-Session-Id": conversation,
                       "x-bench-deltas": str(traffic.DELTA_COUNT),
                       "x-bench-interval-ms": str(INTERVAL_MS)}
            body = traffic.conversation_request(conversation, number % traffic.MAX_TURNS)
            async with session.post(url + "?beta=true", data=body, headers=headers) as answer:
                while await answer.content.readany():
                    pass
                if answer.status != 200:
                    raise RuntimeError(f"{url} answered {answer.status}")


def proxy_count(part: str, src: Path, upstream_port: int, count: int, work: Path) -> int:
    """Instructions of ``part``'s proxy process (bare or otelproxy) serving ``count``
    exchanges, from its start to its exit."""
    port = free_port()
    if part == "bare":
        argv = ["-m", "benchmarks.servers", "bare", "--port", str(port)]
        cwd = HERE
    else:
        argv = ["-m", "otelproxy", "--port", str(port), "--log-dir",
                str(Path(tempfile.mkdtemp(dir=work))), "--upstream",
                f"http://{HOST}:{upstream_port}", "--log-level", "warning"]
        cwd = src  # ``-m`` puts the working directory first on sys.path
    log = work / f"{part}-{count}.log"
    process = Process(part, [*valgrind_argv(work / f"{part}-{count}.out"), *argv], _env(src),
                      log, cwd=str(cwd))
    process.start()
    try:
        wait_listening(port, process.popen, _START_S)
        asyncio.run(exchanges(f"http://{HOST}:{port}/anthropic/{HOST}:{upstream_port}"
                              "/v1/messages", count))
    finally:
        process.stop(_START_S)  # SIGTERM: both stop cleanly on it, and valgrind then counts
    return collected(log.read_bytes())


_RECORD = textwrap.dedent("""
    import shutil, sys, tempfile
    from pathlib import Path
    from benchmarks.record_growth import traffic_exchanges
    from otelproxy import config
    from otelproxy.recorder_process import build_pipeline

    count = int(sys.argv[1])
    items = traffic_exchanges()
    assert count % 12 == 0 and count + 12 <= len(items), count
    work = Path(tempfile.mkdtemp())
    pipeline = build_pipeline(config.build({"log_dir": str(work)}, []), {}, export=False)
    for at in range(0, 12 + count, 12):  # the first batch: what a run of none also does
        pipeline.handle_batch(list(items[at:at + 12]))
    assert pipeline.close(30)
    shutil.rmtree(work)
""")


def recorder_count(src: Path, count: int, work: Path) -> int:
    """Instructions of a process recording 12 + ``count`` exchanges through the pipeline."""
    completed = subprocess.run([*valgrind_argv(work / f"recorder-{count}.out"), "-c", _RECORD,
                                str(count)], cwd=HERE, env=_env(src), capture_output=True,
                               timeout=_START_S * 2, check=False)
    if completed.returncode:
        raise RuntimeError(completed.stderr.decode("utf-8", "replace")[-1000:])
    return collected(completed.stderr)


def measure(parts: tuple[str, ...], src: Path, count: int, recorded: int) -> dict[str, Any]:
    """Instructions per exchange of each part; with ``bare`` and ``proxy``, their ratio."""
    out: dict[str, Any] = {"exchanges": count, "recorded": recorded, "src": str(src)}
    # byte-compiled, this checkout and ``src`` alike: a copy compiled from source at every start
    # (PYTHONDONTWRITEBYTECODE) counted 0.5 % more per exchange than the same code compiled
    compile_sources(str(src))
    compileall.compile_dir(HERE / "tests", quiet=1)  # benchmarks.record_growth imports it
    with tempfile.TemporaryDirectory(prefix="otelproxy-instructions-") as folder, \
            serving("upstream") as port, ThreadPoolExecutor(2) as pool:
        work = Path(folder)
        for part in parts:
            n = recorded if part == "recorder" else count
            if part == "recorder":  # its count does not depend on timing: two at once
                none, some = pool.map(lambda k: recorder_count(src, k, work), (0, n))
            else:  # one at a time, so that the proxy keeps up with the upstream (INTERVAL_MS)
                none, some = (proxy_count(part, src, port, k, work) for k in (0, n))
            out[part] = {"per_exchange": round((some - none) / n), "none": none, "some": some}
    if "bare" in out and "proxy" in out:
        out["proxy_over_bare"] = round(out["proxy"]["per_exchange"]
                                       / out["bare"]["per_exchange"], 3)
    return out


def report(result: dict[str, Any]) -> str:
    lines = [f"instructions per Claude Code exchange (valgrind --tool=callgrind), otelproxy "
             f"from {result['src']}:"]
    labels = {"bare": f"bare, proxy process ({result['exchanges']} exchanges)",
              "proxy": f"otelproxy, proxy process ({result['exchanges']} exchanges)",
              "recorder": f"otelproxy, recorder pipeline ({result['recorded']} exchanges)"}
    for part, label in labels.items():
        if part in result:
            lines.append(f"  {label:48s} {result[part]['per_exchange'] / 1e6:8.3f} M")
    if "proxy_over_bare" in result:
        lines.append(f"  otelproxy's proxy process / bare's: {result['proxy_over_bare']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--exchanges", type=int, default=24,
                        help="exchanges each proxy process serves (default 24)")
    parser.add_argument("--recorded", type=int, default=228,
                        help="exchanges the recorder pipeline records, a multiple of 12 up to "
                             "228 (default 228)")
    parser.add_argument("--src", type=Path, default=HERE,
                        help="the directory holding the otelproxy package to count")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated, from {', '.join(PARTS)} (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    parts = tuple(part for part in args.only.split(",") if part)
    if not set(parts) <= set(PARTS) or args.recorded % 12 or not 0 < args.recorded <= 228 \
            or args.exchanges < 1:
        parser.error("--only takes bare, proxy and recorder; --recorded a multiple of 12 up "
                     "to 228; --exchanges at least 1")
    result = measure(parts, args.src.resolve(), args.exchanges, args.recorded)
    print(orjson.dumps(result).decode() if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
