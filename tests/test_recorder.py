"""The recorder process: never blocks the proxy, counts what it drops, outlives nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import anthropic
import httpx2
import orjson
import pytest

from otelproxy import config as config_module
from otelproxy import proxy as proxy_module
from otelproxy import recorder as recorder_module
from otelproxy import recorder_process as recorder_process_module
from otelproxy.channel import (
    Begun,
    Exchanges,
    Flush,
    Message,
    Progress,
    RecorderEnd,
    Stop,
    frame,
    unframe,
)
from otelproxy.errors import ConfigError
from otelproxy.pipeline import Pipeline
from otelproxy.record import Chunks, Exchange
from otelproxy.recorder import PipeWriter, Recorder, RecorderProcess
from tests.conftest import RunningProxy, remount, wait_for
from tests.fake_upstream import Reply
from tests.proxy_process import REPO, ProxyProcess, child_env, run_cli
from tests.test_pipeline import sqlite_memory_used
from tests.test_store import assert_record_agrees

T = TypeVar("T")

def make_config(log_dir: Path, **values: object):
    return config_module.build({"log_dir": str(log_dir), **values},
                               list(config_module.DEFAULT_UPSTREAMS))


def exchange(n: int) -> Exchange:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": f"hi {n}"}]})
    ex = Exchange(id=uuid.uuid4().hex, provider="anthropic", upstream_url="https://api.anthropic.com",
                  method="POST", path="/v1/messages", query="",
                  request_headers=[("content-type", "application/json")], request_body=body)
    now = time.monotonic_ns()
    ex.status, ex.headers_ns, ex.finished_ns = 200, now, now
    ex.response_headers = [("content-type", "application/json")]
    ex.chunks = Chunks.of([(now, b'{"type":"message","role":"assistant","content":[]}')])
    return ex


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def until(condition: Callable[[], bool], within: float, what: str) -> None:
    """On the event loop: wait for ``condition`` without blocking the loop."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {within} s"
        await asyncio.sleep(0.01)


def test_records_in_another_process_and_flushes(tmp_path):
    """Submitted exchanges are written by the recorder process; drain waits for them; stop
    flushes and ends the process."""
    async def scenario() -> RecorderProcess:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:
            assert recorder.process.pid not in (None, os.getpid())
            for n in range(20):
                recorder.submit(exchange(n))
            assert await recorder.drain(10)
            assert recorder.counters()["records_written"] == 20
            assert recorder.pending == 0
            files = list((tmp_path / "logs" / "anthropic").glob("*.jsonl"))
            assert len(files) == 20
        finally:
            assert await recorder.stop(10)
        return recorder.process

    process = asyncio.run(scenario())
    assert process.popen is not None and process.popen.returncode == 0
    assert process.results == -1 and process.inbox.broken  # every pipe end closed


def test_the_proxy_side_runs_on_the_event_loop_without_a_thread(tmp_path):
    """Starting the recorder, submitting, draining and reading its counters start no thread
    in the proxy: everything the channel does runs on the event loop."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:
            for n in range(5):
                recorder.submit(exchange(n))
            assert await recorder.drain(10)
            assert recorder.counters()["records_written"] == 5
            assert [t.name for t in threading.enumerate()] == [threading.current_thread().name]
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def test_flush_waits_from_another_thread_and_refuses_on_the_loop_itself(tmp_path):
    """``flush`` (for threads) runs ``drain`` on the recorder's loop and waits for it; called on
    that loop it raises at once instead of waiting for itself."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:
            recorder.submit(exchange(0))
            assert await asyncio.to_thread(recorder.flush, 10)
            assert recorder.counters()["records_written"] == 1
            with pytest.raises(RuntimeError, match="await drain"):
                recorder.flush(10)
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def test_a_start_message_larger_than_the_pipe_reaches_the_recorder(tmp_path):
    """A Recorder made outside any event loop, whose configuration message (the environment
    passed on) is larger than the pipe holds, starts and records: the loop writes the rest of
    the message once the recorder reads."""
    recorder = Recorder(make_config(tmp_path / "logs"), env={"BIG": "e" * 3 * 1024 * 1024})
    assert recorder.process.inbox.buffered > 0

    async def scenario() -> None:
        await recorder.start()
        try:
            recorder.submit(exchange(0))
            assert await recorder.drain(30)
            assert recorder.counters()["records_written"] == 1
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def untracked(n: int, response_bytes: int) -> Exchange:
    """A call that is no conversation turn (``GET /v1/models``): recorded in the day's
    ``untracked`` file, in the order the recorder records it."""
    ex = exchange(n)
    ex.method, ex.path, ex.request_body = "GET", "/v1/models", b""
    ex.chunks = Chunks.of([(ex.finished_ns or 0, b'{"data":"' + b"m" * response_bytes + b'"}')])
    return ex


def assert_recorded_in_order(log_dir: Path, submitted: list[str]) -> None:
    """The day's untracked file holds the request and response entries of ``submitted``, in
    that order."""
    [day_file] = (log_dir / "anthropic").glob("untracked-*.jsonl")
    entries = [orjson.loads(line) for line in day_file.read_bytes().splitlines()]
    assert [e["exchange_id"] for e in entries if e["type"] == "request"] == submitted
    assert [e["exchange_id"] for e in entries if e["type"] == "response"] == submitted


async def record_all(recorder: Recorder, count: int) -> None:
    """Start ``recorder`` (if need be), wait until it has recorded ``count`` exchanges, stop it."""
    if not recorder.process.running:
        await recorder.start()
    try:
        assert await recorder.drain(60)
        assert recorder.counters()["records_written"] == count
    finally:
        assert await recorder.stop(10)


@pytest.mark.parametrize(("count", "response_bytes"), [(600, 10), (40, 100_000)])
def test_many_exchanges_at_once_are_all_recorded_in_order(tmp_path, count, response_bytes):
    """Exchanges handed over together (one message) are recorded in several transactions when
    they are more than one batch holds (by count, or by bytes of bodies): every one of them,
    in the order they were submitted."""
    async def scenario() -> list[str]:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        submitted = [untracked(n, response_bytes) for n in range(count)]
        for ex in submitted:  # one loop iteration: one Exchanges message
            recorder.submit(ex)
        await record_all(recorder, count)
        return [ex.id for ex in submitted]

    assert_recorded_in_order(tmp_path / "logs", asyncio.run(scenario()))


