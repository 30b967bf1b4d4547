"""The benchmark (``benchmarks/``) runs end to end in its quick mode and reports every figure.

Timing targets are not asserted here (the benchmark checks and prints them); the tests check
that every phase produced its figures, nothing was lost or left unrecorded, a peer that is not
installed is reported as such, and the CPU pinning and process-tree accounting work.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from benchmarks import procs, run, servers, targets, traffic

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ("relay-c", "relay", "bare", "otelproxy", "otelproxy+otlp")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    no_peers = tmp_path_factory.mktemp("no-peers") / "venv"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--json", "--peers-venv",
         str(no_peers)],
        cwd=ROOT, capture_output=True, timeout=280, check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-4000:]
    result: dict[str, Any] = orjson.loads(completed.stdout)
    return result


def test_instruction_counts_of_a_small_run() -> None:
    """``benchmarks.instructions`` counts, under valgrind, bare's and otelproxy's proxy
    processes serving two exchanges and the recorder's pipeline recording twelve: each count
    grows with the exchanges, by millions an exchange, and otelproxy's proxy process runs more
    than bare's (it also times and keeps every chunk, and hands the exchange to its recorder)."""
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--exchanges", "2", "--recorded", "12",
         "--json"], cwd=ROOT, capture_output=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-4000:]
    result: dict[str, Any] = orjson.loads(completed.stdout)
    for part in ("bare", "proxy", "recorder"):
        counts = result[part]
        assert counts["some"] > counts["none"] > 100_000_000, (part, counts)  # start-up alone
        assert 1_000_000 < counts["per_exchange"] < 100_000_000, (part, counts)
    assert result["proxy_over_bare"] > 1.0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_run_reports_every_figure(quick: dict[str, Any]) -> None:
    """`--quick --json` gives CPU per exchange, latency, SSE at 1/50/500, memory and wrk figures
    for bare, otelproxy and otelproxy with OTLP export, with ratios to bare."""
    cc = quick["claude_code"]
    assert cc["conversations"] == 20
    for name in MEASURED:
        assert cc[name]["exchanges"] > 0 and _number(cc[name]["cpu_ms_per_exchange"])
        assert cc[name]["cpu_ms_per_exchange"] > 0
        assert _number(cc[name]["ratio_to_bare"])
        latency = quick["latency"][name]
        for key in ("p50_ms", "p99_ms", "over_direct_p50_ms", "over_bare_p50_ms",
                    "over_bare_p99_ms"):
            assert _number(latency[key]), (name, key)
        memory = quick["memory"][name]
        assert memory["start_mib"] > 0 and memory["idle_mib"] > 0
        assert _number(memory["per_100_streams_mib"])
        assert quick["wrk"][name]["rps"] > 0 and _number(quick["wrk"][name]["ratio_to_bare"])
    assert cc["bare"]["ratio_to_bare"] == 1.0
    split = cc["otelproxy"]["cpu_ms_per_exchange_by_process"]
    assert {"main", "recorder"} <= set(split)  # the proxy and its recorder
    assert math.isclose(sum(split.values()), cc["otelproxy"]["cpu_ms_per_exchange"], abs_tol=0.01)
    assert quick["latency"]["body_bytes"] > 90_000
    assert set(quick["sse"]) == {"1", "50", "500"}
    for level in quick["sse"].values():
        for name in ("direct", *MEASURED):
            for key in ("first_event_p50_ms", "first_event_p99_ms", "gap_p50_ms", "gap_p99_ms"):
                assert _number(level[name][key]), (name, key)
        for name in MEASURED:
            assert _number(level[name]["gap_p99_over_direct_ms"])
            assert _number(level[name]["first_event_p50_over_direct_ms"])
            for key in ("delay_p50", "delay_p99", "added_gap_p99"):
                assert _number(level[name][f"{key}_over_direct_ms"]), (name, key)
            rounds = level[name]["added_gap_p99_by_round_ms"]
            assert len(rounds) == level["repeats"] and all(_number(r) for r in rounds)
            assert set(level[name]["cpu_busy"]) >= {"cpu0"}
        assert level["otelproxy"]["sched_us_per_event"]["main"]["ran"] > 0
    names = [check["name"] for check in quick["checks"]]
    assert any("CPU per Claude Code exchange" in name for name in names)
    assert any("idle RSS" in name for name in names)
    assert quick["settings"]["quick"] is True


