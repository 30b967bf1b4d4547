"""The local record: file layout, request/response entries, the exchanges index, counting."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import sqlite3
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import orjson
import pytest

from otelproxy.record import Event, Exchange, iso
from otelproxy.store import _chunk_entries, body_fields, make_private
from tests.conftest import RunningProxy, fill
from tests.fake_upstream import FakeUpstream, Reply
from tests.raw_upstream import closed_port

USER = [{"role": "user", "content": "hello"}]
WORDS = "alpha beta gamma delta epsilon zeta"


def parse_ts(ts: str) -> datetime:
    assert ts.endswith("Z"), ts
    parsed = datetime.fromisoformat(ts[:-1] + "+00:00")
    assert parsed.utcoffset() is not None
    return parsed


def day(entry: dict[str, Any]) -> str:
    return str(entry["ts"][:10].replace("-", ""))


def by_type(proxy: RunningProxy, kind: str, pattern: str = "*/*.jsonl") -> list[dict[str, Any]]:
    return sorted((e for e in proxy.entries(pattern) if e["type"] == kind), key=lambda e: e["ts"])


def anthropic_client(proxy: RunningProxy, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0,
                               **options)


def test_layout_sessions_db_session_files_and_daily_untracked_files(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """Turns go to {provider}/{session}.jsonl, side calls to untracked-YYYYMMDD.jsonl."""
    client = anthropic_client(proxy)
    client.messages.create(model="m", max_tokens=5, messages=USER)
    client.messages.count_tokens(model="m", messages=USER)
    client.models.list()
    httpx2.head(proxy.base() + "/api/hello")
    oclient = openai.OpenAI(base_url=proxy.base("openai") + "/v1", api_key="sk-x", max_retries=0)
    oclient.chat.completions.create(model="g", messages=USER)  # type: ignore[arg-type]
    oclient.models.list()

    proxy.flush()
    log_dir = proxy.log_dir
    assert (log_dir / "sessions.db").is_file()
    requests = by_type(proxy, "request")
    assert len(requests) == 6
    files: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(log_dir.glob("*/*.jsonl")):
        entries = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        files[str(path.relative_to(log_dir))] = [
            (e["method"], e["path"]) for e in entries if e["type"] == "request"
        ]
        if path.stem.startswith("untracked-"):
            assert all(path.stem == f"untracked-{day(e)}" for e in entries)
    today = day(requests[0])
    assert files.pop(f"anthropic/untracked-{today}.jsonl") == [
        ("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models"), ("HEAD", "/api/hello")]
    assert files.pop(f"openai/untracked-{today}.jsonl") == [("GET", "/v1/models")]
    sessions = sorted(files.items())
    assert [(name.split("/")[0], calls) for name, calls in sessions] == [
        ("anthropic", [("POST", "/v1/messages")]),
        ("openai", [("POST", "/v1/chat/completions")]),
    ]
    for name, _ in sessions:
        [first] = [e for e in proxy.entries(name) if e["type"] == "request"]
        assert name == f"{name.split('/')[0]}/{first['session_id']}.jsonl"
    assert [p.name for p in log_dir.iterdir() if p.suffix == ".jsonl"] == []  # nothing rejected


def test_request_entry_has_the_documented_fields(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """A request entry has ts (ISO 8601), seq, method, path, query, headers, body and size."""
    body = orjson.dumps({"model": "m", "max_tokens": 5, "messages": USER, "stream": True})
    answer = httpx2.post(proxy.base() + "/v1/messages?beta=true", content=body,
                         headers={"content-type": "application/json", "x-app": "cli"})
    assert answer.status_code == 200
    [request] = by_type(proxy, "request")
    parse_ts(request["ts"])
    assert isinstance(request["seq"], int) and request["seq"] >= 1
    assert request["method"] == "POST" and request["path"] == "/v1/messages"
    assert request["query"] == "beta=true"
    assert request["headers"]["x-app"] == "cli"
    assert request["headers"]["content-type"] == "application/json"
    assert request["body"] == body.decode() and request["size"] == len(body)
    assert request["upstream"] == fake.url


def test_stream_response_entry_has_chunks_timing_and_outcome(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A stream's response entry has chunks {ts, delta_ms, raw}, size, timing, rate and outcome."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS}], event_delay=0.02,
                              usage={"input_tokens": 10, "output_tokens": 12}))

    async def fetch() -> bytes:
        async with aiohttp.ClientSession() as session, session.post(
            proxy.base() + "/v1/messages",
            json={"model": "m", "max_tokens": 5, "messages": USER, "stream": True},
        ) as answer:
            return await answer.read()

    wire = asyncio.run(fetch())
    [request] = by_type(proxy, "request")
    [response] = by_type(proxy, "response")
    assert response["status"] == 200 and response["seq"] == request["seq"]
    assert response["headers"]["content-type"].startswith("text/event-stream")
    chunks = response["chunks"]
    assert "".join(c["raw"] for c in chunks).encode() == wire
    assert all(c["raw"].endswith("\n\n") for c in chunks)
    assert [c["raw"].split("\n")[0] for c in chunks][:2] == ["event: message_start",
                                                             "event: ping"]
    previous = parse_ts(request["ts"])
    for chunk in chunks:
        assert chunk["delta_ms"] >= 0
        stamp = parse_ts(chunk["ts"])
        assert stamp >= previous
        previous = stamp
    assert response["size"] == len(wire)
    timing = response["timing"]
    assert 0 <= timing["ttfb_ms"] <= timing["total_ms"]
    assert timing["total_ms"] >= sum(c["delta_ms"] for c in chunks) - 1
    assert timing["total_ms"] >= 0.02 * (len(chunks) - 1) * 1000 * 0.8
    assert response["tokens_per_second"] > 0
    assert response["usage"]["output_tokens"] == 12
    assert response["outcome"] == "complete"
    assert response["proxy"]["overhead_ms"] >= 0
    parse_ts(response["ts"])


def test_whole_response_entry_has_the_body_the_client_got(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """response of a non-streamed call: body is the exact JSON text the client received."""
    answer = httpx2.post(proxy.base() + "/v1/messages",
                         json={"model": "m", "max_tokens": 5, "messages": USER})
    [response] = by_type(proxy, "response")
    assert response["body"] == answer.text and "chunks" not in response
    assert response["size"] == len(answer.content)
    assert response["timing"]["ttfb_ms"] <= response["timing"]["total_ms"]
    assert response["tokens_per_second"] > 0 and response["stop_reason"] == "end_turn"


def test_exchange_rows_point_at_their_request_entries(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """Every exchanges row's file + offset + length is exactly its request line."""
    client = anthropic_client(proxy)
    for text in ("one", "two"):
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user",
                                                                   "content": text}])
    client.models.list()
    client.messages.count_tokens(model="m", messages=USER)
    oclient = openai.OpenAI(base_url=proxy.base("openai") + "/v1", api_key="sk-x", max_retries=0)
    oclient.chat.completions.create(model="g", messages=USER, stream=True)  # type: ignore
    with proxy.db() as db:
        rows = db.execute("SELECT * FROM exchanges").fetchall()
    assert len(rows) == 5
    for row in rows:
        data = (proxy.log_dir / row["file_path"]).read_bytes()
        line = data[row["offset"]: row["offset"] + row["length"]]
        assert line.endswith(b"\n") and (row["offset"] == 0 or data[row["offset"] - 1] == 10)
        entry = orjson.loads(line)
        assert entry["type"] == "request" and entry["exchange_id"] == row["id"]
        assert (entry["session_id"], entry["seq"]) == (row["session_id"], row["seq"])
        assert (entry["method"], entry["path"]) == (row["method"], row["path"])
        assert row["outcome"] == "complete" and row["status"] == 200


