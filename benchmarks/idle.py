"""Idle memory only, without the whole benchmark: ``python -m benchmarks.idle [--rounds N]``.

Starts the fake upstream, the OTLP receiver, the bare pass-through, otelproxy and otelproxy with
OTLP export (as ``benchmarks.run`` does, without CPU pinning), warms each up as the full run's
idle phase does (3 JSON exchanges and 4 streams of 10 events), waits until otelproxy's record
(and export) has caught up, then prints the resident memory (``VmRSS`` from ``/proc``) of every
process of each tree, at start and after the warm-up, and the memory private to the tree
(``Private_*`` from ``smaps_rollup``: pages no other process maps, so shared libraries and the
interpreter's own code are left out) and the tree's resident pages counted once each (a page of
libpython or libcrypto that both of otelproxy's processes map is one page of memory; summing
``VmRSS`` counts it twice; needs root to read page frames). With ``--burst N``, N concurrent
streams of 50 events then run through each target, and the same figures are printed once the
target is idle again (what a burst leaves resident). With ``--rounds N`` all of it is done N
times.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks import procs, traffic
from benchmarks.procs import Pinning, Process, free_port, wait_listening
from benchmarks.run import Control, client, post, stream
from benchmarks.targets import Target, build, clean_env, compile_sources, wait_ready

NAMES = ("bare", "otelproxy", "otelproxy+otlp")


async def _warm_up(targets: list[Target], control: Control) -> None:
    async with client(4) as session:
        for target in targets:
            for turn in range(3):
                await post(session, target, traffic.conversation_request("warm", turn, False))
            await asyncio.gather(*(
                stream(session, target, traffic.conversation_request(f"warm{n}", 0), 10, 1.0)
                for n in range(4)))
        for target in targets:
            await control.settle(target)
    await asyncio.sleep(1.0)


async def _burst(targets: list[Target], control: Control, streams: int) -> None:
    async with client(streams) as session:
        for target in targets:
            await asyncio.gather(*(
                stream(session, target, traffic.conversation_request(f"burst{n}", n % 4), 50, 5.0)
                for n in range(streams)))
            await control.settle(target)
    await asyncio.sleep(2.0)  # the proxy looks for being idle once a second


def _report(targets: list[Target], when: str, started: dict[str, list[dict[str, object]]]
            ) -> None:
    for target in targets:
        assert target.process is not None
        members = procs.tree_members(target.process.pid)
        print(f"{target.name:<15} {procs.tree_rss_mib(target.process.pid):6.1f} MiB idle {when} "
              f"({target.failures} failed); each page once: "
              f"{procs.tree_unique_mib(target.process.pid)} MiB")
        private = 0.0
        for pid, member, at_start in zip(procs.tree(target.process.pid), members,
                                         started[target.name], strict=False):
            private += _private_mib(pid)
            print(f"    {member['rss_mib']:6.1f} MiB (at start {at_start['rss_mib']:5.1f})  "
                  f"{member['command']}")
        print(f"    private to the tree (USS): {private:.1f} MiB")


async def _measure(targets: list[Target], upstream_port: int, otlp_port: int,
                   burst: int) -> None:
    started = {}
    for target in targets:
        assert target.process is not None
        started[target.name] = procs.tree_members(target.process.pid)
    async with client(4) as http:
        control = Control(upstream_port, otlp_port, http)
        await _warm_up(targets, control)
        _report(targets, "after the warm-up", started)
        if burst:
            await _burst(targets, control, burst)
            _report(targets, f"after a burst of {burst} streams", started)


def _private_mib(pid: int) -> float:
    """Pages no other process maps (``Private_Clean`` + ``Private_Dirty``)."""
    kib = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kib += int(line.split()[1])
    return kib / 1024


def one_round(work: Path, burst: int = 0) -> None:
    servers = {}
    for kind in ("upstream", "otlp"):
        port = free_port()
        servers[kind] = (port, Process(kind, [sys.executable, "-m", "benchmarks.servers", kind,
                                              "--port", str(port)], clean_env(),
                                       work / f"{kind}.log"))
        servers[kind][1].start()
    targets: list[Target] = []
    try:
        for port, process in servers.values():
            wait_listening(port, process.popen, 30)
        compile_sources()
        targets = [build(name, servers["upstream"][0], servers["otlp"][0], work, Pinning(False))
                   for name in NAMES]
        for target in targets:
            wait_ready(target)
            if target.error:
                raise RuntimeError(f"{target.name}: {target.error}")
        asyncio.run(_measure(targets, servers["upstream"][0], servers["otlp"][0], burst))
    finally:
        for target in targets:
            if target.process is not None:
                target.process.stop()
        for _, process in servers.values():
            process.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle", description=__doc__)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="then N concurrent streams per target, and the figures again")
    args = parser.parse_args(argv)
    for number in range(args.rounds):
        print(f"round {number + 1}")
        with tempfile.TemporaryDirectory(prefix="otelproxy-idle-") as work:
            one_round(Path(work), args.burst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