def test_exchanges_finished_within_the_outbox_delay_go_in_one_message(tmp_path):
    """The recorder is woken once per message: exchanges finished within ``OUTBOX_DELAY`` of
    the first go together; an outbox holding ``_FRAME_BYTES`` goes on the loop's next turn."""
    async def scenario() -> list[str]:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        sent: list[list[str]] = []
        send = recorder._send

        def counted(batch: list[Exchange | Begun]) -> None:
            sent.append([item.id for item in batch if isinstance(item, Exchange)])
            send(batch)

        recorder._send = counted  # type: ignore[method-assign]
        small = [untracked(n, 1000) for n in range(3)]
        began = time.monotonic()
        for ex in small:
            recorder.submit(ex)
            await asyncio.sleep(0)  # separate loop iterations
        grouped = time.monotonic() - began < recorder_module.OUTBOX_DELAY
        if grouped:  # (a machine that took 50 ms for three loop turns split the group)
            assert sent == []  # waiting for more
        await until(lambda: bool(sent), 5, "the outbox was never sent")
        if grouped:
            assert sent == [[ex.id for ex in small]]
        large = [untracked(10 + n, 150_000) for n in range(2)]  # 300 KB: past _FRAME_BYTES
        began = time.monotonic()
        for ex in large:
            recorder.submit(ex)
        await asyncio.sleep(0)
        if time.monotonic() - began < recorder_module.OUTBOX_DELAY:
            assert len(sent) > 1  # did not wait
        await record_all(recorder, 5)
        assert [id_ for ids in sent for id_ in ids] == [ex.id for ex in small + large]
        return [ex.id for ex in small + large]

    assert_recorded_in_order(tmp_path / "logs", asyncio.run(scenario()))


def test_exchanges_lost_at_stop_are_counted_once(tmp_path, monkeypatch):
    """Stopped while its recorder is down (being replaced), the proxy counts the exchanges
    waiting in its outbox as dropped once: the outbox's timer, still pending, must not send
    them into the closed pipe to be counted again. And one submitted after ``Stop`` went out
    is counted too, and makes ``stop`` say not everything was recorded."""
    exit_status = recorder_module._exit_status

    async def lingering(process: RecorderProcess) -> int | None:  # a recorder slow to exit
        await asyncio.sleep(1)
        return await exit_status(process)

    monkeypatch.setattr(recorder_module, "_exit_status", lingering)

    async def down() -> None:
        recorder = Recorder(make_config(tmp_path / "down"), env={})
        await recorder.start()
        os.kill(recorder.process.pid or 0, signal.SIGKILL)
        await until(lambda: recorder._replacing is not None, 10, "the death was not noticed")
        recorder.submit(exchange(1))
        assert not await recorder.stop(5)
        await asyncio.sleep(recorder_module.OUTBOX_DELAY + 0.1)  # past the outbox's timer
        assert (recorder.submitted, recorder.dropped) == (1, 1)
        assert recorder.counters()["records_dropped"] == 1

    async def late() -> None:
        recorder = Recorder(make_config(tmp_path / "late"), env={})
        await recorder.start()
        recorder.submit(exchange(2))
        stopping = asyncio.create_task(recorder.stop(10))
        await until(lambda: recorder._stopped is not None, 10, "Stop was not sent")
        recorder.submit(exchange(3))  # a handler cut late, after Stop
        assert not await stopping
        await asyncio.sleep(recorder_module.OUTBOX_DELAY + 0.1)
        assert (recorder.submitted, recorder.dropped) == (2, 1)
        assert recorder.counters()["records_written"] == 1

    asyncio.run(down())
    asyncio.run(late())


def test_a_backlog_waits_unframed_while_the_pipe_is_full(tmp_path):
    """While the recorder does not read, exchanges past what the pipe holds wait in the proxy
    as they are: at most one message's framed bytes wait beside the pipe (the backlog is not
    held twice), and every exchange is recorded, in order, once the recorder reads."""
    async def scenario() -> list[str]:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        submitted = [untracked(n, 100_000) for n in range(40)]  # 4 MB; a pipe holds 1 MiB
        for ex in submitted:
            recorder.submit(ex)
            await asyncio.sleep(0)  # the outbox goes once it holds _FRAME_BYTES
        assert 0 < recorder.process.inbox.buffered <= recorder_module._FRAME_BYTES
        assert recorder.without_bodies == 0 and recorder.dropped == 0
        await record_all(recorder, len(submitted))
        return [ex.id for ex in submitted]

    assert_recorded_in_order(tmp_path / "logs", asyncio.run(scenario()))


def test_recorder_runs_at_a_lower_cpu_priority_than_the_proxy(tmp_path):
    """Under CPU contention the proxy's event loop runs first (the recorder is SCHED_IDLE: it
    runs only when its CPU has nothing else to run); the record catches up."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:  # it lowers itself right after Ready: starting up is not held back
            await until(lambda: os.sched_getscheduler(recorder.process.pid or 0)
                        == os.SCHED_IDLE, 10, "the recorder is not SCHED_IDLE")
            assert os.sched_getscheduler(0) != os.SCHED_IDLE
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def test_every_thread_of_an_exporting_recorder_runs_at_the_lower_priority(tmp_path):
    """The OTLP sink's export threads start with the pipeline, before the recorder lowers its
    priority: they are lowered too (a scheduling policy is a thread's own on Linux), so that
    sending the export's batches waits for CPU time the proxy leaves, as the rest of the
    record does."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs", seq_url="http://127.0.0.1:9",
                                        seq_api_key="k"), env={})
        await recorder.start()
        try:
            pid = recorder.process.pid or 0

            def policies() -> dict[int, int]:
                out = {}
                for name in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                        out[int(name)] = os.sched_getscheduler(int(name))
                return out

            await until(lambda: os.sched_getscheduler(pid) == os.SCHED_IDLE, 10,
                        "the recorder is not SCHED_IDLE")
            await until(lambda: set(policies().values()) == {os.SCHED_IDLE}, 5,
                        "a thread of the recorder is not SCHED_IDLE")
            assert len(policies()) >= 3  # its own, and the span and log record exporters'
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    """With the queue full, submit returns at once and the drop is counted."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs", record_queue_size=1), env={})
        started = time.monotonic()
        for n in range(5):  # not started: nothing drains the queue
            recorder.submit(exchange(n))
        assert time.monotonic() - started < 1.0
        assert recorder.dropped == 4
        assert recorder.counters()["records_dropped"] == 4
        assert recorder.record_error() == "the recorder process is not running"
        assert not await recorder.stop(1)  # nothing was recorded

    asyncio.run(scenario())


def test_dead_recorder_is_replaced_and_reported(tmp_path):
    """A killed recorder is replaced: later exchanges are recorded; /healthz counts the error
    and the exchanges that were lost with it."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:
            recorder.submit(exchange(0))
            assert await recorder.drain(10)
            first = recorder.process
            assert first.popen is not None
            first.popen.kill()
            await until(lambda: recorder.process is not first and recorder.process.running, 30,
                        "no new recorder process")
            assert first.results == -1 and first.inbox.broken
            for n in range(1, 4):
                recorder.submit(exchange(n))
            assert await recorder.drain(30)
            counters = recorder.counters()
            assert counters["recorder_restarts"] == 1 and counters["sink_errors"] >= 1
            assert counters["records_written"] == 4 and counters["records_dropped"] == 0
            assert recorder.pending == 0
            assert len(list((tmp_path / "logs" / "anthropic").glob("*.jsonl"))) == 4
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def test_a_logging_py_in_the_working_directory_does_not_run_in_the_recorder(tmp_path,
                                                                           monkeypatch):
    """The recorder does not put the working directory on its import path: a ``logging.py``
    (a module it imports first thing) where otelproxy was started neither runs (in the process
    that sees unredacted exchanges) nor stops the record."""
    work = tmp_path / "project"
    work.mkdir()
    marker = tmp_path / "ran"
    (work / "logging.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(7)\n")
    monkeypatch.chdir(work)

    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:
            recorder.submit(exchange(0))
            assert await recorder.drain(10)
            assert recorder.counters()["records_written"] == 1
            assert recorder.counters()["recorder_restarts"] == 0
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())
    assert not marker.exists()


