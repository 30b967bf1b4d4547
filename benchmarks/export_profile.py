"""Where the recorder's CPU goes when OTLP export is on, thread by thread.

    .venv/bin/python -m benchmarks.export_profile [--rounds 3] [--batch 2] [--interval-ms 40]
                                                   [--profile] [--json]

The benchmark's Claude-Code-shaped exchanges (``benchmarks.record_growth.traffic_exchanges``:
20 conversations of 12 turns, 150-event streams) go through the recorder's own pipeline
(``otelproxy.recorder_process.build_pipeline``) on this thread, ``--batch`` exchanges every
``--interval-ms`` (the benchmark's rate: about 50 exchanges/s reach its recorder in small
batches), once without export and once exporting to the benchmark's loopback OTLP receiver
(``benchmarks.servers otlp``, another process) with its batch settings
(``OTEL_BSP/BLRP_SCHEDULE_DELAY=1000``); rounds alternate. Reported per exchange: the process's
CPU time and each thread's (``time.pthread_getcpuclockid``), the difference between the two
modes being what export costs. ``--profile`` adds a ``cProfile`` of every thread the sink
starts, merged (top functions by own time).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from benchmarks.record_growth import traffic_exchanges
from benchmarks.targets import serving
from otelproxy import config
from otelproxy.recorder_process import build_pipeline

Json = dict[str, Any]


@contextlib.contextmanager
def receiver() -> Iterator[str]:
    """The benchmark's OTLP receiver in its own process; yields its base URL."""
    with serving("otlp") as port:
        yield f"http://127.0.0.1:{port}"


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of every live thread, by name."""
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        with contextlib.suppress(OSError, ProcessLookupError):
            clock = time.pthread_getcpuclockid(thread.ident)
            out[thread.name] = out.get(thread.name, 0.0) + time.clock_gettime(clock)
    return out


class _Profiles:
    """cProfile in every thread started while it is installed (``threading.setprofile`` cannot
    hand a profiler to a thread; wrapping ``Thread.run`` can)."""

    def __init__(self) -> None:
        self.stats: list[cProfile.Profile] = []
        self._original = threading.Thread.run

    def __enter__(self) -> _Profiles:
        profiles = self.stats
        original = self._original

        def run(self: threading.Thread) -> None:
            profile = cProfile.Profile(time.thread_time)
            profiles.append(profile)
            profile.enable()
            try:
                original(self)
            finally:
                profile.disable()

        threading.Thread.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        threading.Thread.run = self._original  # type: ignore[method-assign]

    def report(self, top: int = 25) -> str:
        if not self.stats:
            return ""
        out = io.StringIO()
        merged = pstats.Stats(self.stats[0], stream=out)
        for profile in self.stats[1:]:
            merged.add(profile)
        merged.sort_stats("tottime").print_stats(top)
        return out.getvalue()


def one_round(url: str | None, batch: int, interval: float, profiles: _Profiles | None) -> Json:
    """Record the traffic once (exporting to ``url`` when given); CPU ms per exchange."""
    items = traffic_exchanges()
    work = Path(tempfile.mkdtemp(prefix="otelproxy-export-profile-"))
    env = {"OTEL_BSP_SCHEDULE_DELAY": "1000", "OTEL_BLRP_SCHEDULE_DELAY": "1000"}
    values: dict[str, Any] = {"log_dir": str(work)}
    if url is not None:
        values.update(seq_url=url, seq_api_key="bench-key")
    try:
        with profiles if profiles is not None else contextlib.nullcontext():
            pipeline = build_pipeline(config.build(values, []), env, export=url is not None)
        threads_before = _thread_cpu()
        started = time.process_time()
        wall = time.monotonic()
        for at in range(0, len(items), batch):
            pipeline.handle_segment(list(items[at:at + batch]))
            time.sleep(max(0.0, wall + interval * (at // batch + 1) - time.monotonic()))
        assert pipeline.flush(30)
        threads_after = _thread_cpu()
        total = time.process_time() - started
        pipeline.close(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per = 1000 / len(items)
    return {"cpu_ms": round(total * per, 3),
            "threads_ms": {name: round((threads_after[name] - threads_before.get(name, 0.0))
                                       * per, 3) for name in sorted(threads_after)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--interval-ms", type=float, default=40.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    profiles = _Profiles() if args.profile else None
    results: dict[str, list[Json]] = {"off": [], "export": []}
    with receiver() as url:
        for _ in range(args.rounds):
            results["off"].append(one_round(None, args.batch, args.interval_ms / 1000, None))
            results["export"].append(one_round(url, args.batch, args.interval_ms / 1000,
                                               profiles))
    if args.json:
        sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for mode, rounds in results.items():
            for result in rounds:
                threads = ", ".join(f"{name} {ms}" for name, ms in result["threads_ms"].items()
                                    if ms)
                print(f"{mode:7} {result['cpu_ms']:7.3f} ms/exchange  ({threads})")
        if profiles is not None:
            print(profiles.report())
    return 0


if __name__ == "__main__":
    os.environ.pop("OTEL_SDK_DISABLED", None)
    raise SystemExit(main())
