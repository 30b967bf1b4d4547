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
from otelproxy.redact import redact_bytes
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


def test_show_raw_gives_back_every_recorded_body_byte_for_byte(recorded, fake):
    """`show --raw SEQ` writes each request body exactly as the upstream received it, whether
    recorded whole or as a delta, branch turns included (and --response the answer's events)."""
    proxy, root = recorded
    calls = fake.model_calls()
    turns = [(root, n, calls[n - 1]) for n in range(1, 6)] + [(f"{root}_b1", 3, calls[5])]
    for session, seq, call in turns:
        raw = subprocess.run([sys.executable, "-m", "otelproxy", "show", session, "--raw",
                              str(seq), "--log-dir", str(proxy.log_dir)],
                             capture_output=True, timeout=60)
        assert raw.returncode == 0, raw.stderr
        assert raw.stdout == redact_bytes(call.body)
    answer = subprocess.run([sys.executable, "-m", "otelproxy", "show", root, "--raw", "2",
                             "--response", "--log-dir", str(proxy.log_dir)],
                            capture_output=True, timeout=60)
    assert answer.stdout.startswith(b"event: message_start") and b"message_stop" in answer.stdout
    missing = cli("show", root, "--raw", "9", "--log-dir", str(proxy.log_dir))
    assert missing.returncode == 1 and "no turn 9" in missing.stderr


def test_long_prompt_turns_are_recorded_as_deltas_and_rebuilt(proxy: RunningProxy, fake):
    """With a 15 KB system prompt every turn after the first is a small delta entry naming the
    previous turn, and each rebuilds to the bytes the upstream received."""
    client = anthropic.Anthropic(base_url=proxy.base(), api_key=KEY, max_retries=0)
    system = "You follow the house rules. " * 550
    messages: list = []
    for n in range(1, 7):
        messages.append({"role": "user", "content": f"question {n}: " + "détail " * 40})
        reply = client.messages.create(model="claude-test-1", max_tokens=50, system=system,
                                       messages=messages)
        messages.append({"role": "assistant", "content": reply.content[0].text})
    calls = fake.model_calls()
    proxy.flush()
    [session_file] = proxy.log_dir.glob("anthropic/2*.jsonl")
    requests = [e for e in proxy.entries(f"anthropic/{session_file.name}")
                if e["type"] == "request"]
    assert "body" in requests[0]
    for previous, entry, call in zip(requests, requests[1:], calls[1:], strict=False):
        assert "body" not in entry and entry["body_delta"]["base"] == previous["exchange_id"]
        assert len(orjson.dumps(entry["body_delta"])) < len(call.body) // 5
    for seq, call in enumerate(calls, 1):
        raw = subprocess.run([sys.executable, "-m", "otelproxy", "show", requests[0]["session_id"],
                              "--raw", str(seq), "--log-dir", str(proxy.log_dir)],
                             capture_output=True, timeout=60)
        assert raw.returncode == 0 and raw.stdout == call.body