def test_stop_while_a_restart_waits_records_what_waits_in_its_pipe(tmp_path, monkeypatch):
    """Stopping while a dead recorder's successor waits out its restart delay starts it at
    once, so the exchanges waiting in its pipe are recorded, not silently discarded."""
    monkeypatch.setattr(recorder_module, "RESTART_FIRST", 20.0)

    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        first = recorder.process
        assert first.popen is not None
        first.popen.kill()  # the first exit: restarted at once
        await until(lambda: recorder.process is not first and recorder.process.running, 30,
                    "no restart")
        second = recorder.process
        assert second.popen is not None
        second.popen.kill()  # again soon after: the next one waits RESTART_FIRST
        await until(lambda: "restarting it in 20 s" in (recorder.record_error() or ""), 30,
                    "no restart wait")
        assert recorder.process.child_ends and not recorder.process.running
        for n in range(3):
            recorder.submit(exchange(n))
        assert await recorder.stop(20)
        assert recorder.counters()["records_dropped"] == 0

    asyncio.run(scenario())
    assert len(list((tmp_path / "logs" / "anthropic").glob("*.jsonl"))) == 3


def test_a_recorder_that_makes_no_progress_is_killed_and_its_backlog_counted(tmp_path, caplog):
    """A recorder that records nothing by the stop deadline (stopped here with SIGSTOP) is
    killed, stop answers False, and what it had not recorded is counted as dropped and said."""
    caplog.set_level(logging.ERROR, logger="otelproxy.recorder")

    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        pid = recorder.process.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        for n in range(5):
            recorder.submit(exchange(n))
        assert not await recorder.stop(1.0)
        assert recorder.counters()["records_dropped"] == 5
        assert recorder.process.popen is not None
        assert recorder.process.popen.returncode == -signal.SIGKILL

    asyncio.run(scenario())
    assert any("stopped with 5 exchange(s) unrecorded" in r.getMessage() for r in caplog.records)


def test_a_drain_waiting_on_a_recorder_that_dies_answers_false_at_once(tmp_path):
    """A drain waiting for a recorder that dies is answered False when it dies, not after its
    whole timeout."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={})
        await recorder.start()
        try:
            dying = recorder.process
            assert dying.popen is not None
            os.kill(dying.popen.pid, signal.SIGSTOP)
            recorder.submit(exchange(0))
            async with asyncio.TaskGroup() as group:
                waiting = group.create_task(recorder.drain(600))
                await asyncio.sleep(0.2)
                assert not waiting.done()
                dying.popen.kill()
                assert await asyncio.wait_for(waiting, 30) is False
        finally:
            await recorder.stop(10)

    asyncio.run(scenario())


def test_recorder_exits_when_the_proxy_process_dies(tmp_path):
    """A recorder whose proxy process vanished flushes and exits on its own."""
    script = textwrap.dedent(f"""
        import asyncio, os
        from otelproxy import config
        from otelproxy.recorder import Recorder

        async def main():
            cfg = config.build({{"log_dir": {str(tmp_path / "logs")!r}}},
                               list(config.DEFAULT_UPSTREAMS))
            recorder = Recorder(cfg, env={{}})
            await recorder.start()
            print(recorder.process.pid, flush=True)
            os._exit(0)

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)


def test_an_invalid_otel_setting_is_a_config_error_before_anything_starts(tmp_path):
    """The proxy checks the OTLP settings when it makes its Recorder (``otlp.settings``, light
    to import): an invalid one raises ConfigError with its one-line reason."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(ConfigError, match="grpc") as raised:
        Recorder(make_config(tmp_path / "logs"), env=env)
    assert "\n" not in str(raised.value)


def test_the_cli_exits_2_with_one_line_on_an_invalid_otel_setting(tmp_path):
    """``otelproxy`` with OTEL_EXPORTER_OTLP_PROTOCOL=grpc: one line on stderr, exit 2, no
    traceback, and no process left behind."""
    result = run_cli(["--log-dir", str(tmp_path / "logs"), "--port", "0"], env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otelproxy: error: "), result.stderr
    assert "grpc" in lines[0] and "Traceback" not in result.stderr


def _recorder_of(running: ProxyProcess) -> int:
    """The pid of a running otelproxy's one child process."""
    task = Path(f"/proc/{running.process.pid}/task")
    children = [int(pid) for thread in task.iterdir()
                for pid in (thread / "children").read_text().split()]
    assert len(children) == 1, children
    return children[0]