def test_every_forwarded_request_has_one_request_entry_aborted_ones_too(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """One request entry per forwarded request, aborted ones too; refusals go to rejected-*."""
    client = anthropic_client(proxy)
    client.messages.create(model="m", max_tokens=5, messages=USER)
    fake.replies.append(Reply(status=500))
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(model="m", max_tokens=5, messages=USER)
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS}], drop_after_events=3))
    broken = (httpx2.RemoteProtocolError, anthropic.APIConnectionError)
    with pytest.raises(broken), client.messages.stream(
        model="m", max_tokens=5, messages=USER
    ) as stream:
        stream.get_final_message()
    fake.replies.append(Reply(first_byte_delay=1.0))
    with pytest.raises(anthropic.APITimeoutError):
        anthropic_client(proxy, timeout=0.3).messages.create(model="m", max_tokens=5,
                                                             messages=USER)
    client.models.list()
    # refused: unknown provider, host not allowed, too large
    assert httpx2.post(f"{proxy.url}/mistral/x/v1/chat", json={}).status_code == 404
    assert httpx2.post(f"{proxy.url}/anthropic/evil.example/v1/messages",
                       json={}).status_code == 403
    too_large = httpx2.post(proxy.base() + "/v1/messages",
                            content=b"x" * (32 * 1024 * 1024 + 1))
    assert too_large.status_code == 413

    requests = by_type(proxy, "request")
    responses = by_type(proxy, "response")
    assert len(requests) == len(responses) == len(fake.received) == 5
    assert sorted(r["outcome"] for r in responses) == sorted(
        ["complete", "complete", "complete", "upstream_aborted", "client_aborted"])
    assert sorted(r["status"] or 0 for r in responses) == [0, 200, 200, 200, 500]
    with proxy.db() as db:
        assert db.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 5
    rejected = proxy.entries("rejected-*.jsonl")
    assert [r["status"] for r in rejected] == [404, 403, 413]
    assert all(r["type"] == "rejected" and r["error"] for r in rejected)
    assert [p.name for p in proxy.log_dir.glob("rejected-*.jsonl")] == [
        f"rejected-{day(rejected[0])}.jsonl"]
    health = httpx2.get(proxy.url + "/healthz").json()
    assert health["exchanges"] == 5 and health["rejected"] == 3


