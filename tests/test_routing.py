"""Routing: /{provider}/{host[:port]}/{path} → the allowed origin; refusals; default upstream;
and the proxy's own endpoint, GET /healthz."""

from __future__ import annotations

import threading
import time
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest

from otelproxy import __version__
from otelproxy.config import DEFAULT_UPSTREAMS, build
from otelproxy.errors import InvalidTarget, UnknownProvider, UpstreamNotAllowed
from otelproxy.routing import resolve
from tests.conftest import RunningProxy
from tests.fake_upstream import FakeUpstream, Reply
from tests.raw_upstream import RawUpstream, parse_response, roundtrip

USER = [{"role": "user", "content": "hello"}]


def test_path_and_query_are_forwarded_to_the_named_origin(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """/openai/127.0.0.1:PORT/v1/x?y goes to http://127.0.0.1:PORT/v1/x?y with Host rewritten."""
    answer = httpx2.get(f"{raw_proxy.url}/openai/{raw_upstream.host_port}/v1/models/gpt-4o"
                        "?limit=2&after=a%2Fb")
    assert answer.status_code == 200
    [got] = raw_upstream.requests
    assert got.target == "/v1/models/gpt-4o?limit=2&after=a%2Fb"
    assert got.values("host") == [raw_upstream.host_port]


def test_route_without_a_path_goes_to_the_upstream_root(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream
) -> None:
    """/anthropic/HOST (no trailing path) is forwarded as GET / on that origin."""
    assert httpx2.get(f"{raw_proxy.url}/anthropic/{raw_upstream.host_port}").status_code == 200
    assert raw_upstream.requests[0].target == "/"


def test_the_scheme_comes_from_the_allowlist() -> None:
    """The scheme comes from the allowlist entry (https for the APIs), never from the client."""
    config = build({}, [*DEFAULT_UPSTREAMS, "http://127.0.0.1:9100"])
    route = resolve("/anthropic/api.anthropic.com/v1/messages", config)
    assert (route.provider, route.origin.url, route.path) == (
        "anthropic", "https://api.anthropic.com", "/v1/messages")
    assert resolve("/openai/API.OpenAI.com:443/v1/responses", config).origin.url == (
        "https://api.openai.com")
    assert resolve("/openai/127.0.0.1:9100/v1/x", config).origin.url == "http://127.0.0.1:9100"
    with pytest.raises(UpstreamNotAllowed):
        resolve("/anthropic/api.anthropic.com:80/v1/messages", config)
    with pytest.raises(UpstreamNotAllowed):
        resolve("/anthropic/127.0.0.1:9100@evil.example/v1/messages", config)


def test_unknown_provider_is_404_naming_the_known_ones(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """/gemini/HOST/... → 404 JSON that lists anthropic and openai; nothing is forwarded."""
    answer = httpx2.post(f"{proxy.url}/gemini/{fake.host_port}/v1/messages", json={})
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/json")
    message = answer.json()["error"]["message"]
    assert "anthropic" in message and "openai" in message and "'gemini'" in message
    assert fake.received == []
    [rejected] = proxy.entries("rejected-*.jsonl")
    assert rejected["status"] == 404 and rejected["path"] == f"/gemini/{fake.host_port}/v1/messages"


@pytest.mark.parametrize(
    "authority", ["evil.example", "127.0.0.1:{other}", "api.anthropic.com.evil.example", ""],
    ids=["other-host", "other-port", "suffix", "empty"],
)
def test_host_not_on_the_allowlist_is_403_and_nothing_is_sent(
    raw_proxy: RunningProxy, raw_upstream: RawUpstream, authority: str
) -> None:
    """A host off the allowlist gets 403 in the provider shape and no connection at all."""
    with RawUpstream() as bystander:
        target = authority.format(other=bystander.port)
        answer = httpx2.post(f"{raw_proxy.url}/anthropic/{target}/v1/messages", json={})
        assert answer.status_code == 403
        error = answer.json()
        assert error["type"] == "error" and error["error"]["type"] == "permission_error"
        assert "allowlist" in error["error"]["message"]
        assert bystander.connections == 0 and raw_upstream.connections == 0
    [rejected] = raw_proxy.entries("rejected-*.jsonl")
    assert rejected["status"] == 403


def test_403_for_openai_routes_uses_the_openai_error_shape(raw_proxy: RunningProxy) -> None:
    """Refusals on /openai/... carry the OpenAI error object, so the openai SDK shows them."""
    client = openai.OpenAI(base_url=f"{raw_proxy.url}/openai/evil.example/v1", api_key="sk-x",
                           max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.models.list()
    assert "allowlist" in raised.value.message


def test_default_upstream_forwards_unprefixed_paths(
    make_proxy: Any, fake: FakeUpstream
) -> None:
    """With a default upstream the proxy root works as base URL, beside the prefixed form."""
    running = make_proxy(fake, default_upstream=fake.url, default_provider="anthropic")
    root = anthropic.Anthropic(base_url=running.url, api_key="sk-ant-x", max_retries=0)
    assert root.messages.create(model="m", max_tokens=5, messages=USER).content[0].text == (
        "Echo: hello")
    prefixed = anthropic.Anthropic(base_url=running.base(), api_key="sk-ant-x", max_retries=0)
    with prefixed.messages.stream(model="m", max_tokens=5, messages=USER) as stream:
        assert stream.get_final_text() == "Echo: hello"
    assert [(c.path, c.query_string) for c in fake.model_calls()] == [("/v1/messages", "")] * 2
    records = [e for e in running.entries() if e["type"] == "request"]
    assert {e["upstream"] for e in records} == {fake.url}
    assert len(records) == 2


def test_default_upstream_keeps_the_raw_path_and_query(
    make_proxy: Any, raw_upstream: RawUpstream
) -> None:
    """An unprefixed request goes to the default origin with its path and query untouched."""
    running = make_proxy(raw_upstream, default_upstream=raw_upstream.url,
                         default_provider="openai")
    request = b"GET /v1/models%2Fx?a=%20b HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    assert parse_response(roundtrip(running.server.port, request)).status == 200
    assert raw_upstream.requests[0].target == "/v1/models%2Fx?a=%20b"


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "http://{other}/v1/models"), ("POST", "evil://x/v1/messages"),
     ("GET", "http://{upstream}/v1/models"), ("OPTIONS", "*")],
    ids=["absolute-other-host", "odd-scheme", "absolute-default-host", "asterisk"],
)
def test_a_target_that_is_not_a_path_is_400_and_nothing_is_sent(
    make_proxy: Any, raw_upstream: RawUpstream, method: str, target: str
) -> None:
    """Absolute-form and asterisk targets get a 400 in the provider shape, recorded as rejected,
    and no connection anywhere (not the default upstream with the target glued on)."""
    running = make_proxy(raw_upstream, default_upstream=raw_upstream.url,
                         default_provider="anthropic")
    with RawUpstream() as bystander:
        target = target.format(other=bystander.host_port, upstream=raw_upstream.host_port)
        request = (f"{method} {target} HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n"
                   "Connection: close\r\n\r\n{}").encode()
        answer = parse_response(roundtrip(running.server.port, request))
        assert answer.status == 400
        error = orjson.loads(answer.body)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert "must be a path" in error["error"]["message"]
        assert bystander.connections == 0 and raw_upstream.connections == 0
    [rejected] = running.entries("rejected-*.jsonl")
    assert rejected["status"] == 400 and rejected["path"] == target
    assert [e for e in running.entries() if e["type"] == "response"] == []


