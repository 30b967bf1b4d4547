"""What the sandbox's end-to-end run must leave behind, checked (scripts/ci-containers.sh).

The CI script runs `claude-sandbox.sh --otel --log-api mount -- -p "RUN_TOOL:echo ..."` with the
Seq stand-in (seq/standin/) as Seq and the fake upstream as Anthropic, copies the proxy's record
volume and the stand-in's data out of the containers, and runs

    python -m tests.sandbox_e2e --answer ANSWER_FILE --record RECORD_DIR --seq SEQ_DIR \
        --expect-answer TEXT

It exits 0 when everything holds and 1 with one line per failed check otherwise (the script
retries while the exports may still be on their way). What must hold:

- the answer Claude Code printed holds TEXT (the fake's reply to the tool result);
- the record (JSONL and SQLite index) holds the turns of the tool loop, all in one session, and
  every model call carries one `X-Claude-Code-Session-Id`;
- the stand-in accepted every export, each with the right `X-Seq-ApiKey`, and received the
  proxy's spans and log records carrying that `session.id` (decoded with opentelemetry-proto);
- Claude Code's own telemetry arrived too: log records from `service.name = claude-code`,
  whose `session.id` is the `client.session_id` the proxy saw.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otelproxy.compact import DeltaError, request_body
from tests.otlp_receiver import attributes

PROXY_SERVICE = "otelproxy"
CLAUDE_CODE_SERVICE = "claude-code"


@dataclass
class Telemetry:
    """What one service sent: its spans' and log records' attributes."""

    spans: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)


def read_seq(seq_dir: Path) -> tuple[dict[str, Telemetry], list[dict[str, Any]]]:
    """The stand-in's stored exports decoded, by `service.name`; and its request log."""
    by_service: dict[str, Telemetry] = {}
    for path in sorted((seq_dir / "otlp").glob("*.pb")):
        traces = path.name.endswith("-traces.pb")
        request = ExportTraceServiceRequest if traces else ExportLogsServiceRequest
        message = request.FromString(path.read_bytes())
        for resource in message.resource_spans if traces else message.resource_logs:
            service = str(attributes(resource.resource.attributes).get("service.name"))
            telemetry = by_service.setdefault(service, Telemetry())
            target = telemetry.spans if traces else telemetry.logs
            for scope in resource.scope_spans if traces else resource.scope_logs:
                items = scope.spans if traces else scope.log_records
                target.extend(attributes(item.attributes) for item in items)
    requests_file = seq_dir / "requests.jsonl"
    requests = []
    if requests_file.exists():
        requests = [json.loads(line) for line in requests_file.read_text().splitlines()]
    return by_service, requests