def test_each_proxy_tree_runs_on_cpu_1(quick: dict[str, Any]) -> None:
    """With two CPUs the run pins every process of each proxy's tree (otelproxy's recorder
    included) to CPU 1; otherwise it says why it could not pin."""
    pinning = quick["settings"]["pinning"]
    if {0, 1} <= os.sched_getaffinity(0):
        assert pinning.startswith("load generator")
        members = quick["memory"]["otelproxy"]["processes"]
        assert len(members) >= 2  # the proxy and its recorder
        assert any("otelproxy" in member["command"] for member in members)
        for name in MEASURED:
            assert all(member["cpus"] == [1] for member in quick["memory"][name]["processes"])
    else:
        assert pinning.startswith("off: ")


def test_peers_that_are_not_installed_are_reported(quick: dict[str, Any]) -> None:
    """mitmproxy and claude-tap without their virtualenv are listed as unavailable, with why,
    in the JSON and in the printed report."""
    for name in targets.PEERS:
        row = quick["targets"][name]
        assert row["status"] == "unavailable"
        assert "not installed" in row["error"] and "install-peers.sh" in row["error"]
        assert name not in quick["claude_code"]
    text = run.format_report(quick)
    assert "mitmproxy" in text and "claude-tap" in text and "unavailable" in text
    assert "CPU ms/exch" in text and "x bare" in text


def test_saved_run_prints_as_readme_tables(quick: dict[str, Any], tmp_path: Path) -> None:
    """`--from FILE --markdown` runs nothing and prints a row per measured proxy in each of the
    README's two tables (peers that were not measured have none)."""
    saved = tmp_path / "run.json"
    saved.write_bytes(orjson.dumps(quick))
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--from", str(saved), "--markdown"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    tables = completed.stdout.strip().split("\n\n")
    assert len(tables) == 2
    for table in tables:
        rows = table.splitlines()[2:]
        assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(MEASURED)
    assert completed.stderr == ""


def test_quick_run_loses_no_event(quick: dict[str, Any]) -> None:
    """Every delta the upstream sent reached the client whole, through every target."""
    for level in quick["sse"].values():
        for name in ("direct", *MEASURED):
            assert level[name]["events_sent"] > 0
            assert level[name]["events_lost"] == 0, (name, level)
            assert level[name]["incomplete_streams"] == 0
    for name in ("direct", *MEASURED):
        assert quick["targets"][name]["failures"] == 0, name
        assert quick["targets"][name]["status"] == "measured"
    assert all(cc["incomplete"] == 0 for name, cc in quick["claude_code"].items()
               if name in MEASURED)


def test_quick_run_records_and_exports_every_exchange(quick: dict[str, Any]) -> None:
    """otelproxy's record holds a row for every exchange it served, conversations continue
    their session turn after turn, and the OTLP receiver got one SERVER span per exchange."""
    for name in ("otelproxy", "otelproxy+otlp"):
        record = quick["record"][name]
        assert record["served"] > 0, record
        assert record["exchanges"] == record["submitted"] >= record["served"], record
        assert record["complete"] is True and record["dropped"] == 0
        assert record["longest_session"] >= 2  # the growing messages continue a session
        assert quick["record_bytes"][name] > 0
    assert quick["record_bytes"]["bare"] is None  # the references record nothing
    assert quick["record_bytes"]["relay"] is None
    assert quick["record_bytes"]["relay-c"] is None
    receiver = quick["otlp_receiver"]
    assert receiver["decoded"] is True
    assert receiver["server_spans"] == quick["record"]["otelproxy+otlp"]["served"]


def test_pinning_puts_the_load_generator_on_cpu_0() -> None:
    """With two CPUs or more the load generator is pinned to CPU 0 (else the run says why not),
    and a proxy started with the proxy pinning runs, with its children, on CPU 1 only."""
    probe = ("from benchmarks.procs import pin_load_generator; import os; "
             "p = pin_load_generator(); print(p.active, sorted(os.sched_getaffinity(0)), "
             "repr(p.reason))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split(maxsplit=1)
    allowed = os.sched_getaffinity(0)
    if {0, 1} <= allowed:
        assert out[0] == "True" and out[1].startswith("[0]")
        child = ("import os, subprocess, sys; print(sorted(os.sched_getaffinity(0))); "
                 "sys.stdout.flush(); subprocess.run([sys.executable, '-c', "
                 "'import os; print(sorted(os.sched_getaffinity(0)))'])")
        pinned = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                                timeout=60, check=True,
                                preexec_fn=procs.Pinning(True).for_proxy())
        assert pinned.stdout.split("\n")[:2] == ["[1]", "[1]"]
    else:
        assert out[0] == "False" and "not both available" in out[1]


