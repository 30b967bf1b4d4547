"""The real Claude Code CLI (`claude -p`) through the proxy to the fake upstream.

The CLI must be installed (CI: `npm install` at the repo root; locally OTELPROXY_CLAUDE_BIN,
node_modules/.bin/claude, /tmp/cc/node_modules/.bin/claude or PATH). A missing CLI fails these
tests: they are the proof that the product works with its first client.
"""

from __future__ import annotations

import subprocess
import tempfile
from typing import Any

import pytest

from otelproxy.redact import redact_bytes
from tests.conftest import RunningProxy
from tests.fake_upstream import (
    CLAUDE_BIN,
    DUMMY_ANTHROPIC_API_KEY,
    FakeUpstream,
    ReceivedRequest,
    claude_env,
)


def claude_bin() -> str:
    if CLAUDE_BIN is None:
        pytest.fail("Claude Code CLI not found: run `npm install` at the repo root or set "
                    "OTELPROXY_CLAUDE_BIN")
    return CLAUDE_BIN


def run_claude(base_url: str, home: str, cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [claude_bin(), "-p", *args, "--dangerously-skip-permissions"],
        env=claude_env(base_url, home), cwd=cwd, capture_output=True, text=True, timeout=180,
    )


def recorded_calls(proxy: RunningProxy) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(request entry, response entry) pairs of /v1/messages, oldest first."""
    entries = proxy.entries()
    responses = {e["exchange_id"]: e for e in entries if e["type"] == "response"}
    requests = sorted((e for e in entries if e["type"] == "request"
                       and e["path"] == "/v1/messages"), key=lambda e: e["ts"])
    return [(request, responses[request["exchange_id"]]) for request in requests]


def check_recorded(proxy: RunningProxy, calls: list[ReceivedRequest]) -> str:
    """Every model call the fake saw is in the record, complete, with the CLI's session header;
    returns that session id."""
    recorded = recorded_calls(proxy)
    assert len(recorded) == len(calls) >= 1
    session_ids = set()
    for (request, response), call in zip(recorded, calls, strict=True):
        headers = request["headers"]
        session_id = headers["x-claude-code-session-id"]
        assert session_id == call.header("X-Claude-Code-Session-Id")
        session_ids.add(session_id)
        assert request["query"] == "beta=true" and headers["x-app"] == "cli"
        assert headers["user-agent"].startswith("claude-cli/")
        assert headers["anthropic-version"] == call.header("anthropic-version")
        assert headers["x-api-key"] == "sk-ant-...AAAA"
        assert call.header("x-api-key") == DUMMY_ANTHROPIC_API_KEY  # forwarded whole
        assert proxy.request_bytes(request) == redact_bytes(call.body)  # the bytes, as recorded
        assert response["status"] == 200 and response["outcome"] == "complete"
        assert response["chunks"][-1]["raw"].startswith("event: message_stop")
    assert len(session_ids) == 1
    with proxy.db() as db:
        rows = db.execute("SELECT id FROM exchanges WHERE path = '/v1/messages'").fetchall()
    assert {row["id"] for row in rows} == {request["exchange_id"] for request, _ in recorded}
    return session_ids.pop()


def test_claude_p_through_the_prefixed_base_url(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """`claude -p` via /anthropic/{fake} prints the answer; recorded with its session id header."""
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as cwd:
        result = run_claude(proxy.base("anthropic"), home, cwd, "say hello to the proxy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Echo: say hello to the proxy"
    calls = fake.model_calls()
    assert all(call.path == "/v1/messages" for call in calls)
    check_recorded(proxy, calls)


def test_claude_p_through_the_default_upstream(make_proxy: Any, fake: FakeUpstream) -> None:
    """ANTHROPIC_BASE_URL=proxy root with --default-upstream: the same works without a prefix."""
    running = make_proxy(fake, default_upstream=fake.url, default_provider="anthropic")
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as cwd:
        result = run_claude(running.url, home, cwd, "no prefix needed")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Echo: no prefix needed"
    check_recorded(running, fake.model_calls())


def test_claude_tool_loop_and_continue_through_the_proxy(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """A Bash tool turn and --continue run through the proxy, all under one recorded session id."""
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as cwd:
        first = run_claude(proxy.base(), home, cwd, "RUN_TOOL:echo via-proxy")
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip() == "Tool said: via-proxy"
        second = run_claude(proxy.base(), home, cwd, "--continue", "and again")
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == "Echo: and again"
    calls = fake.model_calls()
    assert len(calls) == 3
    tool_result = calls[1].json()["messages"][-1]["content"][0]
    assert tool_result["type"] == "tool_result" and tool_result["content"].strip() == "via-proxy"
    check_recorded(proxy, calls)