def read_record(record_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every JSONL entry of the record, and the SQLite index's (exchange id, session id)."""
    entries = [
        json.loads(line)
        for path in sorted(record_dir.rglob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    indexed: list[tuple[str, str]] = []
    database = record_dir / "sessions.db"
    if database.exists():
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
            indexed = list(conn.execute("SELECT id, session_id FROM exchanges ORDER BY ts"))
    return entries, indexed


def check(answer: str, record_dir: Path, seq_dir: Path, expect_answer: str,
          min_turns: int = 2) -> list[str]:
    """Every failed expectation as one line; empty when the run did everything it should."""
    failures: list[str] = []
    if expect_answer not in answer:
        failures.append(f"the answer printed lacks {expect_answer!r}: {answer[-300:]!r}")

    entries, indexed = read_record(record_dir)
    calls = [e for e in entries if e.get("type") == "request" and e.get("path") == "/v1/messages"]
    # Claude Code also asks for a title (a conversation of its own, so a session of its own);
    # the tool loop is the session whose last turn carries the tool's result. A later turn's
    # body is recorded as a delta against the one before: rebuilt here, hash checked.
    by_id = {e["exchange_id"]: e for e in entries if e.get("type") == "request"}
    loop_sessions = set()
    for call in calls:
        try:
            body = request_body(call, by_id.__getitem__)
        except (DeltaError, KeyError) as error:
            failures.append(f"the body of {call.get('exchange_id')} does not rebuild: {error!r}")
            continue
        if b'"tool_result"' in body:
            loop_sessions.add(call.get("session_id"))
    session_id = next(iter(loop_sessions)) if len(loop_sessions) == 1 else None
    turns = [e for e in entries if e.get("type") == "response" and e.get("status") == 200
             and session_id is not None and e.get("session_id") == session_id]
    if session_id is None or len(turns) < min_turns:
        failures.append(f"the record holds {len(turns)} answered turn(s) of the tool loop in "
                        f"sessions {sorted(map(str, loop_sessions))}, expected {min_turns} "
                        "in one session")
    client_sessions = {str(e["headers"].get("x-claude-code-session-id")) for e in calls}
    if len(client_sessions) != 1:
        failures.append(f"the model calls carry X-Claude-Code-Session-Id {sorted(client_sessions)}"
                        ", expected one")
    if session_id is None or [s for _, s in indexed].count(session_id) < min_turns:
        failures.append(f"the SQLite index holds {indexed}, expected {min_turns} exchanges "
                        f"of session {session_id}")

    by_service, requests = read_seq(seq_dir)
    refused = [r for r in requests if r["status"] != 200 or not r["api_key_matches"]]
    if not requests or refused:
        failures.append(f"the stand-in refused or got no exports: {refused or 'none arrived'}")
    proxy = by_service.get(PROXY_SERVICE, Telemetry())
    proxy_spans = [s for s in proxy.spans if s.get("session.id") == session_id]
    proxy_logs = [r for r in proxy.logs if r.get("session.id") == session_id]
    if len(proxy_spans) < min_turns:
        failures.append(f"{len(proxy_spans)} proxy span(s) with session.id {session_id}, "
                        f"expected {min_turns} (services: {sorted(by_service)})")
    if len(proxy_logs) < min_turns:
        failures.append(f"{len(proxy_logs)} proxy log record(s) with session.id {session_id}, "
                        f"expected at least {min_turns}")
    claude = by_service.get(CLAUDE_CODE_SERVICE, Telemetry())
    claude_sessions = {r.get("session.id") for r in claude.logs}
    if not claude.logs:
        failures.append(f"no log records from {CLAUDE_CODE_SERVICE} "
                        f"(services: {sorted(by_service)})")
    elif not client_sessions or not client_sessions <= claude_sessions:
        failures.append(f"Claude Code's telemetry has session.id "
                        f"{sorted(map(str, claude_sessions))}, the proxy saw "
                        f"X-Claude-Code-Session-Id {sorted(client_sessions)}")
    return failures


def summary(record_dir: Path, seq_dir: Path) -> str:
    """One line of counts for the CI log."""
    entries, indexed = read_record(record_dir)
    by_service, requests = read_seq(seq_dir)
    parts = [f"record: {len(entries)} JSONL entries, {len(indexed)} indexed exchanges",
             f"stand-in: {len(requests)} exports"]
    parts += [f"{name}: {len(t.spans)} spans, {len(t.logs)} log records"
              for name, t in sorted(by_service.items())]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sandbox_e2e")
    parser.add_argument("--answer", type=Path, required=True, help="Claude Code's stdout")
    parser.add_argument("--record", type=Path, required=True, help="the proxy's record")
    parser.add_argument("--seq", type=Path, required=True, help="the stand-in's /data")
    parser.add_argument("--expect-answer", required=True)
    ns = parser.parse_args(argv)
    failures = check(ns.answer.read_text(errors="replace"), ns.record, ns.seq, ns.expect_answer)
    for failure in failures:
        print(f"sandbox_e2e: FAIL {failure}", file=sys.stderr)
    if not failures:
        print(f"sandbox_e2e: ok; {summary(ns.record, ns.seq)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
