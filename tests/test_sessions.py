"""Session and fork detection on traffic from the real anthropic and openai SDKs."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import orjson
import pytest

from otelproxy.redact import redact_bytes
from otelproxy.sessions import (
    Histories,
    conversation,
    fingerprint,
    normalise_message,
    system_fingerprint,
)
from tests.conftest import RunningProxy
from tests.fake_upstream import (
    FakeUpstream,
    Reply,
    _last_user_turn,
    run_claude,
)

MODEL = "claude-test-1"
KEY = "sk-ant-api03-" + "k" * 40 + "ABCD"


def thinking_reply(text: str) -> Reply:
    return Reply(blocks=[
        {"type": "thinking", "thinking": f"Let me think about {text}.", "signature": "sig-" + text},
        {"type": "text", "text": text},
    ])


def tool_reply(name: str, tool_input: dict[str, Any]) -> Reply:
    return Reply(blocks=[
        {"type": "thinking", "thinking": "I need a tool.", "signature": "sig-tool"},
        {"type": "text", "text": "Running it."},
        {"type": "tool_use", "id": f"toolu_{name}", "name": name, "input": tool_input},
    ])


class Conversation:
    """A client-side conversation kept the way SDK users keep it (assistant content appended)."""

    def __init__(self, client: anthropic.Anthropic, messages: list[dict[str, Any]] | None = None):
        self.client = client
        self.messages: list[dict[str, Any]] = list(messages or [])

    def send(self, content: Any, stream: bool = True) -> anthropic.types.Message:
        self.messages.append({"role": "user", "content": content})
        kwargs: dict[str, Any] = {
            "model": MODEL, "max_tokens": 1024, "messages": self.messages,
            "system": [{"type": "text", "text": "You are terse.",
                        "cache_control": {"type": "ephemeral"}}],
            "thinking": {"type": "enabled", "budget_tokens": 512},
        }
        if stream:
            with self.client.messages.stream(**kwargs) as events:
                message = events.get_final_message()
        else:
            message = self.client.messages.create(**kwargs)
        self.messages.append({"role": "assistant", "content": message.content})
        return message

    def fork(self, keep_turns: int) -> Conversation:
        """A copy of the conversation rewound to just after turn ``keep_turns``."""
        return Conversation(self.client, self.messages[: 2 * keep_turns])


def turns(proxy: RunningProxy) -> list[tuple[str, int]]:
    with proxy.db() as conn:
        rows = conn.execute(
            "SELECT session_id, seq FROM exchanges WHERE session_id IS NOT NULL ORDER BY ts"
        ).fetchall()
    return [(row["session_id"], row["seq"]) for row in rows]


def exchanges_summary(proxy: RunningProxy) -> list[tuple[Any, ...]]:
    """What an assertion on turns shows when it fails: every exchange, in arrival order."""
    with proxy.db() as conn:
        rows = conn.execute("SELECT ts, session_id, seq, status, outcome, stop_reason"
                            " FROM exchanges ORDER BY ts").fetchall()
    return [tuple(row) for row in rows]


def session_row(proxy: RunningProxy, session_id: str) -> dict[str, Any]:
    with proxy.db() as conn:
        row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    assert row is not None, session_id
    return dict(row)


@pytest.fixture
def client(proxy: RunningProxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.base("anthropic"), api_key=KEY, max_retries=0)


def five_turns(fake: FakeUpstream, client: anthropic.Anthropic) -> Conversation:
    chat = Conversation(client)
    fake.replies.append(thinking_reply("one"))
    chat.send("turn one")
    fake.replies.append(tool_reply("get_weather", {"city": "Paris", "days": [1, 2]}))
    chat.send([{"type": "text", "text": "weather?", "cache_control": {"type": "ephemeral"}}])
    fake.replies.append(thinking_reply("sunny"))
    chat.send([{"type": "tool_result", "tool_use_id": "toolu_get_weather",
                "content": "sunny, 21C"}])
    fake.replies.append(thinking_reply("four"))
    chat.send("turn four", stream=False)
    fake.replies.append(thinking_reply("five"))
    chat.send("turn five")
    return chat


def test_five_turn_tool_loop_is_one_session(proxy, fake, client):
    """A streamed five-turn conversation with thinking and a tool loop is one session, seq 1..5."""
    five_turns(fake, client)
    recorded = turns(proxy)
    assert len({sid for sid, _ in recorded}) == 1
    assert [seq for _, seq in recorded] == [1, 2, 3, 4, 5]
    session_id = recorded[0][0]
    row = session_row(proxy, session_id)
    assert row["last_seq"] == 5 and row["parent_id"] is None
    assert row["model"] == MODEL
    assert row["output_tokens"] > 0
    entries = proxy.entries(f"anthropic/{session_id}.jsonl")
    assert [e["type"] for e in entries] == ["session_start"] + ["request", "response"] * 5
    assert [e["seq"] for e in entries if e["type"] == "request"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("from_turn", [1, 2, 3])
def test_fork_from_earlier_turn_gets_a_branch(proxy, fake, client, from_turn):
    """Rewinding to turn k and diverging gives branch {parent}_b1 with from_seq k."""
    chat = five_turns(fake, client)
    parent_id = turns(proxy)[0][0]
    branch = chat.fork(from_turn)
    fake.replies.append(thinking_reply("branched"))
    branch.send("a different question")

    session_id, seq = turns(proxy)[-1]
    assert session_id == f"{parent_id}_b1"
    assert seq == from_turn + 1
    row = session_row(proxy, session_id)
    assert row["parent_id"] == parent_id and row["fork_from_seq"] == from_turn
    entries = proxy.entries(f"anthropic/{session_id}.jsonl")
    kinds = [e["type"] for e in entries]
    assert kinds == ["session_start"] + ["request", "response"] * from_turn + [
        "fork", "request", "response"]
    fork = entries[kinds.index("fork")]
    assert fork["from_seq"] == from_turn and fork["parent_session"] == parent_id
    parent_entries = proxy.entries(f"anthropic/{parent_id}.jsonl")
    assert entries[: 1 + 2 * from_turn] == parent_entries[: 1 + 2 * from_turn]


def test_original_and_branch_each_continue_on_their_own(proxy, fake, client):
    """After a fork, the original continues on the original and the branch on the branch."""
    chat = five_turns(fake, client)
    parent_id = turns(proxy)[0][0]
    branch = chat.fork(2)
    fake.replies.append(thinking_reply("b"))
    branch.send("branch turn")
    fake.replies.append(thinking_reply("six"))
    chat.send("turn six")
    assert turns(proxy)[-1] == (parent_id, 6)
    fake.replies.append(thinking_reply("b2"))
    branch.send("branch turn two")
    assert turns(proxy)[-1] == (f"{parent_id}_b1", 4)
    second = chat.fork(1)
    fake.replies.append(thinking_reply("c"))
    second.send("another rewind")
    assert turns(proxy)[-1] == (f"{parent_id}_b2", 2)


def test_failed_turn_does_not_advance_state(proxy, fake, client):
    """A 529 then a retry of the same turn continues the session instead of forking it."""
    chat = Conversation(client)
    fake.replies.append(thinking_reply("one"))
    chat.send("hello")
    fake.replies.append(Reply(status=529))
    with pytest.raises(anthropic.APIStatusError):
        chat.send("second")
    chat.messages.pop()
    fake.replies.append(thinking_reply("two"))
    chat.send("second")
    recorded = turns(proxy)
    assert len({sid for sid, _ in recorded}) == 1
    assert [seq for _, seq in recorded] == [1, 2, 3]


def test_new_first_turn_always_starts_a_session(proxy, fake, client):
    """Two identical one-message requests are two sessions (len(messages) == 1 rule)."""
    for _ in range(2):
        Conversation(client).send("same opening")
    recorded = turns(proxy)
    assert len({sid for sid, _ in recorded}) == 2


def test_identical_first_turns_from_two_clients_stay_apart(proxy, fake):
    """Concurrent conversations with identical turns but different client session ids stay apart."""
    def run(client_id: str, results: dict[str, list[str]]) -> None:
        client = anthropic.Anthropic(
            base_url=proxy.base("anthropic"), api_key=KEY, max_retries=0,
            default_headers={"X-Claude-Code-Session-Id": client_id})
        chat = Conversation(client)
        for text in ("same opening", "same second", "same third"):
            chat.send(text)
        results[client_id] = []

    results: dict[str, list[str]] = {}
    threads = [threading.Thread(target=run, args=(cid, results))
               for cid in ("client-a", "client-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(results) == {"client-a", "client-b"}
    with proxy.db() as conn:
        rows = conn.execute(
            "SELECT s.client_session_id AS cid, e.session_id AS sid, e.seq AS seq FROM exchanges e"
            " JOIN sessions s ON s.id = e.session_id ORDER BY e.ts").fetchall()
    by_client: dict[str, set[str]] = {}
    for row in rows:
        by_client.setdefault(row["cid"], set()).add(row["sid"])
    assert {cid: len(sids) for cid, sids in by_client.items()} == {"client-a": 1, "client-b": 1}
    assert by_client["client-a"] != by_client["client-b"]
    seqs = sorted(row["seq"] for row in rows if row["cid"] == "client-a")
    assert seqs == [1, 2, 3]


def test_restart_continues_the_same_session(fake, tmp_path):
    """A proxy restarted on the same log dir continues sessions it recorded before."""
    log_dir = tmp_path / "logs"
    first = RunningProxy(fake, log_dir)
    client = anthropic.Anthropic(base_url=first.base(), api_key=KEY, max_retries=0)
    chat = Conversation(client)
    chat.send("before restart")
    session_id = turns(first)[0][0]
    first.stop()
    second = RunningProxy(fake, log_dir)
    try:
        chat.client = anthropic.Anthropic(base_url=second.base(), api_key=KEY, max_retries=0)
        chat.send("after restart")
        assert turns(second)[-1] == (session_id, 2)
        kinds = [e["type"] for e in second.entries(f"anthropic/{session_id}.jsonl")]
        assert kinds == ["session_start", "request", "response", "request", "response"]
    finally:
        second.stop()


def test_openai_chat_streamed_tool_calls_one_session_and_fork(proxy, fake):
    """OpenAI chat with streamed tool calls stays one session; a rewind forks it."""
    client = openai.OpenAI(base_url=proxy.base("openai") + "/v1", api_key="sk-proj-" + "p" * 40,
                           max_retries=0)
    messages: list[Any] = [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "weather in Paris?"}]
    fake.replies.append(Reply(blocks=[{"type": "tool_use", "id": "call_1", "name": "weather",
                                       "input": {"city": "Paris"}}]))
    with client.chat.completions.stream(model="gpt-5", messages=messages) as stream:
        completion = stream.get_final_completion()
    assistant = completion.choices[0].message
    messages.append(assistant.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": assistant.tool_calls[0].id,
                     "content": "sunny"})
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "It is sunny."}]))
    with client.chat.completions.stream(model="gpt-5", messages=messages) as stream:
        completion = stream.get_final_completion()
    messages.append(completion.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "user", "content": "and tomorrow?"})
    client.chat.completions.create(model="gpt-5", messages=messages, stream=False)
    recorded = turns(proxy)
    assert [seq for _, seq in recorded] == [1, 2, 3], exchanges_summary(proxy)
    assert len({sid for sid, _ in recorded}) == 1, exchanges_summary(proxy)
    # Rewind to after turn 2 (the answer to the tool result), with a new system prompt.
    rewound = [{"role": "system", "content": "a different system prompt"}, *messages[1:5],
               {"role": "user", "content": "rather Rome?"}]
    client.chat.completions.create(model="gpt-5", messages=rewound)
    assert turns(proxy)[-1] == (f"{recorded[0][0]}_b1", 3)


def test_openai_responses_chain_by_previous_response_id(proxy, fake):
    """A Responses API chain linked by previous_response_id is one session, seq 1..3."""
    client = openai.OpenAI(base_url=proxy.base("openai") + "/v1", api_key="sk-proj-" + "r" * 40,
                           max_retries=0)
    first = client.responses.create(model="gpt-5", input="hello")
    with client.responses.stream(model="gpt-5", input="again",
                                 previous_response_id=first.id) as stream:
        second = stream.get_final_response()
    client.responses.create(model="gpt-5", input=[{"role": "user", "content": "third"}],
                            previous_response_id=second.id)
    recorded = turns(proxy)
    assert [seq for _, seq in recorded] == [1, 2, 3]
    assert len({sid for sid, _ in recorded}) == 1
    client.responses.create(model="gpt-5", input="fork", previous_response_id=first.id)
    assert turns(proxy)[-1] == (f"{recorded[0][0]}_b1", 2)


def test_normalisation_rules():
    """A string equals one text block; cache_control, thinking, empties, SDK keys don't count."""
    plain = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    decorated = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "hi",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "yo", "citations": None}]},
    ]
    assert fingerprint(conversation(plain)) == fingerprint(conversation(decorated))
    sdk_tool = {"role": "assistant", "content": "", "refusal": None, "tool_calls": [
        {"index": 0, "id": "c1", "type": "function",
         "function": {"name": "f", "arguments": "{}"}}]}
    wire_tool = {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert normalise_message(sdk_tool) == normalise_message(wire_tool)
    assert system_fingerprint("sys", []) == system_fingerprint(
        [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}], [])
    assert fingerprint(conversation(plain)) != fingerprint(
        conversation([*plain[:1], {"role": "assistant", "content": "other"}]))


