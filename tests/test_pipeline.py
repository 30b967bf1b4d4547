"""The in-process pipeline: failures are counted, never raised; queues never block."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from typing import cast

import orjson
import pytest

from otelproxy.pipeline import Pipeline
from otelproxy.record import Exchange, Record
from tests.conftest import Collect


def exchange(n: int) -> Exchange:
    return Exchange(id=str(n), provider="anthropic", upstream_url="https://api.anthropic.com",
                    method="GET", path="/v1/models", query="", request_headers=[])


class Boom:
    name = "boom"

    def __call__(self, record: Record) -> None:
        raise ValueError("processor bug")


def test_failing_processor_is_noted_and_the_record_still_reaches_sinks():
    """A processor that raises leaves a note on the record and a count; sinks still get it."""
    sink = Collect()
    pipeline = Pipeline([Boom()], [sink])
    pipeline.start()
    for n in range(3):
        pipeline.submit(exchange(n))
    assert pipeline.flush(5)
    assert [r.exchange.id for r in sink.records] == ["0", "1", "2"]
    assert sink.records[0].notes == ["processor boom failed: ValueError"]
    assert pipeline.counters()["sink_errors"] == 3
    assert pipeline.shutdown(5)


def test_failing_sink_is_counted_and_others_continue():
    """A sink that raises on one record is counted; later records are written."""
    sink = Collect(fail_on="1")
    pipeline = Pipeline([], [sink])
    pipeline.start()
    for n in range(3):
        pipeline.submit(exchange(n))
    assert pipeline.flush(5)
    assert [r.exchange.id for r in sink.records] == ["0", "2"]
    assert pipeline.counters()["sink_errors"] == 1
    assert pipeline.shutdown(5)


def test_full_queue_drops_without_blocking_and_counts():
    """With the worker stuck and the queue full, submit returns at once and counts the drop."""
    gate = threading.Event()
    sink = Collect(gate=gate)
    pipeline = Pipeline([], [sink], maxsize=2)
    pipeline.start()
    pipeline.submit(exchange(0))
    assert sink.entered.wait(5)  # the worker is now stuck in the sink
    started = time.monotonic()
    for n in range(1, 11):
        pipeline.submit(exchange(n))
    assert time.monotonic() - started < 0.5
    assert pipeline.counters()["records_dropped"] == 8  # two fit in the queue
    gate.set()
    assert pipeline.flush(5)
    assert [r.exchange.id for r in sink.records] == ["0", "1", "2"]
    assert pipeline.shutdown(5)


def sqlite_memory_used() -> int:
    """Bytes SQLite holds now in this process (``sqlite3_memory_used``, from the library the
    ``sqlite3`` module is linked with); skips where it cannot be reached, or where that SQLite
    was built to keep no count (``SQLITE_DEFAULT_MEMSTATUS=0``: it says 0 whatever it holds)."""
    used = _memory_used()
    if isinstance(used, str):
        pytest.skip(used)
    return int(used())


@functools.cache
def _memory_used() -> Callable[[], int] | str:
    """``sqlite3_memory_used``, or why it cannot tell."""
    import _sqlite3
    import ctypes
    import sqlite3

    try:
        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    except (OSError, AttributeError):
        return "sqlite3_memory_used is not reachable here"
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        options = {row[0] for row in conn.execute("PRAGMA compile_options")}
    if "DEFAULT_MEMSTATUS=0" in options:
        return "this SQLite keeps no count of its memory (SQLITE_DEFAULT_MEMSTATUS=0)"
    used.restype = ctypes.c_int64
    return cast("Callable[[], int]", used)


def test_an_idle_pipeline_lets_sqlites_page_cache_go_and_records_on(tmp_path):
    """``release_memory`` (the idle recorder calls it before trimming the heap) frees the index
    pages SQLite cached while recording; the next batch is recorded as before."""
    from otelproxy import config
    from otelproxy.recorder_process import build_pipeline

    pipeline = build_pipeline(config.build({"log_dir": str(tmp_path)}, []), {}, export=False)
    exchanges = []
    for n in range(20):
        ex = exchange(n)
        ex.request_body = orjson.dumps({"model": "m", "messages": [
            {"role": "user", "content": f"question {n} " + "x" * 20_000}]})
        exchanges.append(ex)
    pipeline.handle_segment(list(exchanges[:10]))
    before = sqlite_memory_used()
    pipeline.release_memory()
    after = sqlite_memory_used()
    assert before - after > 100_000, (before, after)  # 100 KB: a journal of 200 KB was cached
    pipeline.handle_segment(list(exchanges[10:]))
    assert pipeline.counters()["records_written"] == 20
    assert pipeline.counters()["sink_errors"] == 0
    pipeline.close(5)
