"""The benchmark runs end to end and reports every figure (timing targets are not asserted here:
the benchmark itself checks them; a test only checks that nothing is lost or left unrecorded)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from otelproxy import bench

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick() -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "otelproxy.bench", "--quick", "--json"],
        cwd=ROOT, capture_output=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-4000:]
    result: dict[str, Any] = orjson.loads(completed.stdout)
    return result


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_run_reports_every_figure(quick: dict[str, Any]) -> None:
    """`--quick --json` prints latency, SSE, requests/s, record, memory and target figures."""
    latency = quick["latency"]
    for target in ("direct", "bare", "otelproxy"):
        assert _number(latency[target]["p50_ms"]) and _number(latency[target]["p99_ms"])
    for target in ("bare", "otelproxy"):
        assert _number(latency[target]["added_p50_ms"])
        assert _number(latency[target]["added_p99_ms"])
        assert _number(latency[target]["cpu_ms_per_request"])
    first = quick["first_event"]
    for target in ("direct", "bare", "otelproxy"):
        assert _number(first[target]["p50_ms"]) and _number(first[target]["p99_ms"])
    assert set(quick["sse"]) == {"1", "50"}
    for sse in quick["sse"].values():
        for target in ("direct", "bare", "otelproxy"):
            row = sse[target]
            for key in ("first_event_p50_ms", "gap_p50_ms", "gap_p99_ms", "gap_max_ms"):
                assert _number(row[key]), (key, row)
        for target in ("bare", "otelproxy"):
            assert _number(sse[target]["gap_p99_over_direct_ms"])
    rps = quick["rps"]
    assert rps["concurrency"] == 32
    for target in ("direct", "bare", "otelproxy"):
        assert rps[target]["requests"] > 0 and rps[target]["rps"] > 0
    assert _number(rps["ratio"]) and _number(rps["ratio_served"])
    talk = quick["rps_conversations"]
    assert talk["turns_per_conversation"] == bench.CONVERSATION_TURNS
    assert "direct" not in talk
    for target in ("bare", "otelproxy"):
        assert talk[target]["requests"] > 0 and _number(talk[target]["cpu_ms_per_request"])
    assert _number(talk["ratio"]) and _number(talk["ratio_served"])
    assert quick["memory"]["otelproxy_peak_rss_mb"] > 0
    names = [check["name"] for check in quick["targets"]]
    assert len(names) == 6 and all(isinstance(c["pass"], bool) for c in quick["targets"])
    assert quick["otlp"] is None


def test_quick_run_loses_no_event(quick: dict[str, Any]) -> None:
    """Every content_block_delta the upstream sent reached the client, through every target."""
    assert quick["events_lost"] == 0
    assert quick["events_lost_by_target"] == {"direct": 0, "bare": 0, "otelproxy": 0}
    sent = sum(sse[t]["events_sent"] for sse in quick["sse"].values() for t in bench.TARGETS)
    assert sent > 0
    assert all(sse[t]["incomplete_streams"] == 0
               for sse in quick["sse"].values() for t in bench.TARGETS)


def test_quick_run_records_every_exchange(quick: dict[str, Any]) -> None:
    """After the flush, the JSONL holds one request entry and SQLite one row per request sent."""
    assert quick["sent"] == quick["requests_sent"]["otelproxy"] > 0
    assert quick["recorded"] == quick["sent"]
    assert quick["record"]["sqlite_exchanges"] == quick["sent"]
    assert quick["record"]["records_dropped"] == 0
    assert quick["all_recorded"] is True
    # The conversation phase really continues sessions: they reach their last turn.
    assert quick["record"]["longest_session"] == bench.CONVERSATION_TURNS
    assert 0 < quick["record"]["sessions"] < quick["sent"]
    assert quick["errors"] == {"direct": 0, "bare": 0, "otelproxy": 0}


def test_delta_events_are_realistic_and_fixed_size() -> None:
    """The fake upstream's deltas are Anthropic content_block_delta events of 150 bytes."""
    for index in (0, 7, 299, 123456):
        event = bench.delta_event(index)
        assert len(event) == bench.EVENT_SIZE
        head, data = event.rstrip(b"\n").split(b"\n")
        assert head == b"event: content_block_delta"
        payload = orjson.loads(data.removeprefix(b"data: "))
        assert payload["type"] == "content_block_delta"
        assert payload["delta"]["type"] == "text_delta"
        assert payload["delta"]["text"].startswith(f"tok {index:06d}")


def test_percentile_is_nearest_rank() -> None:
    """p50/p99 are nearest-rank percentiles; no samples gives NaN."""
    values = list(range(1, 101))
    assert bench.percentile(values, 0.5) == 50
    assert bench.percentile(values, 0.99) == 99
    assert bench.percentile([3.0], 0.99) == 3.0
    assert math.isnan(bench.percentile([], 0.5))
