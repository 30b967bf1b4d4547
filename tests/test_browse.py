"""`otelproxy sessions` and `otelproxy show` read the index while the proxy runs."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import anthropic
import orjson
import pytest

from otelproxy.browse import parse_since
from otelproxy.errors import ConfigError
from tests.conftest import RunningProxy
from tests.test_sessions import KEY, five_turns


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "otelproxy", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def recorded(proxy: RunningProxy, fake) -> tuple[RunningProxy, str]:
    client = anthropic.Anthropic(base_url=proxy.base(), api_key=KEY, max_retries=0)
    chat = five_turns(fake, client)
    chat.fork(2).send("branch question")
    proxy.flush()
    with proxy.db() as conn:
        root = conn.execute("SELECT id FROM sessions WHERE parent_id IS NULL").fetchone()["id"]
    return proxy, root


def test_sessions_lists_newest_first_as_json(recorded):
    """`sessions --json` lists root and branch with turns, forks and tokens, newest first."""
    proxy, root = recorded
    result = cli("sessions", "--log-dir", str(proxy.log_dir), "--json")
    assert result.returncode == 0, result.stderr
    rows = orjson.loads(result.stdout)
    assert [row["id"] for row in rows] == [f"{root}_b1", root]
    assert rows[1]["turns"] == 5 and rows[1]["forks"] == 1
    assert rows[0]["turns"] == 3 and rows[0]["parent_id"] == root
    assert rows[1]["output_tokens"] > 0 and rows[1]["model"] == "claude-test-1"


def test_sessions_filters_and_table(recorded):
    """--provider and --since filter; the table output names every session."""
    proxy, root = recorded
    table = cli("sessions", "--log-dir", str(proxy.log_dir))
    assert table.returncode == 0 and root in table.stdout and f"{root}_b1" in table.stdout
    none = cli("sessions", "--log-dir", str(proxy.log_dir), "--provider", "openai", "--json")
    assert orjson.loads(none.stdout) == []
    future = cli("sessions", "--log-dir", str(proxy.log_dir), "--since", "2999-01-01", "--json")
    assert orjson.loads(future.stdout) == []
    recent = cli("sessions", "--log-dir", str(proxy.log_dir), "--since", "1h", "--json")
    assert len(orjson.loads(recent.stdout)) == 2


def test_show_branch_includes_inherited_turns_and_tree(recorded):
    """`show` of a branch prints inherited turns up to the fork point, its own turn and the tree."""
    proxy, root = recorded
    result = cli("show", f"{root}_b1", "--json", env={"OTELPROXY_LOG_DIR": str(proxy.log_dir)})
    assert result.returncode == 0, result.stderr
    data = orjson.loads(result.stdout)
    assert [(t["seq"], t["session_id"]) for t in data["turns"]] == [
        (1, root), (2, root), (3, f"{root}_b1")]
    assert data["turns"][2]["user_preview"] == "branch question"
    assert data["turns"][1]["assistant_preview"] == "Running it."
    assert data["tree"]["id"] == root
    assert data["tree"]["branches"][0]["id"] == f"{root}_b1"
    assert data["tree"]["branches"][0]["fork_from_seq"] == 2
    text = cli("show", root, "--log-dir", str(proxy.log_dir)).stdout
    assert "[tool_result] sunny, 21C" in text and "(branch, forked at seq 2)" in text


def test_show_unknown_session_and_missing_record(tmp_path, recorded):
    """An unknown session id exits 1; a log dir without a record exits 2 with one line."""
    proxy, _ = recorded
    missing = cli("show", "nope", "--log-dir", str(proxy.log_dir))
    assert missing.returncode == 1 and "no session 'nope'" in missing.stderr
    empty = cli("sessions", "--log-dir", str(tmp_path / "empty"))
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1


def test_parse_since():
    """--since accepts relative spans and ISO times, and rejects anything else."""
    now = datetime(2026, 1, 13, 12, 0, tzinfo=UTC)
    assert parse_since("2h", now) == "2026-01-13T10:00:00.000000Z"
    assert parse_since("2026-01-01", now) == "2026-01-01T00:00:00.000000Z"
    with pytest.raises(ConfigError):
        parse_since("yesterday", now)


def test_agent_tree_and_client_session_filter(proxy: RunningProxy, fake):
    """`show` prints the agent tree (subagent under the spawning turn, nested under its parent
    agent); `sessions --client-session` keeps one Claude Code session's sessions only."""
    client_id = "0d1f5c2e-1111-4222-8333-944445555666"

    def agent(agent_id=None, parent=None, **more):
        headers = {"X-Claude-Code-Session-Id": more.get("client", client_id)}
        if agent_id:
            headers["X-Claude-Code-Agent-Id"] = agent_id
        if parent:
            headers["X-Claude-Code-Parent-Agent-Id"] = parent
        return anthropic.Anthropic(base_url=proxy.base(), api_key=KEY, max_retries=0,
                                   default_headers=headers)

    def ask(client, text):
        return client.messages.create(model="claude-test-1", max_tokens=20,
                                      messages=[{"role": "user", "content": text}])

    ask(agent(), "RUN_AGENT: RUN_AGENT: dig deeper")
    ask(agent("outer"), "RUN_AGENT: dig deeper")
    ask(agent("inner", parent="outer"), "dig deeper")
    ask(agent(client="another-client"), "unrelated")
    proxy.flush()
    log_dir = str(proxy.log_dir)
    rows = orjson.loads(cli("sessions", "--log-dir", log_dir, "--client-session", client_id,
                            "--json").stdout)
    assert len(rows) == 3 and {row["client_session_id"] for row in rows} == {client_id}
    by_agent = {row["agent_id"]: row for row in rows}
    main, outer, inner = by_agent[None], by_agent["outer"], by_agent["inner"]
    assert (outer["kind"], outer["parent_id"], outer["fork_from_seq"]) == ("subagent",
                                                                            main["id"], 1)
    assert (inner["parent_id"], inner["parent_agent_id"]) == (outer["id"], "outer")
    text = cli("show", inner["id"], "--log-dir", log_dir).stdout
    assert "agent inner (parent agent outer)" in text
    tree = text.split("branches, forks and agents:\n", 1)[1].splitlines()
    assert tree[:3] == [
        f"{main['id']}, 1 turn(s)",
        f"  └─ {outer['id']} (subagent outer, spawned at seq 1), 1 turn(s)",
        f"    └─ {inner['id']} (subagent inner, spawned at seq 1), 1 turn(s) *",
    ]
