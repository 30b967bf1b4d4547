"""Retention: whole session trees and daily files leave the record by age or size."""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from contextlib import closing
from datetime import UTC, datetime

import anthropic
import orjson

from otelproxy import db
from otelproxy.retention import QUIET_S, sweep
from tests.conftest import RunningProxy
from tests.test_sessions import KEY, five_turns

DAY = 86400.0


def conversation(proxy: RunningProxy, text: str) -> None:
    client = anthropic.Anthropic(base_url=proxy.base(), api_key=KEY, max_retries=0)
    client.messages.create(model="claude-test-1", max_tokens=20,
                           messages=[{"role": "user", "content": text}])


def files(proxy: RunningProxy) -> set[str]:
    proxy.flush()
    return {p.relative_to(proxy.log_dir).as_posix() for p in proxy.log_dir.rglob("*.jsonl")}


def index(proxy: RunningProxy) -> sqlite3.Connection:
    proxy.flush()
    return db.connect(proxy.log_dir / "sessions.db")


def test_age_cap_deletes_whole_trees_and_daily_files(proxy: RunningProxy, fake):
    """Past the age cap a session goes with its branch (and index rows); the untracked day
    file goes too; nothing younger than the cap or still active is touched."""
    client = anthropic.Anthropic(base_url=proxy.base(), api_key=KEY, max_retries=0)
    five_turns(fake, client).fork(2).send("branch question")
    client.models.list()  # an untracked call: the daily file
    before = files(proxy)
    assert any("untracked-" in f for f in before) and any("_b1" in f for f in before)
    conn = index(proxy)
    assert sweep(conn, proxy.log_dir, max_age_s=DAY, max_bytes=None).files == []  # too young
    later = time.time() + 3 * DAY
    assert sweep(conn, proxy.log_dir, max_age_s=10 * DAY, max_bytes=None, now=later).files == []
    done = sweep(conn, proxy.log_dir, max_age_s=DAY, max_bytes=None, now=later)
    assert set(done.files) == before and files(proxy) == set()
    assert len(done.sessions) == 2 and done.bytes_freed > 0
    for table in ("sessions", "exchanges", "fingerprints"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


def test_size_cap_deletes_least_recent_first_and_spares_active_trees(proxy: RunningProxy, fake):
    """Over the size cap the least recently active conversations go first, until it fits; a
    conversation active within QUIET_S is never deleted (the excess is reported instead)."""
    for text in ("first conversation", "second conversation", "third conversation"):
        conversation(proxy, text)
        time.sleep(1.1)  # last_activity has a resolution finer than this; keep them ordered
    conn = index(proxy)
    order = [r["file_path"] for r in conn.execute(
        "SELECT file_path FROM sessions ORDER BY last_activity")]
    sizes = {f: (proxy.log_dir / f).stat().st_size for f in order}
    cap = sizes[order[2]] + sizes[order[1]]
    active = sweep(conn, proxy.log_dir, max_age_s=None, max_bytes=cap)
    assert active.files == [] and active.over_cap == sizes[order[0]]
    done = sweep(conn, proxy.log_dir, max_age_s=None, max_bytes=cap,
                 now=time.time() + QUIET_S + 60)
    assert done.files == [order[0]] and done.over_cap == 0
    assert files(proxy) == set(order[1:])


def test_the_recorder_sweeps_at_start_and_records_on_afterwards(fake, tmp_path):
    """A proxy started with --retention-days on a record whose conversation went quiet three
    days ago deletes it (counted on /healthz), then records new traffic without a hitch."""
    log_dir = tmp_path / "logs"
    first = RunningProxy(fake, log_dir)
    try:
        conversation(first, "an old conversation")
        old = files(first)
    finally:
        first.stop()
    three_days_ago = datetime.fromtimestamp(time.time() - 3 * DAY, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.000000Z")
    with closing(db.connect(log_dir / "sessions.db")) as conn:
        conn.execute("UPDATE sessions SET last_activity = ?", (three_days_ago,))
    second = RunningProxy(fake, log_dir, retention_days=1)
    try:
        deadline = time.monotonic() + 20
        while healthz(second).get("retention_deleted_files", 0) < len(old):
            assert time.monotonic() < deadline, healthz(second)
            time.sleep(0.1)
        assert not any((log_dir / f).exists() for f in old)
        conversation(second, "a new conversation")
        health = healthz(second)
        assert health["status"] == "ok" and health["retention_freed_bytes"] > 0
        with second.db() as conn:
            rows = conn.execute("SELECT file_path FROM exchanges").fetchall()
        assert [row["file_path"] for row in rows] == [f for f in files(second)
                                                      if "untracked" not in f]
    finally:
        second.stop()


def healthz(proxy: RunningProxy) -> dict:
    with urllib.request.urlopen(proxy.url + "/healthz", timeout=5) as answer:
        return orjson.loads(answer.read())
