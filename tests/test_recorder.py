"""The recorder process: never blocks the proxy, counts what it drops, outlives nothing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import anthropic
import httpx2
import orjson

from otelproxy import config as config_module
from otelproxy.record import Exchange
from otelproxy.recorder import RECORDER_NICE, Channel, Recorder, frame, unframe
from tests.conftest import remount
from tests.proxy_process import ProxyProcess
from tests.test_store import assert_record_agrees


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
    ex.chunks = [(now, b'{"type":"message","role":"assistant","content":[]}')]
    return ex


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_records_in_another_process_and_flushes(tmp_path):
    """Submitted exchanges are written by the recorder process; flush waits for them."""
    recorder = Recorder(make_config(tmp_path / "logs"), env={})
    recorder.start()
    try:
        assert recorder._process.pid != os.getpid()
        for n in range(20):
            recorder.submit(exchange(n))
        assert recorder.flush(10)
        assert recorder.counters()["records_written"] == 20
        assert recorder.pending == 0
        files = list((tmp_path / "logs" / "anthropic").glob("*.jsonl"))
        assert len(files) == 20
    finally:
        assert recorder.shutdown(10)
    assert not recorder._process.is_alive()


def test_recorder_runs_at_a_lower_cpu_priority_than_the_proxy(tmp_path):
    """Under CPU contention the proxy's event loop runs first; the record catches up."""
    recorder = Recorder(make_config(tmp_path / "logs"), env={})
    recorder.start()
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        theirs = os.getpriority(os.PRIO_PROCESS, recorder._process.pid)
        assert theirs == min(19, mine + RECORDER_NICE)
        assert theirs > mine or mine == 19
    finally:
        assert recorder.shutdown(10)


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    """With the queue full, submit returns at once and the drop is counted."""
    recorder = Recorder(make_config(tmp_path / "logs", record_queue_size=1), env={})
    started = time.monotonic()
    for n in range(5):  # not started: nothing drains the queue
        recorder.submit(exchange(n))
    assert time.monotonic() - started < 1.0
    assert recorder.dropped == 4
    assert recorder.counters()["records_dropped"] == 4


def test_dead_recorder_is_replaced_and_reported(tmp_path):
    """A killed recorder is replaced: later exchanges are recorded; /healthz counts the error
    and the exchanges that were lost with it."""
    recorder = Recorder(make_config(tmp_path / "logs"), env={})
    recorder.start()
    try:
        recorder.submit(exchange(0))
        assert recorder.flush(10)
        first = recorder._process
        first.kill()
        first.join(10)
        deadline = time.monotonic() + 30
        while recorder._process is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorder._process is not first
        for n in range(1, 4):
            recorder.submit(exchange(n))
        assert recorder.flush(30)
        counters = recorder.counters()
        assert counters["recorder_restarts"] == 1 and counters["sink_errors"] >= 1
        assert counters["records_written"] == 4 and counters["records_dropped"] == 0
        assert recorder.pending == 0
        assert len(list((tmp_path / "logs" / "anthropic").glob("*.jsonl"))) == 4
    finally:
        assert recorder.shutdown(10)