def _random_message(rng: random.Random) -> Any:
    role = rng.choice(["user", "assistant", "user", "system", "developer"])
    content = rng.choice([
        "", f"text {rng.random()}", [],
        [{"type": "text", "text": "t", "cache_control": {"type": "ephemeral"}}],
        [{"type": "thinking", "thinking": "hmm", "signature": "s"}],
        [{"type": "tool_result", "tool_use_id": "x", "content": f"r{rng.randint(0, 3)}"}],
    ])
    return rng.choice([{"role": role, "content": content}, {"type": "reasoning", "id": "r"},
                       {"role": role, "content": content, "refusal": None}])


def test_a_history_built_on_from_an_earlier_request_equals_the_whole_computation():
    """``Histories`` reuses what the same leading message objects gave and normalises the rest:
    over random growth, rewinds, replaced histories and edits its messages, fingerprints and
    system entries are those computed whole."""
    rng = random.Random(3)
    histories = Histories()
    raw: list[Any] = []
    for _ in range(600):
        choice = rng.random()
        if choice < 0.6:
            raw = raw + [_random_message(rng) for _ in range(rng.randint(1, 3))]
        elif choice < 0.75 and raw:
            raw = raw[:rng.randint(1, len(raw))]
        elif choice < 0.85 and raw:
            raw = list(raw)
            raw[rng.randrange(len(raw))] = _random_message(rng)  # an edited message: new object
        else:
            raw = [_random_message(rng) for _ in range(rng.randint(0, 3))]
        history = histories.of(raw)
        whole = conversation(raw)
        assert history.messages == whole
        for count in range(len(whole) + 1):
            assert history.fingerprint(count) == fingerprint(whole[:count])
        extra = conversation([_random_message(rng)])
        assert history.fingerprint(len(whole), extra) == fingerprint(whole + extra)
        assert system_fingerprint("s", [], history.system_entries()) == \
            system_fingerprint("s", raw)


