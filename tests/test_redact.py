"""Secrets: obfuscated everywhere the proxy writes (record files, index, its own log), never in
what it forwards."""

from __future__ import annotations

import base64
import secrets
import string
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from otelproxy.redact import obfuscate, redact_bytes, redact_headers, redact_text
from tests.fake_upstream import FakeUpstream, Reply
from tests.proxy_process import ProxyProcess

ALPHABET = string.ascii_letters + string.digits


def token(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


# -- the obfuscation rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("sk-ant-api03-" + "a" * 86 + "-AAAAWXYZ", "sk-ant-...WXYZ"),
        ("sk-ant-oat01-" + "b" * 80 + "WXYZ", "sk-ant-...WXYZ"),
        ("sk-proj-" + "c" * 100 + "WXYZ", "sk-proj-...WXYZ"),
        ("sk-" + "d" * 44 + "WXYZ", "sk-...WXYZ"),
        ("opaque-session-token-1234WXYZ", "...WXYZ"),
        ("short-secret", "..."),
        ("sk-ant-short", "sk-ant-..."),
    ],
    ids=["api03", "oat01", "proj", "plain", "unknown-shape", "short", "short-known-prefix"],
)
def test_a_secret_shows_its_prefix_and_last_four(secret: str, shown: str) -> None:
    """prefix + ... + last 4; values under 16 characters keep only the prefix."""
    assert obfuscate(secret) == shown


def test_secret_headers_are_obfuscated_whatever_they_hold() -> None:
    """Secret headers are always obfuscated (scheme kept); others only where a key shape appears."""
    key = "sk-ant-api03-" + token(60) + "WXYZ"
    headers = [
        ("X-Api-Key", key),
        ("Authorization", "Bearer sk-ant-oat01-" + token(60) + "OAUT"),
        ("authorization", "Basic " + base64.b64encode(b"user:" + token(20).encode()).decode()),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNzd29yZDEyMzQ="),
        ("Cookie", "session=" + token(30) + "COOK"),
        ("set-cookie", "sid=" + token(30) + "SETC; Path=/; HttpOnly"),
        ("x-forwarded-key", "token " + key),
        ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14"),
        ("user-agent", "claude-cli/2.1.197 (external, sdk-cli)"),
    ]
    redacted = redact_headers(headers)
    assert [name for name, _ in redacted] == [name for name, _ in headers]
    values = [value for _, value in redacted]
    assert values[0] == "sk-ant-...WXYZ"
    assert values[1] == "Bearer sk-ant-...OAUT"
    assert values[2].startswith("Basic ...") and len(values[2]) == len("Basic ...") + 4
    assert values[3] == "Basic ...MzQ="
    assert values[4] == "...COOK"
    assert values[5] == "...Only"
    assert values[6] == "token sk-ant-...WXYZ"
    assert values[7:] == [headers[7][1], headers[8][1]]


def test_key_shapes_in_text_and_bytes_are_obfuscated_and_words_are_not() -> None:
    """Every sk-… key in text or bytes is obfuscated; words like task-…/disk-… are left alone."""
    api, oat = "sk-ant-api03-" + token(90) + "AP03", "sk-ant-oat01-" + token(90) + "OA01"
    proj, plain = "sk-proj-" + token(120) + "PROJ", "sk-" + token(48) + "PLAN"
    text = (f'{{"a": "{api}", "b": "use {oat}!", "c": ["{proj}"], "d": "key={plain}&x=1", '
            '"e": "task-0123456789abcdefghij disk-usage-report-generator-v2"}')
    redacted = redact_text(text)
    for secret in (api, oat, proj, plain):
        assert secret not in redacted
    assert orjson.loads(redacted) == {
        "a": "sk-ant-...AP03", "b": "use sk-ant-...OA01!", "c": ["sk-proj-...PROJ"],
        "d": "key=sk-...PLAN&x=1",
        "e": "task-0123456789abcdefghij disk-usage-report-generator-v2",
    }
    blob = b"\xff\xfe\x00" + api.encode() + b"\x80"
    assert redact_bytes(blob) == b"\xff\xfe\x00sk-ant-...AP03\x80"
    assert redact_text("no secrets here") == "no secrets here"


# -- end to end: nothing the proxy writes holds a full key -----------------------------------------


def _all_text_in(entries: list[dict[str, Any]]) -> str:
    """The record's text including base64 bodies decoded (a key must not hide in base64)."""
    parts = [orjson.dumps(entries).decode()]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_encoding") and value == "base64":
                    raw = node[key[: -len("_encoding")]]
                    parts.append(base64.b64decode(raw).decode("latin-1"))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(entries)
    return "\n".join(parts)