def test_recorder_exits_when_the_proxy_process_dies(tmp_path):
    """A recorder whose proxy process vanished flushes and exits on its own."""
    script = textwrap.dedent(f"""
        import os, sys
        from otelproxy import config
        from otelproxy.recorder import Recorder
        cfg = config.build({{"log_dir": {str(tmp_path / "logs")!r}}},
                           list(config.DEFAULT_UPSTREAMS))
        recorder = Recorder(cfg, env={{}})
        recorder.start()
        print(recorder._process.pid, flush=True)
        os._exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)


def test_frames_split_anywhere_are_reassembled_in_order():
    """The pipe delivers bytes, not messages: frames cut at any byte come out whole, in order."""
    stream = b"".join(frame(["item", n, b"x" * n]) for n in range(50))
    buffer = bytearray()
    out = []
    for cut in range(0, len(stream), 7):
        buffer += stream[cut:cut + 7]
        out.extend(unframe(buffer))
    assert out == [["item", n, b"x" * n] for n in range(50)]
    assert buffer == bytearray()


def test_channel_buffers_when_the_pipe_is_full_and_the_loop_drains_it():
    """With the recorder not reading, sends never block; once it reads, the event loop writes
    the buffered rest (add_writer) and every frame arrives, in order."""
    import asyncio
    import multiprocessing
    import threading

    receive, feed = multiprocessing.Pipe(duplex=False)
    channel = Channel(feed)
    payload = b"y" * 100_000
    count = 60  # ~6 MB: far more than any pipe buffer

    async def produce() -> float:
        started = time.monotonic()
        for n in range(count):
            assert channel.send((n, payload))
        elapsed = time.monotonic() - started
        assert channel.buffered > 0  # the pipe is full: the rest waits in the buffer
        received: list[object] = []
        loop = asyncio.get_running_loop()
        all_received = asyncio.Event()

        def consume() -> None:
            buffer = bytearray()
            while len(received) < count:
                buffer += os.read(receive.fileno(), 1 << 20)
                received.extend(unframe(buffer))
            loop.call_soon_threadsafe(all_received.set)

        reader = threading.Thread(target=consume, daemon=True)
        reader.start()
        # Meanwhile only the loop's writer callback can move the buffered rest into the pipe.
        await asyncio.wait_for(all_received.wait(), 20)
        assert [item[0] for item in received] == list(range(count))
        assert all(item[1] == payload for item in received)
        assert channel.buffered == 0
        return elapsed

    elapsed = asyncio.run(produce())
    assert elapsed < 2.0  # 60 sends into a full pipe returned without waiting for a reader
    channel.close()
    receive.close()


def test_channel_refuses_beyond_its_limit_and_after_the_reader_is_gone():
    import multiprocessing

    receive, feed = multiprocessing.Pipe(duplex=False)
    channel = Channel(feed, limit=300_000)
    sent = 0
    while channel.send(b"z" * 100_000):
        sent += 1
        assert sent < 1000
    assert channel.buffered <= 300_000
    receive.close()
    assert channel.wait_sent(5) is False  # EPIPE: broken, the buffer is given up
    assert channel.broken and not channel.send(b"more")
    channel.close()


def test_channel_closed_from_a_thread_while_the_loop_watches_it():
    """Shutdown closes the channel from a thread: the loop stops watching the pipe first, and
    nothing is raised on the loop."""
    import asyncio
    import multiprocessing
    import threading

    receive, feed = multiprocessing.Pipe(duplex=False)
    channel = Channel(feed)
    errors: list[dict[str, object]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        while channel.buffered == 0:
            assert channel.send(b"w" * 100_000)
        assert channel._watching is loop
        closer = threading.Thread(target=channel.close)
        closer.start()
        await asyncio.to_thread(closer.join, 5)
        for _ in range(5):
            await asyncio.sleep(0)
        assert channel._watching is None and channel.broken
        assert feed.closed
        assert not channel.send(b"after close")

    asyncio.run(run())
    receive.close()
    assert errors == []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)


def wait_replaced(recorder: Recorder, dying: object) -> None:
    wait_for(lambda: recorder._process is not dying and recorder._process.is_alive(), 60,
             "no new recorder process")


def test_a_recorder_that_keeps_dying_is_restarted_with_growing_waits_said_once(
    proxy, fake, caplog
):
    """A recorder killed again and again is restarted at once, then after 0.5, 1 and 2 s; the
    first exit is logged, the rest only counted. Meanwhile /healthz answers 503 "failing" with
    the reason, exchanges wait in the pipe and are recorded by the next recorder."""
    caplog.set_level(logging.ERROR, logger="otelproxy.recorder")
    recorder = proxy.server.pipeline
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    waited = []
    for expected in (0.0, 0.5, 1.0, 2.0):
        dying = recorder._process
        dying.kill()
        killed = time.monotonic()
        if expected:
            wait_for(lambda: recorder.record_error() is not None, 10, "no record_error")
            answer = httpx2.get(proxy.url + "/healthz")
            assert answer.status_code == 503 and answer.json()["status"] == "failing"
            assert "killed by SIGKILL" in answer.json()["record_error"]
            assert f"restarting it in {expected:g} s" in answer.json()["record_error"]
            client.messages.create(model="m", max_tokens=5, messages=[
                {"role": "user", "content": f"during wait {expected}"}])
        wait_replaced(recorder, dying)
        waited.append(recorder._started_at - killed)
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
    JSONL and the index holding the same exchanges; what it had not recorded is counted as
    dropped, the rest is there."""
    recorder = proxy.server.pipeline
    dying = recorder._process
    os.kill(dying.pid, signal.SIGSTOP)  # a backlog builds up in the pipe
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    for n in range(60):
        client.messages.create(model="m", max_tokens=5, messages=[
            {"role": "user", "content": f"turn {n} " + "w" * 20_000}])
    os.kill(dying.pid, signal.SIGCONT)
    wait_for(lambda: recorder.counters().get("records_written", 0) > 0, 30, "nothing recorded")
    dying.kill()
    wait_replaced(recorder, dying)
    proxy.flush()
    requests = assert_record_agrees(proxy.log_dir)
    counters = recorder.counters()
    assert len(requests) == counters["records_written"]
    assert counters["records_written"] + counters["records_dropped"] == 60


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
    recorder = proxy.server.pipeline
    dying = recorder._process
    os.kill(dying.pid, signal.SIGSTOP)
    for obstacle in obstacles:
        obstacle.rmdir()
    dying.kill()
    wait_replaced(recorder, dying)
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
    recorder = Recorder(make_config(tmp_path / "logs"), env={}, buffer_limit=1024 * 1024)
    big = []
    for n in range(6):  # ~3.6 MB for a 1 MiB pipe and a 1 MiB buffer, recorder not reading
        ex = exchange(n)
        ex.request_body = orjson.dumps({"model": "m", "messages": [
            {"role": "user", "content": f"{n} " + "b" * 600_000}]})
        big.append(ex)
        recorder.submit(ex)
    assert recorder.without_bodies >= 1 and recorder.dropped == 0
    recorder.start()
    try:
        assert recorder.flush(30)
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
        assert recorder.shutdown(10)