def test_resolve_refuses_targets_not_starting_with_a_slash() -> None:
    """resolve() raises InvalidTarget for anything but a path, default upstream or not."""
    config = build({"default_upstream": "http://127.0.0.1:9100", "default_provider": "openai"},
                   list(DEFAULT_UPSTREAMS))
    for target in ("http://127.0.0.1:9100/v1/models", "evil://api", "*", "v1/models", ""):
        with pytest.raises(InvalidTarget):
            resolve(target, config)


def test_without_a_default_upstream_unprefixed_paths_are_404(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """No default configured: /v1/messages names no provider → 404, nothing forwarded."""
    answer = httpx2.post(f"{proxy.url}/v1/messages", json={})
    assert answer.status_code == 404
    assert "anthropic" in answer.json()["error"]["message"]
    assert fake.received == []


def test_unknown_provider_and_default_upstream_errors_are_typed() -> None:
    """resolve() raises UnknownProvider for an unprefixed path only when no default is set."""
    bare = build({}, list(DEFAULT_UPSTREAMS))
    with pytest.raises(UnknownProvider):
        resolve("/v1/messages", bare)
    with_default = build(
        {"default_upstream": "http://127.0.0.1:9100", "default_provider": "openai"},
        list(DEFAULT_UPSTREAMS),
    )
    route = resolve("/v1/chat/completions", with_default)
    assert (route.provider, route.origin.url, route.path) == (
        "openai", "http://127.0.0.1:9100", "/v1/chat/completions")


def test_healthz_reports_status_version_uptime_and_counters(
    proxy: RunningProxy, fake: FakeUpstream
) -> None:
    """GET /healthz: JSON with status, version, uptime and the counters, which follow traffic."""
    before = httpx2.get(proxy.url + "/healthz")
    assert before.status_code == 200 and before.headers["content-type"].startswith(
        "application/json")
    health = before.json()
    assert health["status"] == "ok" and health["version"] == __version__
    assert health["uptime_s"] >= 0
    for counter in ("exchanges", "in_flight", "records_written", "records_dropped",
                    "sink_errors"):
        assert health[counter] == 0, counter
    assert fake.received == []  # /healthz is answered by the proxy itself

    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    client.messages.create(model="m", max_tokens=5, messages=USER)
    httpx2.get(f"{proxy.url}/nope/x/y")
    proxy.flush()
    after = httpx2.get(proxy.url + "/healthz").json()
    assert after["exchanges"] == 1 and after["in_flight"] == 0
    assert after["records_written"] == 2  # the exchange and the rejected request
    assert after["records_dropped"] == 0 and after["sink_errors"] == 0
    assert after["uptime_s"] >= health["uptime_s"]


def test_healthz_counts_a_stream_in_flight(proxy: RunningProxy, fake: FakeUpstream) -> None:
    """While a slow stream runs, /healthz shows in_flight 1; afterwards 0."""
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "a b c d"}], event_delay=0.1))
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    started = threading.Event()
    done = threading.Event()

    def stream() -> None:
        with client.messages.stream(model="m", max_tokens=5, messages=USER) as events:
            for _ in events:
                started.set()
        done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert started.wait(5)
    assert httpx2.get(proxy.url + "/healthz").json()["in_flight"] == 1
    worker.join(10)
    assert done.is_set()
    deadline = time.monotonic() + 5
    while httpx2.get(proxy.url + "/healthz").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert httpx2.get(proxy.url + "/healthz").json()["in_flight"] == 0