@pytest.mark.parametrize("export", [False, True], ids=["local", "export"])
def test_the_proxy_tree_is_the_proxy_and_one_recorder_process(tmp_path, export):
    """The running proxy has exactly one child, the recorder (no multiprocessing resource
    tracker beside it); the recorder maps OpenSSL's TLS library (which the exporter's HTTP
    client loads) only when OTLP export is configured, and without export not even libcrypto
    (its SHA-256 is the interpreter's own: 3.5 MiB less resident)."""
    args = ["--log-dir", str(tmp_path / "logs")]
    if export:
        args += ["--seq-url", "http://127.0.0.1:9"]
    with ProxyProcess(args) as running:
        recorder = _recorder_of(running)
        command = Path(f"/proc/{recorder}/cmdline").read_bytes().split(b"\0")
        assert command[1:4] == [b"-P", b"-m", b"otelproxy.recorder_process"]
        # listening means the recorder has built its pipeline (the proxy waits for Ready)
        maps = Path(f"/proc/{recorder}/maps").read_text()
        assert ("libssl" in maps) is export
        assert ("libcrypto" in maps) is export
        assert "libssl" in Path(f"/proc/{running.process.pid}/maps").read_text()


def _imported(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Top-level packages, otelproxy's and OpenTelemetry's modules a fresh interpreter has
    after ``code``."""
    script = code + textwrap.dedent("""
        import sys
        print(" ".join(sorted(name for name in sys.modules if "." not in name
                              or name.startswith(("otelproxy.", "opentelemetry.")))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=child_env(env))
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


RECORD_ONLY = {"sqlite3", "otelproxy.store", "otelproxy.sessions", "otelproxy.processors",
               "otelproxy.retention", "otelproxy.recorder_process"}
EXPORT_ONLY = {"opentelemetry.sdk", "otelproxy.otlp.export", "otelproxy.otlp.transport"}
PROXY_ONLY = {"asyncio", "aiohttp", "ssl", "multiprocessing"}


def test_the_proxy_process_imports_none_of_the_records_modules(tmp_path):
    """The proxy process (CLI, server, handler, its Recorder, export configured) loads neither
    SQLite, the store, sessions and processors nor the OTLP exporter: they live in the recorder
    process. Nor orjson (0.3 MiB resident): its error bodies are written with ``json``."""
    loaded = _imported(textwrap.dedent(f"""
        import otelproxy.cli, otelproxy.server
        from otelproxy import config, recorder
        cfg = config.build({{"log_dir": {str(tmp_path / "logs")!r},
                             "seq_url": "http://127.0.0.1:9"}}, list(config.DEFAULT_UPSTREAMS))
        recorder.Recorder(cfg, env={{}})
    """))
    assert {"aiohttp", "otelproxy.otlp.settings"} <= loaded
    assert not loaded & (RECORD_ONLY | EXPORT_ONLY | {"multiprocessing", "orjson"})


def test_the_recorder_imports_the_exporter_only_when_export_is_configured(tmp_path):
    """The recorder process loads neither asyncio nor aiohttp; told that export is off it does
    not import the OTLP package at all, and OpenTelemetry's SDK and the exporter (on
    http.client, never requests) load only when export is configured."""
    build = textwrap.dedent(f"""
        from otelproxy import config, recorder_process
        cfg = config.build({{"log_dir": {str(tmp_path / "logs")!r}, **SEQ}},
                           list(config.DEFAULT_UPSTREAMS))
        recorder_process.build_pipeline(cfg, {{}}, export=bool(SEQ))
    """)
    local = _imported("SEQ = {}\n" + build)
    assert {"sqlite3", "otelproxy.store", "otelproxy.processors"} <= local
    assert not local & (EXPORT_ONLY | PROXY_ONLY | {"otelproxy.otlp", "opentelemetry"})
    exporting = _imported("SEQ = {'seq_url': 'http://127.0.0.1:9'}\n" + build)
    assert exporting >= EXPORT_ONLY | {"http"}
    assert not exporting & {"aiohttp", "multiprocessing", "requests", "urllib3"}


@contextlib.contextmanager
def recorder_loop(tmp_path: Path) -> Iterator[tuple[Pipeline, threading.Thread, int, int]]:
    """The recorder's loop (``recorder_process._record``) on a thread of this process, over two
    pipes: yields its pipeline, the thread, the inbox's write end and the results' read end
    (not blocking). Closed on the way out, the inbox ends the loop."""
    inbox, inbox_w = os.pipe()
    results_r, results = os.pipe()
    os.set_blocking(results_r, False)
    pipeline = recorder_process_module.build_pipeline(make_config(tmp_path / "logs"), {},
                                                      export=False)
    loop = threading.Thread(target=recorder_process_module._record,
                            args=(pipeline, RecorderEnd(inbox, results), []))
    loop.start()  # in this process: SQLite's memory is the recorder's
    try:
        yield pipeline, loop, inbox_w, results_r
    finally:
        os.close(inbox_w)
        loop.join(15)
        os.close(inbox)
        os.close(results_r)


def send_to(inbox_w: int, message: Message) -> None:
    data = frame(message)
    while data:
        data = data[os.write(inbox_w, data):]


def test_an_idle_recorder_lets_sqlites_page_cache_go(tmp_path):
    """Once idle after recording, the recorder's loop frees the index pages SQLite cached
    (``Pipeline.release_memory``) along with the heap, and then records on."""

    def drained_until(condition: Callable[[], bool], within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                os.read(results_r, 1 << 16)
            if condition():
                return True
            time.sleep(0.02)
        return False

    big = []
    for _ in range(10):
        ex = exchange(0)
        ex.request_body = orjson.dumps({"model": "m", "messages": [
            {"role": "user", "content": uuid.uuid4().hex + "x" * 20_000}]})
        big.append(ex)
    with recorder_loop(tmp_path) as (pipeline, loop, inbox_w, results_r):
        cached = sqlite_memory_used()
        send_to(inbox_w, Exchanges(big))
        assert drained_until(lambda: sqlite_memory_used() > cached + 100_000, 10), \
            "the batch did not go through SQLite's cache"
        assert drained_until(lambda: sqlite_memory_used() < cached + 50_000,
                             recorder_process_module.TRIM_INTERVAL + 5), sqlite_memory_used()
        send_to(inbox_w, Exchanges([exchange(1)]))
        send_to(inbox_w, Stop(time.monotonic() + 10))
        assert drained_until(lambda: not loop.is_alive(), 15)
    assert pipeline.counters()["records_written"] == 11


def test_an_idle_recorder_reports_only_what_changed(tmp_path):
    """After a recorded batch (reported at once), an idle recorder does not send the same
    ``Progress`` every ``IDLE_WAIT`` (it woke the idle proxy four times a second to read it);
    a change while idle (a sink error) is reported within ``IDLE_WAIT``."""
    received = bytearray()
    progress: list[Progress] = []

    def read_results(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                received.extend(os.read(results_r, 1 << 16))
            progress.extend(m for m in unframe(received) if isinstance(m, Progress))
            time.sleep(0.02)

    with recorder_loop(tmp_path) as (pipeline, loop, inbox_w, results_r):
        send_to(inbox_w, Exchanges([exchange(0)]))
        send_to(inbox_w, Flush(1, False, 10.0))  # recorded at once, not after LINGER
        read_results(1.0)
        assert progress and progress[-1].processed == 1
        assert progress[-1].counters["records_written"] == 1
        idle_since = len(progress)
        read_results(4 * recorder_process_module.IDLE_WAIT + 0.5)
        assert len(progress) == idle_since, progress[idle_since:]
        pipeline.failures.record("test", RuntimeError("a sink failed while idle"))
        read_results(2 * recorder_process_module.IDLE_WAIT + 0.5)
        assert len(progress) == idle_since + 1
        assert progress[-1].counters["sink_errors"] == 1
        send_to(inbox_w, Stop(time.monotonic() + 10))
        read_results(0.5)
        loop.join(15)
        assert not loop.is_alive()


def test_the_recorder_records_without_importing_typing_pickle_py_or_ctypes(tmp_path):
    """The recorder's modules import ``typing`` only for the type checker (``TYPE_CHECKING``),
    the channel unpickles with ``_pickle``, which ``pickle.loads`` is, without ``pickle.py``
    and its pure-Python pickler, and the heap is trimmed through ``_ctypes`` alone: loaded,
    they took the recorder's resident set up by half a MiB, 0.2 and 0.1 MiB. Nothing on the
    way to a recorded exchange and a trimmed heap imports them either."""
    loaded = _imported(textwrap.dedent(f"""
        import logging, time
        from otelproxy import config, recorder_process
        from otelproxy.channel import Exchanges, frame, unframe
        from otelproxy.record import Chunks, Exchange
        from otelproxy.redact import redact_logging
        logging.basicConfig(level="INFO")
        redact_logging()
        cfg = config.build({{"log_dir": {str(tmp_path / "logs")!r}}},
                           list(config.DEFAULT_UPSTREAMS))
        pipeline = recorder_process.build_pipeline(cfg, {{}}, export=False)
        ex = Exchange(id="x", provider="anthropic", upstream_url="https://api.anthropic.com",
                      method="POST", path="/v1/messages", query="",
                      request_headers=[("content-type", "application/json")],
                      request_body=b'{{"model": "m", "messages": [{{"role": "user", '
                                   b'"content": "hi"}}]}}')
        ex.status, ex.finished_ns = 200, time.monotonic_ns()
        ex.response_headers = [("content-type", "text/event-stream")]
        ex.chunks = Chunks.of([(time.monotonic_ns(), b'event: message_start\\ndata: {{}}\\n\\n')])
        [message] = unframe(bytearray(frame(Exchanges([ex]))))  # as the pipe delivers it
        pipeline.handle_segment(message.items)
        assert pipeline.counters()["records_written"] == 1, pipeline.counters()
        pipeline.release_memory()
        assert recorder_process.release_free_heap()
    """))
    assert "otelproxy.store" in loaded
    assert not loaded & {"typing", "pickle", "ctypes"}


def test_frames_split_anywhere_are_reassembled_in_order():
    """The pipe delivers bytes, not messages: frames cut at any byte come out whole, in order."""
    messages = [Progress(n, {"x" * n: n}, None, {"export_status": "off"}) for n in range(50)]
    stream = b"".join(frame(message) for message in messages)
    buffer = bytearray()
    out = []
    for cut in range(0, len(stream), 7):
        buffer += stream[cut:cut + 7]
        out.extend(unframe(buffer))
    assert out == messages
    assert buffer == bytearray()


def test_pipe_writer_buffers_when_the_pipe_is_full_and_the_loop_drains_it():
    """With the recorder not reading, sends never block; once it reads, the event loop writes
    the buffered rest (add_writer) and every frame arrives, in order."""
    receive, feed = os.pipe()
    writer = PipeWriter(feed, limit=256 * 1024 * 1024)
    payload = b"y" * 100_000
    count = 60  # ~6 MB: far more than any pipe buffer

    async def produce() -> float:
        started = time.monotonic()
        for n in range(count):
            assert writer.send(Flush(n, True, 1.0)) and writer.send(Exchanges([payload]))  # type: ignore[list-item]
        elapsed = time.monotonic() - started
        assert writer.buffered > 0  # the pipe is full: the rest waits in the buffer
        received: list[object] = []
        loop = asyncio.get_running_loop()
        all_received = asyncio.Event()

        def consume() -> None:  # the recorder's side, on a thread of the test
            buffer = bytearray()
            while len(received) < 2 * count:
                buffer += os.read(receive, 1 << 20)
                received.extend(unframe(buffer))
            loop.call_soon_threadsafe(all_received.set)

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        # Meanwhile only the loop's writer callback can move the buffered rest into the pipe.
        await asyncio.wait_for(all_received.wait(), 20)
        assert [m.token for m in received[::2]] == list(range(count))  # type: ignore[attr-defined]
        assert all(m.items == [payload] for m in received[1::2])  # type: ignore[attr-defined]
        assert writer.buffered == 0
        writer.close()
        return elapsed

    elapsed = asyncio.run(produce())
    assert elapsed < 2.0  # 120 sends into a full pipe returned without waiting for a reader
    os.close(receive)


def test_pipe_writer_refuses_beyond_its_limit_and_after_the_reader_is_gone():
    """A full buffer refuses a frame (a reserve lets a small one through); once the reader is
    gone the writer is broken, gives its buffer up and refuses everything."""
    receive, feed = os.pipe()
    writer = PipeWriter(feed, limit=300_000)

    async def scenario() -> None:
        sent = 0
        while writer.send(Exchanges([b"z" * 100_000])):  # type: ignore[list-item]
            sent += 1
            assert sent < 1000
        assert writer.buffered <= 300_000
        assert writer.send(Flush(1, True, 1.0), reserve=1000)
        os.close(receive)
        await until(lambda: writer.broken, 5, "EPIPE not seen")  # the loop's writer callback
        assert writer.buffered == 0 and not writer.send(Flush(2, True, 1.0), reserve=1000)
        writer.close()

    asyncio.run(scenario())


def on_loop(proxy: RunningProxy, read: Callable[[], T]) -> T:
    """``read()`` run on the proxy's event loop, where the recorder's state lives."""
    async def call() -> T:
        return read()

    return proxy.loop.run(call())


def kill_recorder(proxy: RunningProxy) -> tuple[RecorderProcess, float]:
    """SIGKILL the proxy's recorder process; it and when it was killed."""
    dying = on_loop(proxy, lambda: proxy.server.pipeline.process)  # type: ignore[union-attr]
    assert dying.popen is not None
    dying.popen.kill()
    return dying, time.monotonic()


def wait_replaced(proxy: RunningProxy, dying: RecorderProcess) -> RecorderProcess:
    recorder = proxy.server.pipeline
    assert isinstance(recorder, Recorder)

    def replaced() -> RecorderProcess | None:
        process = recorder.process
        return process if process is not dying and process.running else None

    wait_for(lambda: on_loop(proxy, replaced) is not None, 60, "no new recorder process")
    new = on_loop(proxy, replaced)
    assert new is not None
    return new


def test_a_recorder_that_keeps_dying_is_restarted_with_growing_waits_said_once(
    proxy, fake, caplog
):
    """A recorder killed again and again is restarted at once, then after 0.5, 1 and 2 s; the
    first exit is logged, the rest only counted. Meanwhile /healthz answers 503 "failing" with
    the reason, exchanges wait in the pipe and are recorded by the next recorder."""
    caplog.set_level(logging.ERROR, logger="otelproxy.recorder")
    recorder = proxy.server.pipeline
    assert isinstance(recorder, Recorder)
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    waited = []
    for expected in (0.0, 0.5, 1.0, 2.0):
        dying, killed = kill_recorder(proxy)
        if expected:
            wait_for(lambda: on_loop(proxy, recorder.record_error) is not None, 10,
                     "no record_error")
            answer = httpx2.get(proxy.url + "/healthz")
            assert answer.status_code == 503 and answer.json()["status"] == "failing"
            assert "killed by SIGKILL" in answer.json()["record_error"]
            assert f"restarting it in {expected:g} s" in answer.json()["record_error"]
            client.messages.create(model="m", max_tokens=5, messages=[
                {"role": "user", "content": f"during wait {expected}"}])
        waited.append(wait_replaced(proxy, dying).started_at - killed)
        assert recorder.flush(30)
    assert [w >= e for w, e in zip(waited, (0.0, 0.5, 1.0, 2.0), strict=True)] == [True] * 4
    answer = httpx2.get(proxy.url + "/healthz")
    assert answer.status_code == 200 and answer.json()["recorder_restarts"] == 4
    bodies = [e["body"] for e in proxy.entries() if e["type"] == "request"]
    assert sorted(orjson.loads(b)["messages"][0]["content"] for b in bodies) == [
        "during wait 0.5", "during wait 1.0", "during wait 2.0"]
    exits = [r for r in caplog.records if "recorder process exited" in r.getMessage()]
    assert len(exits) == 1


def test_a_recorder_killed_with_a_backlog_leaves_jsonl_and_db_agreeing(proxy, fake):
    """Killing the recorder while it works through a backlog leaves every JSONL line whole and
    JSONL and the index holding the same exchanges; every exchange is counted, as written or
    as dropped, and the record holds all that were counted written. A recorder killed between
    a batch's commit and its report leaves that one batch counted as dropped though the next
    recorder writes it from the journal: the record may hold up to one batch more."""
    recorder = proxy.server.pipeline
    assert isinstance(recorder, Recorder)
    dying = on_loop(proxy, lambda: recorder.process)
    assert dying.pid is not None
    os.kill(dying.pid, signal.SIGSTOP)  # a backlog builds up in the pipe
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    for n in range(60):
        client.messages.create(model="m", max_tokens=5, messages=[
            {"role": "user", "content": f"turn {n} " + "w" * 20_000}])
    os.kill(dying.pid, signal.SIGCONT)
    wait_for(lambda: on_loop(proxy, recorder.counters).get("records_written", 0) > 0, 30,
             "nothing recorded")
    kill_recorder(proxy)
    wait_replaced(proxy, dying)
    proxy.flush()
    requests = assert_record_agrees(proxy.log_dir)
    counters = on_loop(proxy, recorder.counters)
    assert counters["records_written"] + counters["records_dropped"] == 60
    one_batch = recorder_process_module._MAX_BATCH_BYTES // 20_000 + 1
    assert counters["records_written"] <= len(requests) <= counters["records_written"] + \
        one_batch, (len(requests), counters)


def test_a_journal_left_by_a_crash_is_written_by_the_next_recorder(proxy, fake):
    """A batch committed to the index but not yet in its JSONL file when the recorder died is
    written by the next recorder when it opens the record: nothing committed is lost."""
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    now = time.time()
    obstacles = {proxy.log_dir / "anthropic" / time.strftime("untracked-%Y%m%d.jsonl",
                                                              time.gmtime(t))
                 for t in (now, now + 60)}
    for obstacle in obstacles:
        obstacle.mkdir(parents=True, exist_ok=True)
    client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "kept"}])
    proxy.flush()
    assert httpx2.get(proxy.url + "/healthz").status_code == 503  # committed, not written
    dying = on_loop(proxy, lambda: proxy.server.pipeline.process)  # type: ignore[union-attr]
    assert dying.pid is not None
    os.kill(dying.pid, signal.SIGSTOP)
    for obstacle in obstacles:
        obstacle.rmdir()
    kill_recorder(proxy)
    wait_replaced(proxy, dying)
    proxy.flush()
    [request] = assert_record_agrees(proxy.log_dir).values()
    assert request["path"] == "/v1/messages/count_tokens" and "kept" in request["body"]


def test_unwritable_log_dir_at_start_is_retried_and_reported_once(fake, small_disk):
    """A log dir on a read-only disk: the proxy still starts and forwards; /healthz answers
    503 "failing" with the error and counts what could not be recorded; stderr says it once;
    once the disk is writable the recorder opens the record by itself and records again."""
    disk = small_disk("4m", "ro")
    args = ["--log-dir", str(disk / "logs"), "--upstream", fake.url]
    with ProxyProcess(args) as running:
        base = f"{running.url}/anthropic/{fake.host_port}"
        client = anthropic.Anthropic(base_url=base, api_key="sk-ant-x", max_retries=0)
        assert client.messages.create(model="m", max_tokens=5, messages=[
            {"role": "user", "content": "unrecorded"}]).content
        wait_for(lambda: httpx2.get(running.url + "/healthz").json()["records_unrecorded"] == 1,
                 10, "the exchange was not counted as unrecorded")
        answer = httpx2.get(running.url + "/healthz")
        assert answer.status_code == 503 and answer.json()["status"] == "failing"
        assert "Read-only file system" in answer.json()["record_error"]
        time.sleep(2)  # several retries
        remount(disk, "rw")
        wait_for(lambda: httpx2.get(running.url + "/healthz").status_code == 200, 40,
                 "the record was not opened once writable")
        client.messages.create(model="m", max_tokens=5, messages=[
            {"role": "user", "content": "recorded"}])
        wait_for(lambda: httpx2.get(running.url + "/healthz").json()["records_written"] == 1,
                 10, "the exchange was not recorded")
        stderr = running.stderr
    assert stderr.count("cannot open the record") == 1, stderr
    assert "open again" in stderr
    [entry] = [orjson.loads(line) for path in (disk / "logs").glob("*/*.jsonl")
               for line in path.read_bytes().splitlines() if b'"request"' in line]
    assert "recorded" in entry["body"]


def test_a_full_record_buffer_keeps_exchanges_without_their_bodies(tmp_path):
    """When the buffer to the recorder is full an exchange is sent without its bodies rather
    than dropped: its request and response entries are recorded with body_truncated and
    sizes, and counted in records_without_bodies."""
    async def scenario() -> None:
        recorder = Recorder(make_config(tmp_path / "logs"), env={}, buffer_limit=1024 * 1024)
        big = []
        for n in range(6):  # ~3.6 MB for a 1 MiB pipe and a 1 MiB buffer, recorder not reading
            ex = exchange(n)
            ex.request_body = orjson.dumps({"model": "m", "messages": [
                {"role": "user", "content": f"{n} " + "b" * 600_000}]})
            big.append(ex)
            recorder.submit(ex)
            await asyncio.sleep(0)  # each past _FRAME_BYTES: one message each
        assert recorder.without_bodies >= 1 and recorder.dropped == 0
        await recorder.start()
        try:
            assert await recorder.drain(30)
            entries = [orjson.loads(line) for path in (tmp_path / "logs").glob("*/*.jsonl")
                       for line in path.read_bytes().splitlines()]
            requests = {e["exchange_id"]: e for e in entries if e["type"] == "request"}
            responses = {e["exchange_id"]: e for e in entries if e["type"] == "response"}
            assert set(requests) == set(responses) == {ex.id for ex in big}
            cut = [e for e in requests.values() if e.get("body_truncated")]
            assert len(cut) == recorder.without_bodies
            assert all(e["body"] == "" and e["size"] > 600_000 for e in cut)
            assert all(responses[e["exchange_id"]]["body_truncated"] for e in cut)
            assert recorder.counters()["records_without_bodies"] == len(cut)
        finally:
            assert await recorder.stop(10)

    asyncio.run(scenario())


def _small_queue(make_proxy, fake) -> tuple[RunningProxy, int, anthropic.Anthropic]:
    """A proxy with ``record_queue_size=8``, its recorder's pid and a client of it."""
    proxy = make_proxy(fake, record_queue_size=8)
    recorder = proxy.server.pipeline
    assert isinstance(recorder, Recorder)
    pid = on_loop(proxy, lambda: recorder.process.pid)
    assert pid is not None
    return proxy, pid, anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x",
                                           max_retries=0)