def claude_turn(proxy: RunningProxy, home: str, cwd: str, *args: str) -> str:
    result = run_claude(["-p", "--dangerously-skip-permissions", *args],
                        base_url=proxy.base("anthropic"), home=home, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_claude_code_tool_loop_and_continue_is_one_session(proxy, fake, tmp_path):
    """claude -p with a tool loop, then --continue: one session, consecutive seq, client id kept."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    out = claude_turn(proxy, str(home), str(work), "RUN_TOOL:echo fake-tool-ran")
    assert "fake-tool-ran" in out
    out = claude_turn(proxy, str(home), str(work), "--continue", "second question")
    assert "second question" in out
    calls = fake.model_calls()
    assert len(calls) == 3
    client_id = calls[0].header("X-Claude-Code-Session-Id")
    assert client_id
    with proxy.db() as conn:
        rows = conn.execute(
            "SELECT session_id, seq FROM exchanges WHERE path = '/v1/messages' ORDER BY ts"
        ).fetchall()
        session = conn.execute("SELECT * FROM sessions").fetchall()
    assert [(r["session_id"], r["seq"]) for r in rows] == [(rows[0]["session_id"], n)
                                                          for n in (1, 2, 3)]
    assert len(session) == 1 and session[0]["client_session_id"] == client_id
    start = proxy.entries(f"anthropic/{rows[0]['session_id']}.jsonl")[0]
    assert start["type"] == "session_start" and start["client_session_id"] == client_id

    # A second conversation in another directory is another session.
    other = tmp_path / "other"
    other.mkdir()
    claude_turn(proxy, str(home), str(other), "a new conversation")
    with proxy.db() as conn:
        sessions = conn.execute("SELECT id, client_session_id FROM sessions").fetchall()
    assert len(sessions) == 2
    assert len({s["client_session_id"] for s in sessions}) == 2


@dataclass
class Turn:
    """One model call Claude Code made, as the fake saw it and as the proxy recorded it."""

    agent_id: str | None
    parent_agent_id: str | None
    client_session_id: str
    session_id: str
    seq: int
    compaction: str | None
    prompt: str


def claude_timeline(proxy: RunningProxy, fake: FakeUpstream, *, cleared: bool = False
                    ) -> list[Turn]:
    """Every /v1/messages call in the order the fake received it, joined to its request entry
    by the recorded (redacted) body; fails if any call is missing from the record (or, unless
    the fake was cleared since the proxy started, if the record holds more calls)."""
    entries = [e for e in proxy.entries() if e["type"] == "request"
               and e["path"] == "/v1/messages"]
    by_body = {proxy.request_bytes(e): e for e in entries}
    turns = []
    for call in fake.model_calls():
        entry = by_body[redact_bytes(call.body)]
        assert entry.get("agent_id") == call.header("x-claude-code-agent-id")
        assert entry.get("parent_agent_id") == call.header("x-claude-code-parent-agent-id")
        texts, _ = _last_user_turn(call)
        turns.append(Turn(call.header("x-claude-code-agent-id"),
                          call.header("x-claude-code-parent-agent-id"),
                          call.header("x-claude-code-session-id") or "", entry["session_id"],
                          entry["seq"], entry.get("compaction"), " ".join(texts)[-80:]))
    assert cleared or len(turns) == len({e["exchange_id"] for e in entries})
    return turns


def lanes(turns: list[Turn]) -> dict[str | None, list[Turn]]:
    """Turns grouped by agent id (None: the main conversation), in arrival order."""
    out: dict[str | None, list[Turn]] = {}
    for turn in turns:
        out.setdefault(turn.agent_id, []).append(turn)
    return out


def session_rows(proxy: RunningProxy) -> dict[str, dict[str, Any]]:
    with proxy.db() as conn:
        return {row["id"]: dict(row) for row in conn.execute("SELECT * FROM sessions")}


def one_session(turns: list[Turn], seqs: list[int]) -> str:
    """All the turns are one session numbered ``seqs``; returns its id."""
    assert len({t.session_id for t in turns}) == 1, turns
    assert [t.seq for t in turns] == seqs, turns
    return turns[0].session_id


def claude_dirs(tmp_path: Any) -> tuple[str, str]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return str(home), str(work)


def test_claude_code_background_subagent_is_its_own_linked_session(proxy, fake, tmp_path):
    """A background Agent: main turns 1-3 stay one session; the subagent is its own session,
    kind subagent, linked to main's turn 1 and recorded with its agent id."""
    home, work = claude_dirs(tmp_path)
    out = claude_turn(proxy, home, work, "RUN_AGENT: say subagent-was-here")
    assert "Agent said" in out
    by_lane = lanes(claude_timeline(proxy, fake))
    main = one_session(by_lane.pop(None), [1, 2, 3])
    [(agent_id, agent_turns)] = by_lane.items()
    sub = one_session(agent_turns, [1])
    assert sub != main and "subagent-was-here" in agent_turns[0].prompt
    rows = session_rows(proxy)
    assert set(rows) == {main, sub}
    assert rows[main]["kind"] == "conversation" and rows[main]["branch_count"] == 0
    assert (rows[sub]["kind"], rows[sub]["parent_id"], rows[sub]["fork_from_seq"],
            rows[sub]["agent_id"]) == ("subagent", main, 1, agent_id)
    assert rows[sub]["client_session_id"] == rows[main]["client_session_id"] \
        == agent_turns[0].client_session_id
    start = proxy.entries(f"anthropic/{sub}.jsonl")[0]
    assert (start["type"], start["kind"], start["agent_id"], start["parent_session"],
            start["parent_seq"]) == ("session_start", "subagent", agent_id, main, 1)


def test_claude_code_nested_and_parallel_subagents(proxy, fake, tmp_path):
    """Foreground nested agents link to their parent agent's turn; two parallel agents spawned
    by one answer are two sessions linked to that turn."""
    home, work = claude_dirs(tmp_path)
    claude_turn(proxy, home, work, "RUN_AGENT_FG: RUN_AGENT_FG: say deep")
    by_lane = lanes(claude_timeline(proxy, fake))
    main = one_session(by_lane.pop(None), [1, 2])
    (outer_id, outer), (inner_id, inner) = sorted(
        by_lane.items(), key=lambda item: item[1][0].parent_agent_id or "")
    assert outer[0].parent_agent_id is None and inner[0].parent_agent_id == outer_id
    outer_session = one_session(outer, [1, 2])
    inner_session = one_session(inner, [1])
    rows = session_rows(proxy)
    assert (rows[outer_session]["parent_id"], rows[outer_session]["fork_from_seq"]) == (main, 1)
    assert (rows[inner_session]["parent_id"], rows[inner_session]["fork_from_seq"],
            rows[inner_session]["parent_agent_id"]) == (outer_session, 1, outer_id)
    assert len(rows) == 3 and all(r["branch_count"] == 0 for r in rows.values())

    fake.clear()
    other = tmp_path / "parallel"
    other.mkdir()
    claude_turn(proxy, home, str(other), "RUN_AGENTS: say left|say right")
    by_lane = lanes(claude_timeline(proxy, fake, cleared=True))
    main_turns = [t for t in by_lane.pop(None) if t.session_id not in rows]
    parallel_main = one_session(main_turns, list(range(1, len(main_turns) + 1)))
    subs = {one_session(t, [1]) for agent, t in by_lane.items() if agent not in
            (outer_id, inner_id)}
    rows = session_rows(proxy)
    assert len(subs) == 2
    assert {(rows[s]["parent_id"], rows[s]["fork_from_seq"], rows[s]["kind"]) for s in subs} \
        == {(parallel_main, 1, "subagent")}


def test_claude_code_fork_subagent_is_not_a_turn_or_branch_of_its_parent(proxy, fake, tmp_path):
    """A fork subagent (whole parent history) is its own session, kind fork_subagent, linked
    to the turn it forked from; the main conversation goes on unbranched."""
    home, work = claude_dirs(tmp_path)
    claude_turn(proxy, home, work, "RUN_FORK: say forked-hello")
    by_lane = lanes(claude_timeline(proxy, fake))
    main = one_session(by_lane.pop(None), [1, 2, 3])
    [(agent_id, fork_turns)] = by_lane.items()
    fork_session = one_session(fork_turns, [1])
    rows = session_rows(proxy)
    assert set(rows) == {main, fork_session}
    assert rows[main]["branch_count"] == 0 and rows[main]["last_seq"] == 3
    assert (rows[fork_session]["kind"], rows[fork_session]["parent_id"],
            rows[fork_session]["fork_from_seq"], rows[fork_session]["agent_id"]) == (
        "fork_subagent", main, 1, agent_id)
    assert not list(proxy.log_dir.glob("anthropic/*_b*.jsonl"))


def test_claude_code_fork_session_and_rewind(proxy, fake, tmp_path):
    """--resume ID --fork-session is a new session forked from the original at the shared turn
    (fork entry); the original continues unbranched; --resume-session-at branches it."""
    home, work = claude_dirs(tmp_path)
    claude_turn(proxy, home, work, "first q")
    claude_turn(proxy, home, work, "--continue", "second q")
    client_id = fake.model_calls()[0].header("X-Claude-Code-Session-Id")
    claude_turn(proxy, home, work, "--resume", client_id, "--fork-session", "forked q")
    claude_turn(proxy, home, work, "--resume", client_id, "third q")
    turns = claude_timeline(proxy, fake)
    original = one_session([turns[0], turns[1], turns[3]], [1, 2, 3])
    forked = turns[2]
    assert forked.client_session_id != client_id
    assert forked.session_id != original and forked.seq == 3
    rows = session_rows(proxy)
    assert rows[original]["branch_count"] == 0
    assert (rows[forked.session_id]["kind"], rows[forked.session_id]["parent_id"],
            rows[forked.session_id]["fork_from_seq"]) == ("session_fork", original, 2)
    entries = proxy.entries(f"anthropic/{forked.session_id}.jsonl")
    assert [e["type"] for e in entries] == ["session_start", "request", "response", "request",
                                            "response", "fork", "request", "response"]
    fork = entries[5]
    assert (fork["from_seq"], fork["parent_session"], fork["reason"],
            fork["client_session_id"]) == (2, original, "client_session_forked",
                                           forked.client_session_id)

    transcript = next((tmp_path / "home").glob(f".claude/projects/*/{client_id}.jsonl"))
    first_answer = next(line for line in map(orjson.loads, transcript.read_bytes().splitlines())
                        if line.get("type") == "assistant")
    fake.clear()
    claude_turn(proxy, home, work, "--resume", client_id, "--resume-session-at",
                first_answer["uuid"], "rewound q")
    [rewound] = claude_timeline(proxy, fake, cleared=True)
    assert rewound.client_session_id == client_id
    assert (rewound.session_id, rewound.seq) == (f"{original}_b1", 2)
    rows = session_rows(proxy)
    assert (rows[rewound.session_id]["kind"], rows[rewound.session_id]["fork_from_seq"]) == (
        "branch", 1)


def test_claude_code_compaction_continues_the_session(proxy, fake, tmp_path):
    """/compact and auto-compaction (a huge usage answer): the summary request and every turn
    after it stay in the session, seq keeps counting, and the record marks both."""
    home, work = claude_dirs(tmp_path)
    claude_turn(proxy, home, work, "first question")
    claude_turn(proxy, home, work, "--continue", "second question")
    claude_turn(proxy, home, work, "--continue", "/compact")
    claude_turn(proxy, home, work, "--continue", "third question")
    claude_turn(proxy, home, work, "--continue", "fourth question")
    turns = claude_timeline(proxy, fake)
    manual = one_session(turns, [1, 2, 3, 4, 5])
    assert [t.compaction for t in turns] == [None, None, "request", "compacted", None]

    fake.clear()
    auto_home, auto_work = tmp_path / "auto-home", tmp_path / "auto-work"
    auto_home.mkdir()
    auto_work.mkdir()
    claude_turn(proxy, str(auto_home), str(auto_work), "HUGE_USAGE please")
    out = claude_turn(proxy, str(auto_home), str(auto_work), "--continue", "after huge")
    assert "Echo: after huge" in out
    turns = claude_timeline(proxy, fake, cleared=True)
    auto = one_session(turns, [1, 2, 3])
    assert [t.compaction for t in turns] == [None, "request", "compacted"]
    rows = session_rows(proxy)
    assert len(rows) == 2 and rows[manual]["compactions"] == 1 and rows[auto]["compactions"] == 1
    with proxy.db() as conn:
        marked = conn.execute("SELECT session_id, seq, compaction FROM exchanges"
                              " WHERE compaction IS NOT NULL ORDER BY ts").fetchall()
    assert [tuple(r) for r in marked] == [(manual, 3, "request"), (manual, 4, "compacted"),
                                          (auto, 2, "request"), (auto, 3, "compacted")]


def test_claude_code_identical_first_prompts_stay_apart(proxy, fake, tmp_path):
    """Two `claude -p` runs with the same prompt and tool loop are two sessions."""
    home, work = claude_dirs(tmp_path)
    claude_turn(proxy, home, work, "RUN_TOOL:echo same")
    claude_turn(proxy, home, work, "RUN_TOOL:echo same")
    turns = claude_timeline(proxy, fake)
    first = one_session(turns[:2], [1, 2])
    second = one_session(turns[2:], [1, 2])
    assert first != second and len(session_rows(proxy)) == 2


def show_session_turns(proxy: RunningProxy, session_id: str) -> list[dict[str, Any]]:
    with proxy.db() as conn:
        return [dict(r) for r in conn.execute(
            "SELECT seq, user_preview FROM exchanges WHERE session_id = ? ORDER BY seq",
            (session_id,)).fetchall()]


def test_a_subagent_links_only_within_its_own_client_session(proxy, fake):
    """Two Claude Code sessions spawn agents with the same task: each subagent links to the
    turn of its own client session, even when its parent agent's lane is unknown."""
    def client(session: str, **agent: str) -> anthropic.Anthropic:
        headers = {"X-Claude-Code-Session-Id": session, **agent}
        return anthropic.Anthropic(base_url=proxy.base(), api_key=KEY, max_retries=0,
                                   default_headers=headers)

    def ask(sdk: anthropic.Anthropic, text: str) -> None:
        sdk.messages.create(model=MODEL, max_tokens=20,
                            messages=[{"role": "user", "content": text}])

    ask(client("session-b"), "RUN_AGENT: the same task")
    ask(client("session-a"), "RUN_AGENT: the same task")  # the newer of the two turns
    ask(client("session-b", **{"X-Claude-Code-Agent-Id": "sub",
                               "X-Claude-Code-Parent-Agent-Id": "unseen"}), "the same task")
    with proxy.db() as conn:
        rows = {(r["client_session_id"], r["agent_id"]): dict(r)
                for r in conn.execute("SELECT * FROM sessions")}
    sub = rows[("session-b", "sub")]
    assert (sub["kind"], sub["parent_id"], sub["fork_from_seq"]) == (
        "subagent", rows[("session-b", None)]["id"], 1)


def test_system_fingerprints_from_the_cache_equal_those_computed_whole_from_threads():
    """``system_fingerprint`` keeps the digests of the system prompts seen last: whether a
    prompt's digest comes from there or is computed anew (more prompts than it keeps, seen
    again in another order, from four threads at once), it is the digest of the prompt's
    canonical form, and the cache stays within its bound."""
    from otelproxy import sessions

    prompts = [[{"type": "text", "text": f"house rules {n} " * 200}] for n in range(40)]
    expected = {n: fingerprint([p]) for n, p in enumerate(prompts)}
    failures: list[str] = []

    def run(seed: int) -> None:
        order = list(range(40)) * 3
        random.Random(seed).shuffle(order)
        for n in order:
            if system_fingerprint(prompts[n], []) != expected[n]:
                failures.append(f"prompt {n}")

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert len(sessions._SYSTEM_DIGESTS) <= sessions._SYSTEM_DIGESTS_KEPT