def test_upstream_error_is_recorded_like_any_exchange(make_proxy: Any) -> None:
    """A 502 for an unreachable upstream leaves request, response and index entries."""
    running = make_proxy(closed_port())
    with pytest.raises(anthropic.InternalServerError):
        anthropic_client(running).messages.create(model="m", max_tokens=5, messages=USER)
    [request] = by_type(running, "request")
    [response] = by_type(running, "response")
    assert response["exchange_id"] == request["exchange_id"]
    assert response["outcome"] == "upstream_error" and response["status"] == 502
    with running.db() as db:
        [row] = db.execute("SELECT outcome, status FROM exchanges").fetchall()
    assert tuple(row) == ("upstream_error", 502)


def test_an_unwritable_record_is_reported_but_forwarding_goes_on(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """An unwritable record makes /healthz answer 503 "failing" with the error while
    forwarding goes on; what could not be recorded is counted."""
    (proxy.log_dir / "anthropic").write_text("a file where the provider directory should be")
    client = anthropic_client(proxy)
    assert client.messages.create(model="m", max_tokens=5, messages=USER).content[0].text == (
        "Echo: hello")
    proxy.flush()
    answer = httpx2.get(proxy.url + "/healthz")
    health = answer.json()
    assert answer.status_code == 503 and health["status"] == "failing"
    assert "File exists" in health["record_error"] and health["sink_errors"] >= 1
    assert client.messages.create(model="m", max_tokens=5, messages=USER).content
    assert len(fake.model_calls()) == 2
    proxy.flush()
    assert httpx2.get(proxy.url + "/healthz").json()["records_unrecorded"] == 1


def test_sessions_db_is_sqlite_with_the_exchanges_table(proxy: RunningProxy) -> None:
    """sessions.db is created at start-up under the log dir and is a readable SQLite index."""
    path: Path = proxy.log_dir / "sessions.db"
    assert path.is_file()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"exchanges", "sessions"} <= tables