def test_a_backlog_at_half_the_queue_bound_holds_new_requests_back_and_nothing_is_dropped(
    make_proxy, fake
):
    """With half of ``record_queue_size`` exchanges unrecorded (the recorder stopped here with
    SIGSTOP), a new request is not read until the recorder has caught up: more requests than
    the bound all get answered once it runs again, every one is recorded, none dropped, and
    /healthz counts the waits."""
    proxy, pid, client = _small_queue(make_proxy, fake)
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(4):  # half the bound: recorded by nobody yet
            client.messages.create(model="m", max_tokens=1,
                                   messages=[{"role": "user", "content": "hi"}])
        answered: list[str] = []
        waiting = threading.Thread(target=lambda: answered.extend(
            client.messages.create(model="m", max_tokens=1,
                                   messages=[{"role": "user", "content": f"more {n}"}]).id
            for n in range(12)))
        waiting.start()
        time.sleep(0.5)
        assert answered == [] and waiting.is_alive()  # held back, not dropped
        assert on_loop(proxy, lambda: proxy.server.state.stats.record_waits) == 1
        with pytest.raises(httpx2.TimeoutException):  # a client that gives up while held back
            httpx2.post(f"{proxy.base()}/v1/messages", content=b'{"model": "m"}', timeout=0.3)
    finally:
        os.kill(pid, signal.SIGCONT)
    waiting.join(30)
    assert not waiting.is_alive() and len(answered) == 12
    proxy.flush()
    health = httpx2.get(f"{proxy.url}/healthz").json()
    assert health["records_dropped"] == 0 and health["records_written"] == 17, health
    assert health["records_submitted"] == 17 and health["exchanges"] == 16, health
    assert health["record_waits"] >= 2 and health["record_wait_s"] > 0.4
    gave_up = [entry for entry in proxy.entries() if "waited for the record" in
               str(entry.get("error"))]
    assert len(gave_up) == 1 and gave_up[0]["outcome"] == "client_aborted", gave_up


