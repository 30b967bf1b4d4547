"""Shared fixtures: a real fake upstream and a real otelproxy, each on loopback in its own loop."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from otelproxy import config as config_module
from otelproxy.compact import request_body
from otelproxy.record import Record
from otelproxy.server import Server
from tests.fake_upstream import FakeUpstream, LoopThread
from tests.raw_upstream import RawUpstream


class Collect:
    """A sink keeping every finished record (what OTLP and the store read). ``fail_on`` makes it
    raise for one exchange id; with a ``gate`` it holds each record until the gate opens."""

    name = "collect"

    def __init__(self, fail_on: str | None = None, gate: threading.Event | None = None) -> None:
        self.records: list[Record] = []
        self.fail_on = fail_on
        self.gate = gate
        self.entered = threading.Event()

    def submit(self, record: Record) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if record.exchange.id == self.fail_on:
            raise OSError("disk full")
        self.records.append(record)

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self, timeout: float) -> bool:
        return True

    def counters(self) -> dict[str, int]:
        return {}


class RunningProxy:
    """An otelproxy ``Server`` running on its own event loop thread."""

    def __init__(self, fake: FakeUpstream, log_dir: Path, **settings: Any) -> None:
        values: dict[str, Any] = {"port": 0, "log_dir": str(log_dir), "grace_period": 5}
        values.update(settings)
        self.config = config_module.build(
            values, [*config_module.DEFAULT_UPSTREAMS, fake.url]
        )
        self.fake = fake
        self.log_dir = log_dir
        self.loop = LoopThread()
        self.loop.start()
        self.server: Server = self.loop.run(self._make())
        self.url = f"http://127.0.0.1:{self.server.port}"

    async def _make(self) -> Server:
        server = Server(self.config)
        await server.start()
        return server

    def base(self, provider: str = "anthropic") -> str:
        """The base URL a client uses to reach the fake upstream through the proxy."""
        return f"{self.url}/{provider}/{self.fake.host_port}"

    def flush(self) -> None:
        """Wait for handlers still finishing (the client may have its last byte before the
        handler hands the exchange over), then for the pipeline and every sink."""
        deadline = time.monotonic() + 10
        while self.server.state.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.server.state.stats.in_flight == 0, "requests still in flight after 10 s"
        assert self.server.pipeline.flush(10), "record did not flush in 10 s"

    def entries(self, pattern: str = "*/*.jsonl") -> list[dict[str, Any]]:
        """Every JSONL entry under the log dir (after a flush), files in name order."""
        self.flush()
        out: list[dict[str, Any]] = []
        for path in sorted(self.log_dir.glob(pattern)):
            out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
        return out

    def request_bytes(self, entry: dict[str, Any]) -> bytes:
        """The recorded request body of a ``request`` entry, rebuilt when it is a delta."""
        requests = {e["exchange_id"]: e for e in self.entries() if e["type"] == "request"}
        return request_body(entry, requests.__getitem__)

    def db(self) -> sqlite3.Connection:
        self.flush()
        conn = sqlite3.connect(self.log_dir / "sessions.db")
        conn.row_factory = sqlite3.Row
        return conn

    def stop(self) -> None:
        self.loop.run(self.server.stop())
        self.loop.stop()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
def proxy(fake: FakeUpstream, tmp_path: Path) -> Iterator[RunningProxy]:
    running = RunningProxy(fake, tmp_path / "logs")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    """Start extra proxies with their own settings: ``make_proxy(upstream, **settings)``.

    ``upstream`` is anything with ``url`` and ``host_port`` (a ``FakeUpstream``, a
    ``RawUpstream``, or ``closed_port_origin()``); it is added to the allowlist.
    """
    started: list[RunningProxy] = []

    def start(upstream: Any, **settings: Any) -> RunningProxy:
        log_dir = tmp_path / f"logs-{len(started)}"
        running = RunningProxy(upstream, log_dir, **settings)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.stop()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as upstream:
        yield upstream


@pytest.fixture
def raw_proxy(raw_upstream: RawUpstream, tmp_path: Path) -> Iterator[RunningProxy]:
    """A proxy whose allowlist holds the byte-level ``raw_upstream``."""
    running = RunningProxy(raw_upstream, tmp_path / "raw-logs")  # type: ignore[arg-type]
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a real tmpfs of a given size (``small_disk("2m")``) to fill up or make read-only
    (``remount(path, "ro")``); unmounted afterwards. Mounting needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str, options: str = "") -> Path:
        point = tmp_path / f"disk-{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in mounted:
            subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, mode: str) -> None:
    """Switch a ``small_disk`` mount to ``ro`` or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


def fill(point: Path) -> Path:
    """Fill a filesystem to its last byte with one file; delete the file to free it."""
    filler = point / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler
