"""Shared fixtures: a real fake upstream and a real otelproxy, each on loopback in its own loop."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from otelproxy import config as config_module
from otelproxy.server import Server
from tests.fake_upstream import FakeUpstream, LoopThread


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
        assert self.server.pipeline.flush(10), "record did not flush in 10 s"

    def entries(self, pattern: str = "*/*.jsonl") -> list[dict[str, Any]]:
        """Every JSONL entry under the log dir (after a flush), files in name order."""
        self.flush()
        out: list[dict[str, Any]] = []
        for path in sorted(self.log_dir.glob(pattern)):
            out.extend(orjson.loads(line) for line in path.read_bytes().splitlines())
        return out

    def db(self) -> sqlite3.Connection:
        self.flush()
        conn = sqlite3.connect(self.log_dir / "sessions.db")
        conn.row_factory = sqlite3.Row
        return conn

    def stop(self) -> None:
        self.loop.run(self.server.stop())
        self.loop.stop()


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