def test_after_a_wait_in_which_the_recorder_recorded_nothing_requests_stop_waiting(
    make_proxy, fake, monkeypatch
):
    """A recorder that records nothing through a whole wait (stopped here with SIGSTOP) holds
    one round of requests for ``RECORD_WAIT_MAX``, not every request after it: the next goes
    through at once; once the recorder runs again everything is recorded, none dropped."""
    monkeypatch.setattr(proxy_module, "RECORD_WAIT_MAX", 0.5)
    proxy, pid, client = _small_queue(make_proxy, fake)

    def ask(text: str) -> float:
        began = time.monotonic()
        client.messages.create(model="m", max_tokens=1,
                               messages=[{"role": "user", "content": text}])
        return time.monotonic() - began

    os.kill(pid, signal.SIGSTOP)
    try:
        for n in range(4):
            ask(f"fill {n}")
        assert ask("held") >= 0.5
        stats = proxy.server.state.stats
        assert on_loop(proxy, lambda: stats.record_waits) == 1
        ask("not held")
        assert on_loop(proxy, lambda: stats.record_waits) == 1  # it did not wait
    finally:
        os.kill(pid, signal.SIGCONT)
    proxy.flush()
    health = httpx2.get(f"{proxy.url}/healthz").json()
    assert health["records_dropped"] == 0 and health["records_written"] == 6, health


