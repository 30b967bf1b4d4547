"""The proxy image's Containerfile: its shape, and its default command run locally for real.

The pytest suite builds no image (scripts/ci-containers.sh builds it, runs it in the sandbox
and runs its HEALTHCHECK). Here the final stage's ENV and ENTRYPOINT are read from the
Containerfile and run as a local process against the fake upstream, with only the listen
address, the log directory and the upstream replaced; the HEALTHCHECK command runs against it.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from otelproxy import config
from tests.fake_upstream import FakeUpstream

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO_ROOT / "Containerfile"
IGNORE_FILE = REPO_ROOT / ".dockerignore"
FLUENT_BIT_CONF = REPO_ROOT / "fluent-bit" / "fluent-bit.conf"
PARSERS_CONF = REPO_ROOT / "fluent-bit" / "parsers.conf"
IMAGE_LOG_DIR = "/var/log/otelproxy"

# --------------------------------------------------------------------------------------------
# Reading the Containerfile
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... block: its base, its name (AS ...) and its instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for key, rest in self.instructions if key == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV in both forms: ``KEY=VALUE ...`` and the legacy ``KEY VALUE``."""
        values: dict[str, str] = {}
        for rest in self.all("ENV"):
            words = shlex.split(rest)
            if "=" not in words[0]:
                values[words[0]] = rest.split(None, 1)[1]
                continue
            for word in words:
                key, _, value = word.partition("=")
                values[key] = value
        return values


def logical_lines(text: str) -> Iterator[str]:
    """Lines with comments dropped and backslash continuations joined."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def parse_containerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults (before the first FROM) and the stages."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before FROM, got {line!r}"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(rest: str) -> list[str]:
    """A JSON (exec form) argument list such as ENTRYPOINT's or HEALTHCHECK CMD's."""
    argv = json.loads(rest)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), rest
    return argv


ARGS, STAGES = parse_containerfile(CONTAINERFILE.read_text())
FINAL = STAGES[-1]


def default_argv() -> list[str]:
    """ENTRYPOINT + CMD of the final stage: the image's default command line."""
    entrypoint = FINAL.last("ENTRYPOINT")
    cmd = FINAL.last("CMD")
    return (exec_form(entrypoint) if entrypoint else []) + (exec_form(cmd) if cmd else [])


def healthcheck_argv() -> list[str]:
    rest = FINAL.last("HEALTHCHECK")
    assert rest is not None, "the final stage has no HEALTHCHECK"
    match = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
    assert match, f"HEALTHCHECK must use the exec form: {rest!r}"
    return exec_form(match.group(1))


# --------------------------------------------------------------------------------------------
# The image's shape
# --------------------------------------------------------------------------------------------


def test_base_image_is_a_build_argument_defaulting_to_slim_python() -> None:
    """Every stage starts FROM the PYTHON_IMAGE build argument, a slim Python image by default."""
    assert "slim" in ARGS["PYTHON_IMAGE"] and "python" in ARGS["PYTHON_IMAGE"]
    assert [stage.base for stage in STAGES] == ["${PYTHON_IMAGE}"] * len(STAGES)


def test_builder_stage_installs_into_a_venv_that_the_final_stage_copies_whole() -> None:
    """The builder installs otelproxy into a pip-less venv; the final stage only copies it in.

    No `RUN --mount=...,from=builder`: buildah 1.28 (podman 4.3) mounts nothing when the builder
    stage is cached, and reuses a stale install layer when it is not (see the Containerfile).
    """
    assert len(STAGES) == 2 and STAGES[0].name == "builder"
    builder_runs = " ".join(STAGES[0].all("RUN"))
    assert "-m venv --without-pip /opt/otelproxy" in builder_runs
    assert re.search(r"pip --python /opt/otelproxy/bin/python install \.$", builder_runs)
    final_runs = " ".join(FINAL.all("RUN"))
    assert "--mount" not in final_runs and "pip install" not in final_runs
    assert FINAL.all("COPY") == ["--from=builder /opt/otelproxy /opt/otelproxy"]
    assert FINAL.all("ADD") == []
    assert FINAL.env()["PATH"].startswith("/opt/otelproxy/bin:")
    assert not re.search(r"apt-get|build-essential|gcc", final_runs)