def test_no_full_key_reaches_the_record_or_the_log_but_all_reach_the_upstream(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Keys reach the upstream whole but never the JSONL, the SQLite files or the proxy's stderr."""
    ant = "sk-ant-api03-" + token(86) + "-AAAAWXYZ"
    oat = "sk-ant-oat01-" + token(86) + "OAUT"
    proj = "sk-proj-" + token(120) + "PROJ"
    plain = "sk-" + token(48) + "PLAN"
    cookie = token(40) + "COOK"
    set_cookie = token(40) + "SETC"
    proxy_auth = base64.b64encode(token(30).encode()).decode()
    keys = [ant, oat, proj, plain, cookie, set_cookie, proxy_auth]
    log_dir = tmp_path / "logs"
    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(log_dir),
                       "--log-level", "debug"]) as running:
        base = f"{running.url}/anthropic/{fake.host_port}"
        client = anthropic.Anthropic(base_url=base, api_key=ant, max_retries=0,
                                     default_headers={"x-api-key": ant})
        prompt = f"my keys are {oat} and {proj} and {plain}"
        message = client.messages.create(model="m", max_tokens=5,
                                         messages=[{"role": "user", "content": prompt}])
        assert oat in message.content[0].text  # the answer came back unredacted
        fake.replies.append(Reply(blocks=[{"type": "text", "text": f"stream {ant}"}], gzip=True,
                                  headers=[("set-cookie", f"sid={set_cookie}"),
                                           ("x-echo", f"key {proj}")]))
        with client.messages.stream(model="m", max_tokens=5,
                                    messages=[{"role": "user", "content": "x"}]) as stream:
            assert stream.get_final_text() == f"stream {ant}"
        oclient = openai.OpenAI(base_url=f"{running.url}/openai/{fake.host_port}/v1",
                                api_key=proj, max_retries=0)
        chunks = oclient.chat.completions.create(
            model="g", stream=True, messages=[{"role": "user", "content": f"again {ant}"}])
        assert ant in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        answer = httpx2.post(
            f"{base}/v1/files?key={plain}&other=1", content=b"\xff\xfe" + oat.encode() + b"\x00",
            headers={"Cookie": f"session={cookie}", "Proxy-Authorization": f"Basic {proxy_auth}",
                     "authorization": f"Bearer {oat}", "x-custom": plain})
        assert answer.status_code == 404  # the fake has no /v1/files; the exchange is recorded
        refused = httpx2.post(f"{running.url}/anthropic/evil.example/v1/messages?k={plain}",
                              headers={"x-api-key": ant})
        assert refused.status_code == 403
    assert running.returncode == 0

    # forwarded unmodified
    first = fake.model_calls()[0]
    assert first.header("x-api-key") == ant and oat in first.body.decode()
    assert fake.model_calls()[2].header("authorization") == f"Bearer {proj}"
    files_call = fake.received[-1]
    assert files_call.query_string == f"key={plain}&other=1"
    assert files_call.body == b"\xff\xfe" + oat.encode() + b"\x00"
    assert files_call.header("cookie") == f"session={cookie}"
    assert files_call.header("x-custom") == plain

    # the record shows prefix...last4
    entries = [orjson.loads(line) for path in sorted(log_dir.rglob("*.jsonl"))
               for line in path.read_bytes().splitlines()]
    requests = [e for e in entries if e["type"] == "request"]
    first_entry = next(e for e in requests if "my keys are" in e["body"])
    assert first_entry["headers"]["x-api-key"] == "sk-ant-...WXYZ"
    assert "sk-ant-...OAUT" in first_entry["body"] and "sk-proj-...PROJ" in first_entry["body"]
    files_entry = next(e for e in requests if e["path"] == "/v1/files")
    assert files_entry["query"] == "key=sk-...PLAN&other=1"
    assert files_entry["headers"]["cookie"] == "...COOK"
    assert files_entry["headers"]["authorization"] == "Bearer sk-ant-...OAUT"
    assert files_entry["headers"]["x-custom"] == "sk-...PLAN"
    assert files_entry["headers"]["proxy-authorization"].startswith("Basic ...")
    assert base64.b64decode(files_entry["body"]) == b"\xff\xfesk-ant-...OAUT\x00"
    stream_response = next(e for e in entries if e["type"] == "response"
                           and e.get("content_encoding") == "gzip")
    assert stream_response["headers"]["set-cookie"] == "...SETC"
    assert stream_response["headers"]["x-echo"] == "key sk-proj-...PROJ"
    assert "sk-ant-...WXYZ" in "".join(c["raw"] for c in stream_response["chunks"])

    # and nowhere is a full key: every file's bytes (JSONL, sessions.db, -wal, -shm), the
    # record's decoded base64 bodies, the proxy's own log
    record_text = _all_text_in(entries)
    everything = b"".join(p.read_bytes() for p in log_dir.rglob("*") if p.is_file())
    for secret in keys:
        assert secret.encode() not in everything, secret[:12]
        assert secret not in record_text, secret[:12]
        assert secret not in running.stderr, secret[:12]
    assert any(p.name.startswith("sessions.db") for p in log_dir.iterdir())