def _counting_hand_overs(proxy: RunningProxy) -> list[int]:
    """The request body sizes the proxy hands to its recorder from now on (``hand_over``
    wrapped on the instance: the handler looks it up there)."""
    recorder = proxy.server.pipeline
    assert isinstance(recorder, Recorder)
    sizes: list[int] = []
    hand_over = recorder.hand_over

    def counting(exchange: Exchange) -> None:
        hand_over(exchange)
        if exchange.request_handed is not None:
            sizes.append(exchange.request_handed)

    recorder.hand_over = counting  # type: ignore[method-assign]
    return sizes


def _raw_request(proxy: RunningProxy, session: str, seq: int) -> bytes:
    raw = subprocess.run([sys.executable, "-m", "otelproxy", "show", session, "--raw", str(seq),
                          "--log-dir", str(proxy.log_dir)], capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    return raw.stdout


def test_a_streamed_request_body_goes_to_the_recorder_early_and_comes_back_exact(proxy, fake):
    """Once a stream's head is relayed, its request body (over ``HAND_OVER_FROM``) goes to the
    recorder, which holds it against the previous turn of its conversation; the record still
    gives back every body byte for byte, the later turns as deltas, also with two streams of
    the conversation open at once."""
    handed = _counting_hand_overs(proxy)
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    system = "You follow the house rules. " * 700  # 19 KB: every body is handed over
    messages: list = []
    for n in range(1, 5):
        messages.append({"role": "user", "content": f"question {n}: " + "détail " * 40})
        with client.messages.stream(model="claude-test-1", max_tokens=50, system=system,
                                    messages=messages) as stream:
            text = stream.get_final_text()
        messages.append({"role": "assistant", "content": text})
    fake.replies.extend([Reply(event_delay=0.02), Reply(event_delay=0.02)])
    both = [[*messages, {"role": "user", "content": f"fork {k}"}] for k in (1, 2)]
    threads = [threading.Thread(target=lambda m=m: client.messages.create(
        model="claude-test-1", max_tokens=50, system=system, messages=m, stream=True
    ).response.read()) for m in both]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    calls = fake.model_calls()
    assert len(calls) == 6 and handed == [len(call.body) for call in calls[:4]] + [
        len(calls[4].body)] * 2
    proxy.flush()
    requests = list({e["exchange_id"]: e for e in proxy.entries()
                     if e["type"] == "request"}.values())  # a branch's file repeats its start
    assert len(requests) == 6 and "body" in requests[0]
    assert all("body_delta" in entry for entry in requests[1:4])
    assert not any(entry.get("body_truncated") for entry in requests)
    by_body = {call.body for call in calls}
    for entry in requests:
        assert _raw_request(proxy, entry["session_id"], entry["seq"]) in by_body
    assert {_raw_request(proxy, e["session_id"], e["seq"]) for e in requests} == by_body


def test_a_recorder_killed_mid_stream_leaves_the_exchange_with_its_request_size(proxy, fake):
    """A request body handed over is lost with a recorder killed before the stream ends: the
    exchange is still recorded, by the next recorder, with the body's size and
    ``body_truncated`` (as one sent without bodies), and the response whole."""
    handed = _counting_hand_overs(proxy)
    fake.replies.append(Reply(event_delay=0.3))
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    body = "x" * 30_000
    done: list[str] = []
    thread = threading.Thread(target=lambda: done.append(client.messages.create(
        model="claude-test-1", max_tokens=50, messages=[{"role": "user", "content": body}],
        stream=True).response.read().decode()))
    thread.start()
    wait_for(lambda: bool(handed), 10, "no request body handed over")
    dying, _ = kill_recorder(proxy)
    wait_replaced(proxy, dying)
    thread.join(30)
    assert done and "message_stop" in done[0]
    proxy.flush()
    [request] = [e for e in proxy.entries() if e["type"] == "request"]
    [response] = [e for e in proxy.entries() if e["type"] == "response"]
    assert request["body_truncated"] is True and request["body"] == ""
    assert request["size"] == len(fake.model_calls()[0].body) == handed[0]
    assert "body_truncated" not in response and response["status"] == 200


def test_a_proxy_killed_mid_stream_leaves_the_request_in_the_record(tmp_path, fake):
    """SIGKILL of the proxy process while an answer streams: its recorder, which was handed the
    request when the stream began, records the exchange ``proxy_ended``, with the exact request
    body and the response head, then exits (its inbox ended)."""
    fake.replies.append(Reply(event_delay=1.0))
    log_dir = tmp_path / "logs"
    with ProxyProcess(["--log-dir", str(log_dir), "--upstream", fake.url]) as running:
        recorder = _recorder_of(running)
        client = anthropic.Anthropic(base_url=f"{running.url}/anthropic/{fake.host_port}",
                                     api_key="sk-ant-x", max_retries=0)
        prompt = "keep this " * 3000  # 30 KB: handed over once the stream begins
        stream = client.messages.create(model="claude-test-1", max_tokens=50, stream=True,
                                        messages=[{"role": "user", "content": prompt}])
        events = iter(stream)
        assert next(events).type == "message_start"
        time.sleep(0.3)  # the recorder reads the request it was handed
        running.process.kill()
        deadline = time.monotonic() + 20
        while pid_alive(recorder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(recorder)
    entries = [orjson.loads(line) for path in sorted(log_dir.glob("*/*.jsonl"))
               for line in path.read_bytes().splitlines()]
    [request] = [e for e in entries if e["type"] == "request"]
    [response] = [e for e in entries if e["type"] == "response"]
    assert response["outcome"] == "proxy_ended" and response["status"] == 200
    assert "ended while the response streamed" in response["error"]
    assert request["body"] == fake.model_calls()[0].body.decode()
    assert "body_truncated" not in request