def test_unparseable_json_body_is_recorded_with_its_parse_error(proxy: RunningProxy) -> None:
    """A body that looks like JSON but is not is forwarded as is; the record says why it could
    not be parsed."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(proxy.base() + "/v1/messages", data=b'{"model": oops',
                                     headers={"content-type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10).read()
    except urllib.error.HTTPError as exc:
        exc.read()
    responses = [e for e in proxy.entries("anthropic/untracked-*.jsonl")
                 if e["type"] == "response"]
    assert len(responses) == 1
    assert responses[0]["parse_error"].startswith("request body is not JSON")


def test_the_log_dir_is_private_sqlite_files_and_existing_files_included(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """The log dir and its folders are 0700 and every file in it 0600 — JSONL, sessions.db and
    its -wal/-shm files — whatever the umask; files and folders already there are made so."""
    log_dir = tmp_path / "logs"
    (log_dir / "anthropic").mkdir(parents=True, mode=0o755)
    log_dir.chmod(0o755)
    old = log_dir / "anthropic" / "untracked-20250101.jsonl"
    old.write_text("{}\n")
    old.chmod(0o644)
    previous = os.umask(0o022)
    try:
        running = RunningProxy(fake, log_dir)
    finally:
        os.umask(previous)
    try:
        client = anthropic_client(running)
        client.messages.create(model="m", max_tokens=5, messages=USER)
        httpx2.get(f"{running.base()}/v1/models")
        running.flush()
        paths = [log_dir, *log_dir.rglob("*")]
        names = {p.name for p in paths}
        assert {"sessions.db", "sessions.db-wal", "sessions.db-shm"} <= names
        assert any(p.suffix == ".jsonl" and p != old for p in paths)
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
        assert modes == {name: 0o700 if (tmp_path / name).is_dir() else 0o600 for name in modes}
    finally:
        running.stop()


def assert_record_agrees(log_dir: Path) -> dict[str, dict[str, Any]]:
    """Every JSONL file holds whole lines only (none empty, none torn); its request entries and
    the ``exchanges`` rows are the same set, each row pointing at its own line. Returns the
    request entries by exchange id."""
    requests: dict[str, dict[str, Any]] = {}
    for path in sorted([*log_dir.glob("*.jsonl"), *log_dir.glob("*/*.jsonl")]):
        data = path.read_bytes()
        assert data and data.endswith(b"\n"), f"{path} is empty or ends in a torn line"
        for line in data.splitlines():
            entry = orjson.loads(line)
            if entry["type"] == "request":
                assert entry["exchange_id"] not in requests, "an exchange recorded twice"
                requests[entry["exchange_id"]] = entry
    conn = sqlite3.connect(log_dir / "sessions.db")
    try:
        rows = conn.execute("SELECT id, file_path, offset, length FROM exchanges").fetchall()
        journal = conn.execute("SELECT file_path, offset, data FROM record_journal").fetchall()
    finally:
        conn.close()
    assert {row[0] for row in rows} == set(requests)
    for exchange_id, file_path, offset, length in rows:
        with (log_dir / file_path).open("rb") as handle:
            handle.seek(offset)
            assert orjson.loads(handle.read(length))["exchange_id"] == exchange_id
    for file_path, offset, data in journal:  # the last batch's bytes: in their file too
        assert (log_dir / file_path).read_bytes()[offset:offset + len(data)] == data
    return requests


def test_a_failed_write_is_kept_in_the_journal_and_written_once_possible(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A batch whose JSONL write fails after its index committed is kept in the DB's journal:
    /healthz says 503 failing meanwhile, and once the file can be written the entry is there,
    the index agrees and the conversation goes on in the same session."""
    client = anthropic_client(proxy)
    first = client.messages.create(model="m", max_tokens=5, messages=USER)
    proxy.flush()
    now = time.time()
    obstacles = {proxy.log_dir / "anthropic" / time.strftime("untracked-%Y%m%d.jsonl",
                                                              time.gmtime(t))
                 for t in (now, now + 60)}  # directories where the day's file must go
    for obstacle in obstacles:
        obstacle.mkdir(exist_ok=True)
    client.messages.count_tokens(model="m", messages=USER)
    proxy.flush()
    answer = httpx2.get(proxy.url + "/healthz")
    assert answer.status_code == 503 and answer.json()["status"] == "failing"
    assert "Is a directory" in answer.json()["record_error"]

    for obstacle in obstacles:
        obstacle.rmdir()
    deadline = time.monotonic() + 10  # the idle recorder retries several times a second
    while httpx2.get(proxy.url + "/healthz").status_code != 200:
        assert time.monotonic() < deadline, "the journal was not written within 10 s"
        time.sleep(0.1)
    history = [*USER, {"role": "assistant", "content": first.content[0].text},
               {"role": "user", "content": "second"}]
    client.messages.create(model="m", max_tokens=5, messages=history)
    proxy.flush()
    requests = assert_record_agrees(proxy.log_dir)
    assert sorted((e["path"], e["seq"]) for e in requests.values()) == [
        ("/v1/messages", 1), ("/v1/messages", 2), ("/v1/messages/count_tokens", None)]
    assert len({e["session_id"] for e in requests.values() if e["seq"]}) == 1
    health = httpx2.get(proxy.url + "/healthz").json()
    assert health["records_written"] == 3 and health["records_unrecorded"] == 0


