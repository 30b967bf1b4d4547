"""seq/standin/seq_standin.py (Seq's OTLP ingestion, stood in) and tests/sandbox_e2e.py.

The stand-in runs as a real local process on free ports. Its clients are real: hand-made OTLP
protobuf, otelproxy's own exporter, and the Claude Code CLI's telemetry. The last test runs the
sandbox's turn on loopback (proxy, fake upstream, stand-in, `claude -p` with a tool call) and
holds the end-to-end checks of scripts/ci-containers.sh to it, so they are known to pass on a
good run and to fail on an empty one before they ever meet a container.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from tests import sandbox_e2e
from tests.fake_upstream import CLAUDE_BIN, FakeUpstream, claude_env

STANDIN = Path(__file__).resolve().parent.parent / "seq" / "standin" / "seq_standin.py"
API_KEY = "standin-test-key"
PROTOBUF = "application/x-protobuf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Standin:
    """The stand-in as a local process: its two ports' URLs and its data directory."""

    ui_url: str
    ingest_url: str
    data: Path

    def post(self, path: str, body: bytes, content_type: str = PROTOBUF,
             key: str | None = API_KEY, gzipped: bool = False) -> int:
        headers = {"Content-Type": content_type}
        if key is not None:
            headers["X-Seq-ApiKey"] = key
        if gzipped:
            headers["Content-Encoding"] = "gzip"
            body = gzip.compress(body)
        request = urllib.request.Request(self.ingest_url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    def requests(self) -> list[dict[str, Any]]:
        log = self.data / "requests.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Standin]:
    ui_port, ingest_port = free_port(), free_port()
    env = {**os.environ, "SEQ_STANDIN_DATA": str(tmp_path / "data"),
           "SEQ_STANDIN_API_KEY": API_KEY}
    process = subprocess.Popen([sys.executable, str(STANDIN), str(ui_port), str(ingest_port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        assert b"listening" in process.stdout.readline()
        yield Standin(f"http://127.0.0.1:{ui_port}", f"http://127.0.0.1:{ingest_port}",
                      tmp_path / "data")
    finally:
        process.terminate()
        process.wait(timeout=10)


def log_request(session_id: str) -> bytes:
    """An ExportLogsServiceRequest with one record carrying `session.id`."""
    record = LogRecord(
        time_unix_nano=time.time_ns(),
        body=AnyValue(string_value="hello"),
        attributes=[KeyValue(key="session.id", value=AnyValue(string_value=session_id))],
    )
    resource = Resource(
        attributes=[KeyValue(key="service.name", value=AnyValue(string_value="otelproxy"))]
    )
    message = ExportLogsServiceRequest(resource_logs=[ResourceLogs(
        resource=resource, scope_logs=[ScopeLogs(log_records=[record])])])
    serialized: bytes = message.SerializeToString()
    return serialized


def test_standin_stores_what_it_accepts_and_refuses_a_wrong_key(standin: Standin) -> None:
    """Right key and protobuf: 200 and stored decoded (gzip too); else 401/415/404, not stored."""
    body = log_request("s-1")
    assert standin.post("/ingest/otlp/v1/logs", body) == 200
    assert standin.post("/ingest/otlp/v1/logs", body, gzipped=True) == 200
    assert standin.post("/ingest/otlp/v1/logs", body, key="wrong") == 401
    assert standin.post("/ingest/otlp/v1/logs", body, key=None) == 401
    assert standin.post("/ingest/otlp/v1/logs", b"{}", content_type="application/json") == 415
    assert standin.post("/ingest/otlp/v1/metrics", body) == 404
    stored = sorted((standin.data / "otlp").iterdir())
    assert [p.read_bytes() for p in stored] == [body, body]
    assert [r["status"] for r in standin.requests()] == [200, 200, 401, 401, 415, 404]
    assert API_KEY not in (standin.data / "requests.jsonl").read_text()
    by_service, _ = sandbox_e2e.read_seq(standin.data)
    assert [r["session.id"] for r in by_service["otelproxy"].logs] == ["s-1", "s-1"]


def test_standin_answers_health_and_ingests_on_the_ui_port(standin: Standin) -> None:
    """GET /health answers 200, and the UI port (Seq's 80) takes ingestion as Seq's does."""
    with urllib.request.urlopen(standin.ui_url + "/health", timeout=10) as response:
        assert response.status == 200
    ui = Standin(standin.ui_url, standin.ui_url, standin.data)
    assert ui.post("/ingest/otlp/v1/logs", log_request("s-2")) == 200


def test_checks_fail_on_a_run_that_left_nothing(tmp_path: Path) -> None:
    """With no answer, no record and nothing received, every check reports its failure."""
    failures = sandbox_e2e.check("", tmp_path / "record", tmp_path / "seq", "Tool said: x")
    assert len(failures) >= 6, failures


def claude_with_telemetry(base_url: str, home: str, cwd: str, seq: Standin,
                          prompt: str) -> subprocess.CompletedProcess[str]:
    """`claude -p PROMPT` with the telemetry settings claude-sandbox.sh --otel gives it."""
    if CLAUDE_BIN is None:
        pytest.fail("Claude Code CLI not found: run scripts/test.sh or set OTELPROXY_CLAUDE_BIN")
    env = claude_env(base_url, home)
    env.pop("DISABLE_TELEMETRY")
    env.update({
        "CLAUDE_CODE_ENABLE_TELEMETRY": "1",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": seq.ingest_url + "/ingest/otlp",
        "OTEL_EXPORTER_OTLP_HEADERS": f"X-Seq-ApiKey={API_KEY}",
    })
    return subprocess.run([CLAUDE_BIN, "-p", prompt, "--dangerously-skip-permissions"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_a_sandbox_turn_on_loopback_passes_the_end_to_end_checks(
    standin: Standin, make_proxy: Callable[..., Any], tmp_path: Path
) -> None:
    """Claude Code -> proxy -> fake with telemetry to the stand-in: every e2e check holds."""
    with FakeUpstream() as fake:
        proxy = make_proxy(fake, default_upstream=fake.url, default_provider="anthropic",
                           seq_url=standin.ingest_url, seq_api_key=API_KEY)
        with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as cwd:
            done = claude_with_telemetry(proxy.url, home, cwd, standin,
                                         "RUN_TOOL:echo loopback-tool-ran")
        assert done.returncode == 0, done.stderr
        proxy.flush()
        deadline = time.monotonic() + 30
        while failures := sandbox_e2e.check(done.stdout, proxy.log_dir, standin.data,
                                            "Tool said: loopback-tool-ran"):
            assert time.monotonic() < deadline, failures  # the exports are batched
            time.sleep(0.5)


def test_standin_reads_a_chunked_body(standin: Standin) -> None:
    """A `Transfer-Encoding: chunked` export (no Content-Length) is stored whole."""
    body = log_request("s-chunked")
    connection = http.client.HTTPConnection(standin.ingest_url.removeprefix("http://"), timeout=10)
    headers = {"Content-Type": PROTOBUF, "X-Seq-ApiKey": API_KEY}
    connection.request("POST", "/ingest/otlp/v1/logs", body=iter([body[:7], body[7:]]),
                       headers=headers, encode_chunked=True)
    assert connection.getresponse().status == 200
    connection.close()
    assert [p.read_bytes() for p in (standin.data / "otlp").iterdir()] == [body]
    assert standin.requests()[0]["chunked"] is True
