"""The ``otelproxy`` command (serve): help, start-up errors, layered configuration and shutdown.

Every test runs the real command line in a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx2
import orjson
import pytest

from otelproxy import __version__
from otelproxy.cli import build_parser
from otelproxy.config import Config
from tests.fake_upstream import FakeUpstream, Reply
from tests.proxy_process import ProxyProcess, run_cli

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something is already listening on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def flag_for(field: str) -> str:
    return "--upstream" if field == "upstreams" else "--" + field.replace("_", "-")


def test_help_documents_every_option() -> None:
    """`otelproxy --help` describes a flag and an OTELPROXY_ variable for every setting."""
    result = run_cli(["--help"])
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for field in dataclasses.fields(Config):
        assert flag_for(field.name) in text, field.name
        assert f"OTELPROXY_{field.name.upper()}" in text, field.name
    for default in ("127.0.0.1", "8080", "./logs", "sessions.db", "33554432"):
        assert default in text, default
    assert "/{provider}/{upstream_host}/" in text
    # every option the serve parser accepts is in the help, with a description
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices["serve"]._actions:
        if action.option_strings:
            assert action.help, action.option_strings
            assert action.option_strings[-1] in text


def test_help_lists_the_subcommands() -> None:
    """`otelproxy --help` names `sessions` and `show` beside `serve`, and each one's own
    `--help` works as the listing says."""
    result = run_cli(["--help"])
    assert result.returncode == 0
    commands = result.stdout.partition("\ncommands:\n")[2].partition("\n\n")[0]
    for usage in ("otelproxy [serve]", "otelproxy sessions", "otelproxy show SESSION"):
        assert usage in commands, (usage, commands)
    for name, option in (("sessions", "--since"), ("show", "SESSION")):
        own = run_cli([name, "--help"])
        assert own.returncode == 0 and option in own.stdout, (name, own.stderr)


def test_version() -> None:
    """`otelproxy --version` prints the version."""
    result = run_cli(["--version"])
    assert result.returncode == 0 and result.stdout.strip() == f"otelproxy {__version__}"


def _assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("otelproxy: error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (["--port", "70000"], {}, ["port", "70000", "out of range"]),
        (["--port", "http"], {}, ["port", "expected an integer"]),
        ([], {"OTELPROXY_PORT": "99999"}, ["port", "99999"]),
        (["--config", "/nonexistent/otelproxy.toml"], {}, ["/nonexistent/otelproxy.toml",
                                                           "cannot read"]),
        (["--upstream", "api.example.com"], {}, ["malformed URL", "api.example.com"]),
        ([], {"OTELPROXY_UPSTREAMS": "http://ok.example:1,http://bad:port"}, ["malformed URL"]),
        (["--default-upstream", "http://h:1/v1", "--default-provider", "openai"], {},
         ["default_upstream", "must be an origin"]),
        (["--max-request-bytes", "lots"], {}, ["max_request_bytes", "expected an integer"]),
        (["--default-provider", "gemini"], {}, ["invalid choice", "gemini"]),
        (["--no-such-flag"], {}, ["unrecognized arguments"]),
    ],
    ids=["port-range", "port-type", "env-port", "config-missing", "upstream-url",
         "env-upstreams", "default-upstream-path", "limit-type", "provider", "unknown-flag"],
)
def test_bad_values_exit_2_with_one_clear_line(
    tmp_path: Path, args: list[str], env: dict[str, str], fragments: list[str]
) -> None:
    """A bad setting from a flag, the environment or a file → one line on stderr, exit 2."""
    result = run_cli([*args, "--log-dir", str(tmp_path / "logs")], env=env)
    _assert_one_line_error(result, *fragments)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content", ["directory", "port = [\n", "port = 1\nbogus = 2\n"],
                         ids=["unreadable", "invalid-toml", "unknown-key"])
def test_bad_config_file_exits_2_with_one_clear_line(tmp_path: Path, content: str) -> None:
    """A config file that cannot be read or parsed → one line naming the file, exit 2."""
    path = tmp_path / "otelproxy.toml"
    if content == "directory":
        path.mkdir()
    else:
        path.write_text(content)
    result = run_cli(["--config", str(path)])
    _assert_one_line_error(result, str(path))


def test_a_port_in_use_exits_2_with_one_clear_line(tmp_path: Path, busy_port: int) -> None:
    """Another server holds the port → one line saying so, exit 2, nothing else printed."""
    result = run_cli(["--port", str(busy_port), "--log-dir", str(tmp_path)])
    _assert_one_line_error(result, f"cannot listen on 127.0.0.1:{busy_port}")


def test_flags_beat_environment_beat_toml_beat_defaults(
    tmp_path: Path, fake: FakeUpstream, busy_port: int
) -> None:
    """The running proxy takes flags over OTELPROXY_* over the TOML file over defaults."""
    toml_logs, env_logs = tmp_path / "toml-logs", tmp_path / "env-logs"
    config = tmp_path / "otelproxy.toml"
    config.write_text(
        f'port = {busy_port}\nlog_dir = "{toml_logs}"\nupstreams = ["{fake.url}"]\n'
        f'default_upstream = "{fake.url}"\ndefault_provider = "anthropic"\n'
    )
    env = {"OTELPROXY_CONFIG": str(config), "OTELPROXY_PORT": str(busy_port),
           "OTELPROXY_LOG_DIR": str(env_logs)}
    with ProxyProcess(["--port", "0"], env=env) as running:
        assert running.port != busy_port
        assert f"listening on http://127.0.0.1:{running.port}" in running.stderr  # default host
        client = anthropic.Anthropic(base_url=running.url, api_key="sk-ant-x", max_retries=0)
        assert client.messages.create(model="m", max_tokens=5, messages=USER).content
    assert running.returncode == 0
    assert (env_logs / "sessions.db").is_file() and not toml_logs.exists()
    assert list(env_logs.glob("anthropic/*.jsonl"))

    # without the flag the environment's port wins over the file's
    with ProxyProcess([], env={**env, "OTELPROXY_PORT": "0"}) as second:
        assert second.port != busy_port
    assert second.returncode == 0


def _slow_reply() -> Reply:
    # 9 SSE events, 0.15 s apart: the stream takes ~1.2 s
    return Reply(blocks=[{"type": "text", "text": "one two three four five six"}],
                 event_delay=0.15)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_the_stream_in_flight_finish_then_exits_0(
    tmp_path: Path, fake: FakeUpstream, signum: int
) -> None:
    """On SIGTERM/SIGINT: new connections refused, the stream finishes, record flushed, exit 0."""
    log_dir = tmp_path / "logs"
    fake.replies.append(_slow_reply())
    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(log_dir)]) as running:
        client = anthropic.Anthropic(base_url=f"{running.url}/anthropic/{fake.host_port}",
                                     api_key="sk-ant-x", max_retries=0)
        started, outcome = threading.Event(), []

        def stream() -> None:
            try:
                with client.messages.stream(model="m", max_tokens=5, messages=USER) as events:
                    for _ in events:
                        started.set()
                    outcome.append(events.get_final_text())
            except Exception as exc:  # reported by the assertion below
                outcome.append(repr(exc))

        worker = threading.Thread(target=stream)
        worker.start()
        assert started.wait(10)
        running.send_signal(signum)
        deadline = time.monotonic() + 2
        while not _refused(running.port):
            assert time.monotonic() < deadline, "still accepting connections after the signal"
            time.sleep(0.01)
        assert worker.is_alive(), "the stream should still be running while refusing new ones"
        worker.join(15)
        assert running.wait(15) == 0
    assert outcome == ["one two three four five six"]
    entries = [orjson.loads(line) for path in log_dir.glob("anthropic/*.jsonl")
               for line in path.read_bytes().splitlines()]
    [response] = [e for e in entries if e["type"] == "response"]
    assert response["outcome"] == "complete"
    assert response["chunks"][-1]["raw"].startswith("event: message_stop")
    assert "Traceback" not in running.stderr


def test_streams_longer_than_the_grace_period_are_cut_after_it_and_recorded_shutdown_cut(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """On SIGTERM a stream gets --grace-period seconds in all (not twice that), is then cut and
    recorded as shutdown_cut, not client_aborted; the exit status is still 0."""
    grace = 2.0
    log_dir = tmp_path / "logs"
    # ~60 SSE events 0.25 s apart: the stream would run for ~15 s
    fake.replies.append(Reply(blocks=[{"type": "text", "text": " ".join(["w"] * 56)}],
                              event_delay=0.25))
    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(log_dir),
                       "--grace-period", str(grace)]) as running:
        url = f"{running.url}/anthropic/{fake.host_port}/v1/messages"
        body = {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}
        with httpx2.stream("POST", url, json=body) as answer:
            chunks = answer.iter_raw()
            next(chunks)
            stopped = time.monotonic()
            running.send_signal(signal.SIGTERM)
            with pytest.raises(httpx2.RemoteProtocolError):
                for _ in chunks:
                    pass
            cut_after = time.monotonic() - stopped
        assert running.wait(10) == 0
    assert grace <= cut_after < 2 * grace - 0.1, cut_after  # the old cut came after ~2N s
    entries = [orjson.loads(line) for path in log_dir.glob("anthropic/*.jsonl")
               for line in path.read_bytes().splitlines()]
    [response] = [e for e in entries if e["type"] == "response"]
    assert response["outcome"] == "shutdown_cut"
    assert "grace period" in response["error"]
    assert "cutting 1 request(s) in flight" in running.stderr


def test_idle_proxy_stops_promptly_on_sigterm(tmp_path: Path) -> None:
    """With nothing in flight SIGTERM ends the process at once with status 0."""
    with ProxyProcess(["--log-dir", str(tmp_path)]) as running:
        assert httpx2.get(running.url + "/healthz").json()["status"] == "ok"
        started = time.monotonic()
        assert running.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 3
    assert "stopped" in running.stderr


def _soft_open_files(pid: int) -> tuple[int, int]:
    """(soft, hard) open-file limits of a process, read from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file line in /proc/PID/limits")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
def test_the_proxy_raises_its_open_file_limit_and_sizes_connection_limits_to_it(
    tmp_path: Path
) -> None:
    """Started with a soft limit of 512 open files, the proxy process raises it to the hard
    limit and sizes both connection limits to what that limit carries."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard != resource.RLIM_INFINITY and hard > 512, "needs a finite hard limit above 512"

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    with ProxyProcess(["--log-dir", str(tmp_path)], preexec_fn=lower_soft_limit) as running:
        soft, child_hard = _soft_open_files(running.process.pid)
        health = httpx2.get(running.url + "/healthz").json()
    assert child_hard == hard and soft == hard and soft > 512
    budget = min(10_000, (soft - 128) // 2)
    assert f"open-file limit {soft}: up to {budget} client and {budget} upstream" in (
        running.stderr)
    assert health["client_connections"] == 1