def test_tree_cpu_and_memory_count_the_children(tmp_path: Path) -> None:
    """CPU time and resident memory of a process tree include a child process's."""
    marker = tmp_path / "busy-done"
    child = tmp_path / "child.py"
    child.write_text("import pathlib, sys, time\n"
                     "while time.process_time() < 0.35:\n    pass\n"
                     "pathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)\n")
    parent_script = tmp_path / "parent.py"
    parent_script.write_text("import subprocess, sys, time\n"
                             "subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])\n"
                             "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(parent_script), str(child), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
        assert marker.exists()
        members = procs.tree(parent.pid)
        assert len(members) == 2 and members[0] == parent.pid
        assert procs.tree_cpu_s(parent.pid) >= 0.3
        split = procs.tree_cpu_by_process(parent.pid)
        assert set(split) == {"main", Path(sys.executable).name} and split["main"] < 0.3
        assert split[Path(sys.executable).name] >= 0.3  # 0.35 s used; /proc counts 10 ms ticks
        assert procs.tree_rss_mib(parent.pid) > procs.tree_rss_mib(members[1])
    finally:
        for pid in reversed(procs.tree(parent.pid)):
            os.kill(pid, 9)
        parent.wait(10)


def test_claude_code_requests_grow_each_turn() -> None:
    """A conversation's requests carry a ~15 KB system prompt and ~25 KB of tools, grow every
    turn, reach about 100 KB, and replay the upstream's answer as the assistant message."""
    assert 14_000 < len(orjson.dumps(traffic.SYSTEM)) < 17_000
    assert 24_000 < len(orjson.dumps(traffic.TOOLS)) < 28_000
    sizes = [len(traffic.conversation_request("c", turn)) for turn in range(traffic.MAX_TURNS)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert 40_000 < sizes[0] < 50_000 and 85_000 < sizes[-1] < 110_000
    body = orjson.loads(traffic.conversation_request("c", 2))
    assert body["stream"] is True and len(body["messages"]) == 5
    assert body["messages"][1] == {"role": "assistant",
                                   "content": [{"type": "text", "text": traffic.ANSWER_TEXT}]}


def test_answer_is_a_150_event_anthropic_stream() -> None:
    """The fake upstream's answer is message_start .. message_stop, 150 events, its deltas of
    fixed size and their text the answer the next turn replays."""
    wire = b"".join(traffic.answer_writes())
    events = [event for event in wire.split(b"\n\n") if event]
    assert len(events) == traffic.EVENTS == 150
    names = [event.split(b"\n")[0].removeprefix(b"event: ").decode() for event in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    texts = []
    for event in events[3:-3]:
        assert len(event) + 2 == traffic.DELTA_SIZE
        data = orjson.loads(event.split(b"\n")[1].removeprefix(b"data: "))
        assert data["delta"]["type"] == "text_delta"
        texts.append(data["delta"]["text"])
    assert "".join(texts) == traffic.ANSWER_TEXT


def test_percentile_is_nearest_rank() -> None:
    """p50/p99 are nearest-rank percentiles; no samples gives NaN."""
    values = list(range(1, 101))
    assert run.percentile(values, 0.5) == 50
    assert run.percentile(values, 0.99) == 99
    assert run.percentile([3.0], 0.99) == 3.0
    assert math.isnan(run.percentile([], 0.5))


def test_collector_held_keeps_the_collector_out_of_a_round() -> None:
    """A measured round starts with the load generator's garbage collected and runs with no
    collection; the collector is back on after it, even when the round fails."""
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    collected: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    ref = weakref.ref(Cycle())  # unreachable at once, freed only by a collection
    gc.callbacks.append(count)
    try:
        with run.collector_held():
            assert ref() is None
            assert not gc.isenabled()
            before = len(collected)
            for _ in range(100_000):  # enough allocations to trigger young collections
                Cycle()
            assert len(collected) == before
        assert gc.isenabled()
        with pytest.raises(RuntimeError), run.collector_held():
            raise RuntimeError("the round failed")
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)


def test_upstream_holds_its_collector_while_asked() -> None:
    """``POST /collector?hold=1`` on the fake upstream collects its garbage and turns its
    collector off until ``?hold=0`` (``Control.measuring`` brackets each measured round so)."""

    async def scenario() -> list[bool]:
        runner = web.AppRunner(servers.FakeAnthropic().app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        seen = []
        try:
            async with aiohttp.ClientSession() as http:
                for hold in ("1", "0"):
                    async with http.post(f"http://127.0.0.1:{port}/collector",
                                         params={"hold": hold}) as answer:
                        assert answer.status == 200
                        assert (await answer.json())["enabled"] is gc.isenabled()
                        seen.append(gc.isenabled())
        finally:
            gc.enable()
            await runner.cleanup()
        return seen

    assert asyncio.run(scenario()) == [False, True]


def test_stamped_delta_carries_its_send_time() -> None:
    """A stamped delta is as long as any other, valid SSE and JSON, and gives back the
    CLOCK_MONOTONIC time it was stamped with; an unstamped one gives none."""
    now = time.monotonic_ns()
    event = traffic.stamped_delta(now)
    assert len(event) == traffic.DELTA_SIZE
    data = orjson.loads(event.split(b"\n")[1].removeprefix(b"data: "))
    assert data["delta"]["type"] == "text_delta" and data["delta"]["text"].startswith("t")
    assert traffic.sent_stamp(event) == now
    assert traffic.sent_stamp(traffic.delta_event(3)) is None


def test_phases_option_runs_only_the_named_phases(tmp_path: Path) -> None:
    """`--phases sse1` runs the idle phase and the one-stream SSE level only, against the
    targets named plus, with `--other-src`, otelproxy from another copy of the code; the report
    still prints; an unknown phase or a directory without the package is refused."""
    shutil.copytree(ROOT / "otelproxy", tmp_path / "otelproxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = tmp_path / "otelproxy" / "__init__.py"
    init.write_text(init.read_text() + '\n__version__ = "0.0.0+other"\n')
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--json", "--targets",
         "relay,otelproxy", "--phases", "sse1", "--other-src", str(tmp_path)],
        cwd=ROOT, capture_output=True, timeout=200, check=False)
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-4000:]
    result = orjson.loads(completed.stdout)
    assert list(result["sse"]) == ["1"]
    assert result["latency"] == {} and result["claude_code"] == {} and result["wrk"] == {}
    assert set(result["memory"]) == {"relay", "otelproxy", "otelproxy-other"}
    for name in ("otelproxy", "otelproxy-other"):
        assert result["sse"]["1"][name]["events_lost"] == 0
        assert result["record"][name]["complete"] is True
    assert result["health"]["otelproxy-other"]["version"] == "0.0.0+other"  # the copy ran
    assert result["health"]["otelproxy"]["version"] != "0.0.0+other"
    assert "phases run: sse1" in run.format_report(result)
    for argv, why in ((["--phases", "nope"], "unknown phase"),
                      (["--other-src", str(tmp_path / "none")], "no otelproxy package")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode == 2 and why in bad.stderr


def test_recorder_burst_records_every_exchange_and_reports_memory(capsys) -> None:
    """`benchmarks.recorder_burst` hands a real recorder process a burst, waits until every
    exchange is recorded (it fails otherwise) and reports its peak memory, time and CPU."""
    from benchmarks import recorder_burst

    assert recorder_burst.main(["--exchanges", "30", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "round 1: 30 exchanges, recorder peak +" in out and "ms per exchange" in out


def test_recorder_pace_records_every_exchange_of_each_source(capsys, tmp_path: Path) -> None:
    """`benchmarks.recorder_pace` hands a real recorder process paced Claude-Code-shaped
    exchanges (request handed over first, as the proxy does), fails unless every one is
    recorded, and reports the recorder's CPU per exchange for each `--src` in turn."""
    import shutil

    import otelproxy
    from benchmarks import recorder_pace

    other = tmp_path / "other"
    shutil.copytree(Path(otelproxy.__file__).parent, other / "otelproxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert recorder_pace.main(["--conversations", "3", "--turns", "2", "--interval-ms", "5",
                               "--stream-ms", "20", "--rounds", "1", "--src", str(other),
                               "--src", "."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"round 1 {other}", f"round 1 {Path('.').resolve()}"]
    for line in lines:
        assert float(line.split("recorder CPU ")[1].split()[0]) > 0