def test_final_stage_runs_as_a_non_root_user() -> None:
    """The proxy does not run as root."""
    user = FINAL.last("USER")
    assert user and user.split(":")[0] not in ("root", "0")


def test_exposes_port_8000_and_keeps_the_record_in_a_volume() -> None:
    """Port 8000 is exposed and the record directory is a volume."""
    assert FINAL.all("EXPOSE") == ["8000"]
    assert [exec_form(v) for v in FINAL.all("VOLUME")] == [[IMAGE_LOG_DIR]]


def test_default_command_is_otelproxy_configured_through_the_environment() -> None:
    """The default command is `otelproxy` with the documented settings, all in ENV."""
    assert default_argv() == ["otelproxy"]
    env = FINAL.env()
    cfg = config.load({}, env)
    assert (cfg.host, cfg.port, str(cfg.log_dir)) == ("0.0.0.0", 8000, IMAGE_LOG_DIR)
    assert cfg.default_upstream is not None
    assert (cfg.default_upstream.url, cfg.default_provider) == (
        "https://api.anthropic.com",
        "anthropic",
    )


def test_flags_after_the_image_name_still_win_over_the_image_environment() -> None:
    """`run IMAGE --port 9000` overrides the ENV default: flags beat environment."""
    cfg = config.load({"port": "9000"}, FINAL.env())
    assert cfg.port == 9000


def test_healthcheck_asks_healthz_on_the_configured_port() -> None:
    """The HEALTHCHECK requests /healthz on OTELPROXY_PORT, with a timeout."""
    argv = healthcheck_argv()
    assert argv[:2] == ["python", "-c"]
    assert "/healthz" in argv[2] and "OTELPROXY_PORT" in argv[2] and "timeout" in argv[2]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a context path is left out (last matching pattern wins; a match covers children).

    fnmatch's `*` also crosses `/`, which differs from the builders' matcher only in ways the
    allowlist below does not depend on.
    """
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, bare) or fnmatch.fnmatch(path, bare + "/*"):
            result = not negated
    return result


def test_build_context_holds_only_what_pip_needs() -> None:
    """The ignore file keeps the package sources, pyproject.toml and README.md, nothing else."""
    patterns = [
        line.strip()
        for line in IGNORE_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for kept in ("pyproject.toml", "README.md", "otelproxy/__init__.py", "otelproxy/cli.py"):
        assert not ignored(kept, patterns), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "logs/x.jsonl",
        "otelproxy/__pycache__/cli.cpython-311.pyc",
        "sandbox/claude-sandbox.sh",
        "Containerfile",
    ):
        assert ignored(dropped, patterns), dropped


# --------------------------------------------------------------------------------------------
# The default command, run locally
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_argv(argv: list[str]) -> list[str]:
    """The image's command with `otelproxy` resolved to this environment's copy."""
    assert argv[0] == "otelproxy"
    script = Path(sys.executable).with_name("otelproxy")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "otelproxy"]
    return head + argv[1:]


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


@dataclass
class ImageCommand:
    """The image's default command running as a local process."""

    process: subprocess.Popen[bytes]
    url: str
    env: dict[str, str]
    log_dir: Path
    fake: FakeUpstream