def test_deleted_log_dir_is_noticed_recreated_and_reported(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """Deleting the log dir under a running proxy is noticed within seconds even without
    traffic: the dir and its index are created again, /healthz reports it (degraded,
    log_dir_recreated) and the next exchanges land in the new files, not in unlinked ones."""
    client = anthropic_client(proxy)
    client.messages.create(model="m", max_tokens=5, messages=USER)
    proxy.flush()
    shutil.rmtree(proxy.log_dir)
    deadline = time.monotonic() + 10
    while not (proxy.log_dir / "sessions.db").exists():
        assert time.monotonic() < deadline, "the log dir was not recreated within 10 s"
        time.sleep(0.05)
    # the recorder reports its counters a moment after it has made the dir again (it runs
    # under SCHED_IDLE: on a busy machine, later)
    while (health := httpx2.get(proxy.url + "/healthz").json()).get("log_dir_recreated") != 1:
        assert time.monotonic() < deadline, f"/healthz did not report it within 10 s: {health}"
        time.sleep(0.05)
    assert health["status"] == "degraded"
    client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    proxy.flush()
    requests = assert_record_agrees(proxy.log_dir)
    assert [e["body"] for e in requests.values()] == [
        '{"max_tokens":5,"messages":[{"role":"user","content":"x"}],"model":"m"}']


def test_disk_full_leaves_whole_lines_an_agreeing_index_and_a_failing_healthz(
    fake: FakeUpstream, small_disk: Any
) -> None:
    """On a full disk (a real 2 MiB tmpfs) nothing half-written is left: every JSONL file is
    whole lines, none is empty, JSONL and the index hold the same exchanges; /healthz answers
    503 failing with the error, forwarding goes on, and once space is freed recording resumes."""
    disk = small_disk("2m")
    log_dir = disk / "logs"
    running = RunningProxy(fake, log_dir)
    try:
        client = anthropic_client(running)
        client.messages.create(model="m", max_tokens=5, messages=USER)
        running.flush()
        filler = fill(disk)
        big = "x" * 150_000
        for n in range(4):  # a new conversation each, and one shared untracked file
            client.messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": f"{n} {big}"}])
            client.messages.count_tokens(model="m", messages=[{"role": "user", "content": big}])
        assert len(fake.model_calls()) == 5  # every request was forwarded
        running.flush()
        answer = httpx2.get(running.url + "/healthz")
        health = answer.json()
        assert answer.status_code == 503 and health["status"] == "failing"
        assert "full" in health["record_error"] or "No space" in health["record_error"]
        assert health["records_unrecorded"] >= 1
        assert_record_agrees(log_dir)

        filler.unlink()
        deadline = time.monotonic() + 20
        while httpx2.get(running.url + "/healthz").status_code != 200:
            assert time.monotonic() < deadline, "recording did not resume within 20 s"
            time.sleep(0.1)
        client.messages.create(model="m", max_tokens=5,
                               messages=[{"role": "user", "content": "after " + big}])
        running.flush()
        requests = assert_record_agrees(log_dir)
        assert any("after" in e["body"] for e in requests.values())
        health = httpx2.get(running.url + "/healthz").json()
        assert health["status"] == "degraded"
        assert health["records_written"] + health["records_unrecorded"] == 10
    finally:
        running.stop()


def test_a_log_dir_that_cannot_be_recreated_fails_until_it_can(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """The log dir deleted and a file put in its place: the record cannot be reopened, so
    /healthz answers 503 "failing" with the error while forwarding goes on and the exchanges
    are counted; once the path is free the record is reopened by itself and records again."""
    shutil.rmtree(proxy.log_dir)
    proxy.log_dir.write_text("not a directory")
    client = anthropic_client(proxy)
    assert client.messages.create(model="m", max_tokens=5, messages=USER).content
    proxy.flush()
    answer = httpx2.get(proxy.url + "/healthz")
    assert answer.status_code == 503 and answer.json()["status"] == "failing"
    assert "cannot open the record" in answer.json()["record_error"]
    assert answer.json()["records_unrecorded"] == 1
    proxy.log_dir.unlink()
    deadline = time.monotonic() + 20  # retried after 0.5, 1, 2, 4 … s
    while httpx2.get(proxy.url + "/healthz").status_code != 200:
        assert time.monotonic() < deadline, "the record was not reopened within 20 s"
        time.sleep(0.1)
    client.messages.create(model="m", max_tokens=5, messages=[
        {"role": "user", "content": "reopened"}])
    proxy.flush()
    [request] = assert_record_agrees(proxy.log_dir).values()
    assert "reopened" in request["body"]


def test_a_log_dir_shared_with_other_files_keeps_its_mode_and_their_modes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--log-dir pointing at a folder with other things in it (".", a home folder): only the
    record's own files and folders are made private; the folder and the rest keep their modes,
    and one warning says why."""
    shared = tmp_path / "project"
    (shared / "openai").mkdir(parents=True)
    (shared / "scripts").mkdir()
    files = {"run.sh": 0o755, "notes.txt": 0o644, "sessions.db": 0o644,
             "rejected-20250101.jsonl": 0o644, "openai/untracked-20250101.jsonl": 0o644,
             "scripts/tool.jsonl": 0o644}
    for name, mode in files.items():
        (shared / name).write_text("x")
        (shared / name).chmod(mode)
    shared.chmod(0o755)
    (shared / "openai").chmod(0o755)
    with caplog.at_level("WARNING", logger="otelproxy.store"):
        make_private(shared)
    mode = {name: stat.S_IMODE((shared / name).stat().st_mode)
            for name in [".", "openai", "scripts", *files]}
    assert mode == {".": 0o755, "openai": 0o700, "scripts": 0o755, "run.sh": 0o755,
                    "notes.txt": 0o644, "sessions.db": 0o600, "rejected-20250101.jsonl": 0o600,
                    "openai/untracked-20250101.jsonl": 0o600, "scripts/tool.jsonl": 0o644}
    [warning] = [r.getMessage() for r in caplog.records]
    assert "holds more than the record (notes.txt, run.sh, scripts)" in warning


def test_a_short_write_on_a_full_disk_is_cut_back_and_kept_in_the_journal(
    proxy: RunningProxy, fake: FakeUpstream, small_disk: Any
) -> None:
    """When the JSONL disk fills mid-line (the provider dir on a real 1 MiB tmpfs, the index
    beside it on another disk) the torn bytes are cut back, no empty file is left, the batch
    waits in the index's journal with /healthz 503, and is written whole once there is room."""
    disk = small_disk("1m")
    (proxy.log_dir / "openai").symlink_to(disk, target_is_directory=True)
    filler = fill(disk)
    os.truncate(filler, filler.stat().st_size - 100 * 1024)  # room for a third of the line
    httpx2.post(proxy.base("openai") + "/v1/files", content=b"y" * 300_000)
    proxy.flush()
    answer = httpx2.get(proxy.url + "/healthz")
    assert answer.status_code == 503 and "No space left" in answer.json()["record_error"]
    assert sorted(path.name for path in disk.iterdir()) == ["filler"]  # nothing torn or empty

    filler.unlink()
    deadline = time.monotonic() + 10
    while httpx2.get(proxy.url + "/healthz").status_code != 200:
        assert time.monotonic() < deadline, "the journal was not written within 10 s"
        time.sleep(0.1)
    [request] = assert_record_agrees(proxy.log_dir).values()
    assert request["path"] == "/v1/files" and request["body"] == "y" * 300_000
    health = httpx2.get(proxy.url + "/healthz").json()
    assert health["records_written"] == 1 and health["records_unrecorded"] == 0


def test_bodies_past_record_max_body_are_recorded_cut_with_size_and_sha256(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    """With record_max_body the client still gets every byte, while the record keeps the
    start of each larger body with body_truncated, the full size and the SHA-256 of all of it;
    the exchange is never dropped whole."""
    running = make_proxy(fake, record_max_body=4096)
    fake.replies.append(Reply(blocks=[{"type": "text", "text": WORDS * 2000}]))
    sent = orjson.dumps({"model": "m", "max_tokens": 5, "stream": True,
                         "messages": [{"role": "user", "content": "q" * 50_000}]})

    async def fetch() -> bytes:
        async with aiohttp.ClientSession() as session, session.post(
            running.base() + "/v1/messages", data=sent,
            headers={"content-type": "application/json"},
        ) as answer:
            return await answer.read()

    wire = asyncio.run(fetch())
    assert wire.count(b"content_block_delta") > 10 and wire.endswith(b"message_stop\"}\n\n")
    [request] = by_type(running, "request", "*/untracked-*.jsonl")
    [response] = by_type(running, "response", "*/untracked-*.jsonl")
    assert request["body_truncated"] is True and request["size"] == len(sent)
    assert request["body_wire_sha256"] == hashlib.sha256(sent).hexdigest()
    assert sent.startswith(request["body"].encode()) and len(request["body"]) == 4096
    assert response["body_truncated"] is True and response["size"] == len(wire)
    assert response["body_wire_sha256"] == hashlib.sha256(wire).hexdigest()
    kept = "".join(chunk["raw"] for chunk in response["chunks"]).encode()
    assert wire.startswith(kept) and 0 < len(kept) <= 4096
    assert response["outcome"] == "complete"


def test_chunk_entries_hold_each_events_time_offsets_and_bytes() -> None:
    """A stream's chunk entries are ``iso(wall_time)``, the gaps and offsets in ms and the raw
    bytes (base64 when not UTF-8) of each event, across second boundaries and odd fractions."""
    rng = random.Random(2)
    started_ns = 5_000_000_000
    exchange = Exchange(id="e", provider="anthropic", upstream_url="u", method="POST",
                        path="/v1/messages", query="", request_headers=[], request_body=b"",
                        started_wall=1_765_000_000.9999993, started_ns=started_ns)
    events, ns = [], started_ns
    for _ in range(3000):
        ns += rng.choice([1, 7, 999, 1_000_000, 3_333_333, 999_999_999])
        events.append(Event(ns, rng.choice([b"data: x\n\n", b"\xff\xfe\n\n", "é".encode()])))
    previous, expected = started_ns, []
    for event in events:
        expected.append({"ts": iso(exchange.wall_time(event.ns)),
                         "delta_ms": round((event.ns - previous) / 1e6, 3),
                         "offset_ms": round((event.ns - started_ns) / 1e6, 3),
                         **body_fields(event.raw, "raw")})
        previous = event.ns
    assert _chunk_entries(exchange, events) == expected


def test_chunk_entries_round_ties_negatives_and_huge_gaps_as_round_does() -> None:
    """Gaps and offsets computed from whole nanoseconds equal ``round(ns / 1e6, 3)`` for
    every case: ties at …500 ns, events stamped before the previous one (-0.0 included),
    gaps past 10^15 ns, and random ones."""
    rng = random.Random(5)
    started_ns = 10 ** 18
    exchange = Exchange(id="e", provider="anthropic", upstream_url="u", method="POST",
                        path="/v1/messages", query="", request_headers=[], request_body=b"",
                        started_wall=1_765_000_000.5, started_ns=started_ns)
    steps = [500, 1500, 2500, 999_500, 499, 501, -1, -499, -500, -1500, 10 ** 15, 10 ** 15 + 500,
             3 * 10 ** 15 + 1, 1, 0, 999, 1000, 1_000_000_499, 1_000_000_500]
    steps += [rng.randrange(-10 ** 6, 10 ** rng.randint(1, 17)) for _ in range(3000)]
    events, ns = [], started_ns
    for step in steps:
        ns += step
        events.append(Event(ns, b"data: x\n\n"))
    entries = _chunk_entries(exchange, events)
    previous = started_ns
    for event, entry in zip(events, entries, strict=True):
        expected = (round((event.ns - previous) / 1e6, 3), round((event.ns - started_ns) / 1e6, 3))
        assert orjson.dumps([entry["delta_ms"], entry["offset_ms"]]) == orjson.dumps(expected)
        previous = event.ns