@pytest.fixture(scope="module")
def image_command(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageCommand]:
    log_dir = tmp_path_factory.mktemp("record")
    port = free_port()
    with FakeUpstream() as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTELPROXY_", "OTEL_"))}
        env.update(FINAL.env())
        env.update(
            {
                "OTELPROXY_HOST": "127.0.0.1",
                "OTELPROXY_PORT": str(port),
                "OTELPROXY_LOG_DIR": str(log_dir),
                "OTELPROXY_DEFAULT_UPSTREAM": fake.url,
            }
        )
        argv = [*local_argv(default_argv()), "--upstream", fake.url]
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    output = (
                        process.stdout.read().decode(errors="replace") if process.stdout else ""
                    )
                    pytest.fail(f"the default command exited with {process.returncode}:\n{output}")
                try:
                    get(f"{url}/healthz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail("the default command did not answer /healthz within 30 s")
                    time.sleep(0.1)
            yield ImageCommand(process, url, env, log_dir, fake)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_default_command_serves_healthz(image_command: ImageCommand) -> None:
    """The image's default command, run locally, answers GET /healthz with status ok."""
    status, body = get(f"{image_command.url}/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def post_message(image_command: ImageCommand, text: str) -> bytes:
    """POST /v1/messages with a plain path through the image command; the body it sent."""
    body = json.dumps(
        {
            "model": "claude-test",
            "max_tokens": 16,
            "stream": False,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()
    request = urllib.request.Request(
        f"{image_command.url}/v1/messages",
        data=body,
        method="POST",
        headers={
            "content-type": "application/json",
            "x-api-key": "sk-ant-dummy",
            "anthropic-version": "2023-06-01",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        response.read()
    return body


def test_default_command_forwards_plain_paths_to_the_default_upstream(
    image_command: ImageCommand,
) -> None:
    """POST /v1/messages through the default command reaches the (default) upstream intact."""
    body = post_message(image_command, "hello through the image command")
    calls = [
        r
        for r in image_command.fake.received
        if (r.method, r.path, r.body) == ("POST", "/v1/messages", body)
    ]
    assert len(calls) == 1


def test_healthcheck_command_passes_against_the_running_proxy(image_command: ImageCommand) -> None:
    """The HEALTHCHECK command exits 0 when the proxy is up, non-zero on a closed port."""
    argv = healthcheck_argv()
    argv[0] = sys.executable
    up = subprocess.run(argv, env=image_command.env, capture_output=True, timeout=30)
    assert up.returncode == 0, up.stderr
    closed = {**image_command.env, "OTELPROXY_PORT": str(free_port())}
    down = subprocess.run(argv, env=closed, capture_output=True, timeout=30)
    assert down.returncode != 0


def fluent_bit_value(text: str, key: str) -> str:
    match = re.search(rf"^\s*{re.escape(key)}\s+(\S+)\s*$", text, re.MULTILINE | re.IGNORECASE)
    assert match, f"{key} not set"
    return match.group(1)


def test_fluent_bit_reads_every_file_the_image_command_records(image_command: ImageCommand) -> None:
    """fluent-bit.conf's Path covers every JSONL file written, and Time_Format fits every `ts`."""
    post_message(image_command, "a record for Fluent Bit")
    conf = FLUENT_BIT_CONF.read_text()
    patterns = [
        p.replace(IMAGE_LOG_DIR, str(image_command.log_dir))
        for p in fluent_bit_value(conf, "Path").split(",")
    ]
    deadline = time.monotonic() + 10
    files: list[Path] = []
    while not files and time.monotonic() < deadline:  # the record is written off the hot path
        files = sorted(image_command.log_dir.rglob("*.jsonl"))
        time.sleep(0.1)
    assert files, "the proxy wrote no JSONL file"
    for path in files:
        assert any(path.match(p) for p in patterns), path  # glob: `*` stays in one directory
    time_format = fluent_bit_value(PARSERS_CONF.read_text(), "Time_Format")
    strptime_format = time_format.replace("%L", "%f")  # Fluent Bit's %L: fractional seconds
    for path in files:
        for line in path.read_text().splitlines():
            datetime.strptime(json.loads(line)["ts"], strptime_format)


class _FailingHealthz(http.server.BaseHTTPRequestHandler):
    """/healthz as a proxy whose recorder is not recording answers it: 503, "failing"."""

    def do_GET(self) -> None:
        body = b'{"status": "failing"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_healthcheck_command_fails_on_a_503_answer() -> None:
    """The HEALTHCHECK command exits non-zero when /healthz answers 503 (recorder failing)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingHealthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        argv = healthcheck_argv()
        argv[0] = sys.executable
        env = {**os.environ, "OTELPROXY_PORT": str(server.server_address[1])}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode != 0
    assert "503" in done.stderr  # urlopen raised HTTPError, not a connection error
