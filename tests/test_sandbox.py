"""sandbox/claude-sandbox.sh: shellcheck-clean, and the container commands it prints or runs.

The pytest suite starts no container (scripts/ci-containers.sh runs the script for real with
podman and docker). `--dry-run` prints every command instead of running it, and the tests read
those lines. The runtime is found on PATH, so each run gets a PATH holding only fake
`podman`/`docker` executables; a dry run must never call them. For the runs that do call the
runtime (idempotency), the fake keeps a little state so a second run sees what the first made.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SANDBOX = REPO_ROOT / "sandbox"
SCRIPT = SANDBOX / "claude-sandbox.sh"
SHELL_FILES = [SCRIPT, SANDBOX / "claude-entrypoint.sh"]
BASH = shutil.which("bash") or "/bin/bash"

SECRET_API_KEY = "sk-ant-api03-SECRETVALUE-0123456789abcdefghijklmnopqrstuvwxyz"
SECRET_SEQ_KEY = "SEQKEY-SECRETVALUE-9876543210"
SECRET_OAUTH = "sk-ant-oat01-SECRETVALUE-oauth"
SECRET_SEQ_PASSWORD = "SEQPASSWORD-SECRETVALUE"
SECRET_REPO = "https://user:ghp_SECRETVALUE@example.com/org/repo.git"
SECRETS = (SECRET_API_KEY, SECRET_SEQ_KEY, SECRET_OAUTH, SECRET_SEQ_PASSWORD, "SECRETVALUE")
SEQ_IMAGE = "docker.io/datalust/seq:latest"
PROXY_IMAGE = "otelproxy:local"
KEPT_SEQ_ADDRESS = "10.89.0.2"

# A stand-in for podman/docker. It appends its argv, and the values that its `-e NAME` options
# (no `=`) would copy from its environment, to $FAKE_RUNTIME_DIR/calls.jsonl. It keeps
# networks, containers, images and volumes in $FAKE_RUNTIME_DIR/state.json, answering the
# existence checks the script makes: `network exists|inspect`, `container inspect --format`,
# `image exists|inspect`, `volume exists|inspect`, and `info --format` (whether podman is
# rootless: `rootless` in the state, true unless set). `exec` exits with the next status of
# `exec_exits` in the state (0 when none is left). As podman does, each container gets a new
# network address when it is created or started again (`next_ip`), and `container inspect
# --format` answers its address or the `--add-host` entries it was created with.
FAKE_RUNTIME = r"""
import json, os, sys
from pathlib import Path

base = Path(os.environ["FAKE_RUNTIME_DIR"])
name = Path(sys.argv[0]).name
args = sys.argv[1:]
by_name = [v for f, v in zip(args, args[1:]) if f == "-e" and "=" not in v]
with (base / "calls.jsonl").open("a") as log:
    entry = {"argv": [name, *args], "env": {v: os.environ.get(v) for v in by_name}}
    log.write(json.dumps(entry) + "\n")
state_file = base / "state.json"
state = json.loads(state_file.read_text()) if state_file.exists() else {
    "networks": [], "containers": {}, "images": [], "volumes": []}

def new_address():
    state["next_ip"] = state.get("next_ip", 2) + 1
    return f"10.89.0.{state['next_ip'] - 1}"

def save():
    state_file.write_text(json.dumps(state))

def option(flag):
    return args[args.index(flag) + 1] if flag in args else None

kind, verb = (args + ["", ""])[:2]
known = {"network": state["networks"], "image": state["images"], "volume": state["volumes"]}
if kind == "info":
    print("true" if state.get("rootless", True) else "false")
elif kind in known and verb in ("exists", "inspect"):
    sys.exit(0 if args[2] in known[kind] else 1)
if kind == "container" and verb == "inspect":
    container = state["containers"].get(args[-1])
    if container is None:
        sys.exit(1)
    asked = option("--format") or ""
    if "IPAddress" in asked:
        print(container["ip"] if container["running"] else "")
    elif "ExtraHosts" in asked:
        print("".join(host + "\n" for host in container.get("hosts", [])))
    else:
        print("true" if container["running"] else "false")
elif kind == "network" and verb == "create":
    print(args[2])  # as podman does
    state["networks"].append(args[2]); save()
elif kind == "build":
    state["images"].append(option("-t")); save()
elif kind == "run":
    if "-d" in args:
        print("0123456789abcdef")  # a detached run prints the container's id
    if "--rm" not in args:
        hosts = [v for f, v in zip(args, args[1:]) if f == "--add-host"]
        state["containers"][option("--name")] = {
            "running": "-d" in args, "ip": new_address(), "hosts": hosts}
    save()
elif kind == "start":
    if "--attach" not in args:
        print(args[-1])  # podman names what it started
    container = state["containers"][args[-1]]
    container["running"] = "--attach" not in args
    container["ip"] = new_address()
    save()
elif kind == "rm":
    print(args[-1])
    state["containers"].pop(args[-1], None); save()
elif kind == "exec":
    exits = state.get("exec_exits", [])
    status = exits.pop(0) if exits else 0
    save()
    sys.exit(status)
"""


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str
    commands: list[list[str]]  # stdout, one command line per line, split like a shell would
    calls: list[list[str]]  # what the fake runtimes were called with
    passed_env: list[dict[str, str | None]]  # per call: the values its `-e NAME` copied


@dataclass
class Sandbox:
    """A temporary world for the script: fake runtimes on PATH, HOME and a working directory."""

    root: Path
    bin: Path
    home: Path
    workdir: Path

    @classmethod
    def create(cls, root: Path, *runtimes: str) -> Sandbox:
        world = cls(root, root / "bin", root / "home", root / "work dir")
        for directory in (world.bin, world.home, world.workdir):
            directory.mkdir()
        for runtime in runtimes:
            path = world.bin / runtime
            path.write_text(f"#!{sys.executable}\n{FAKE_RUNTIME}")
            path.chmod(0o755)
        return world

    def set_state(
        self,
        networks: Sequence[str] = (),
        images: Sequence[str] = (),
        volumes: Sequence[str] = (),
        rootless: bool = True,
        exec_exits: Sequence[int] = (),
        proxy_seq_host: str = f"seq:{KEPT_SEQ_ADDRESS}",
        **containers: bool,
    ) -> None:
        """What the fake runtime knows; `containers` maps a name (`_` for `-`) to running.

        A kept Seq has the address KEPT_SEQ_ADDRESS; a kept proxy was made with
        `--add-host proxy_seq_host`.
        """
        kept = {k.replace("_", "-"): {"running": v} for k, v in containers.items()}
        for container_name, container in kept.items():
            container["ip"] = KEPT_SEQ_ADDRESS if container_name.endswith("-seq") else "10.89.0.9"
            container["hosts"] = [proxy_seq_host] if container_name.endswith("-api-logger") else []
        state = {
            "networks": list(networks), "images": list(images), "volumes": list(volumes),
            "rootless": rootless, "exec_exits": list(exec_exits), "next_ip": 20,
            "containers": kept,
        }
        (self.root / "state.json").write_text(json.dumps(state))

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        environment = {
            "PATH": str(self.bin),  # no real podman or docker can be found
            "HOME": str(self.home),
            "FAKE_RUNTIME_DIR": str(self.root),
            "ANTHROPIC_API_KEY": SECRET_API_KEY,
            **(env or {}),
        }
        done = subprocess.run(
            [BASH, str(SCRIPT), *args],
            cwd=self.workdir,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        calls_file = self.root / "calls.jsonl"
        entries = []
        if calls_file.exists():
            entries = [json.loads(line) for line in calls_file.read_text().splitlines()]
            calls_file.unlink()
        commands = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
        return Result(
            done.returncode, done.stdout, done.stderr, commands,
            [e["argv"] for e in entries], [e["env"] for e in entries],
        )

    def dry_run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """A --dry-run that must succeed, print only runtime commands and call no runtime."""
        result = self.run("--dry-run", *args, env=env)
        assert result.status == 0, result.stderr
        assert result.calls == [], "--dry-run called the container runtime"
        assert result.commands, "--dry-run printed nothing"
        assert {command[0] for command in result.commands} <= {"podman", "docker"}
        return result


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox.create(tmp_path, "podman", "docker")


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def options(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command[:-1]) if word == flag]


def runs_of(result: Result, image: str) -> list[list[str]]:
    """The `run` commands of one image."""
    return [c for c in result.commands if c[1] == "run" and image in c]


def container_run(result: Result, name: str) -> list[str]:
    runs = [c for c in result.commands if c[1] == "run" and option(c, "--name") == name]
    assert len(runs) == 1, f"expected one run of {name}: {result.commands}"
    return runs[0]


def network_creates(result: Result) -> list[list[str]]:
    return [c for c in result.commands if c[1:3] == ["network", "create"]]


def built_images(result: Result) -> list[str | None]:
    return [option(c, "-t") for c in result.commands if c[1] == "build"]


# --------------------------------------------------------------------------------------------
# Static checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_shell_scripts_are_shellcheck_clean(path: Path) -> None:
    """shellcheck reports nothing on the sandbox's shell scripts (CI installs shellcheck)."""
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: apt-get install -y shellcheck"
    done = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_help_describes_modes_and_flags(sandbox: Sandbox) -> None:
    """--help exits 0 and names every mode and flag, calling no runtime."""
    result = sandbox.run("--help")
    assert result.status == 0 and result.calls == []
    words = ("mount", "clone", "recover", "clean", "build", "--otel", "--log-api", "--runtime",
             "--dry-run", "--name", "--port-base", "--rm", "--repo", "--branch", "--volumes")
    for word in words:
        assert word in result.stdout


# --------------------------------------------------------------------------------------------
# Every mode and flag combination, in a dry run
# --------------------------------------------------------------------------------------------

MODES = {
    "mount": ["mount"],
    "default": [],
    "clone": ["clone", "--repo", SECRET_REPO, "--branch", "dev"],
    "recover": ["recover"],
}
FLAG_SETS = {"plain": [], "otel": ["--otel"], "otel+log-api": ["--otel", "--log-api"]}
RUNTIMES = ("podman", "docker")


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_dry_run_starts_exactly_what_the_flags_ask_for(
    sandbox: Sandbox, mode: list[str], flags: list[str], runtime: str
) -> None:
    """One network, Seq only with --otel, the proxy only with --log-api, and no secret printed."""
    env = {
        "SEQ_API_KEY": SECRET_SEQ_KEY,
        "CLAUDE_CODE_OAUTH_TOKEN": SECRET_OAUTH,
        "SEQ_FIRSTRUN_ADMINPASSWORD": SECRET_SEQ_PASSWORD,
    }
    result = sandbox.dry_run("--runtime", runtime, *flags, *mode, env=env)

    assert {c[0] for c in result.commands} == {runtime}
    assert network_creates(result) == [[runtime, "network", "create", "claude-sandbox-net"]]
    assert len(runs_of(result, SEQ_IMAGE)) == (1 if "--otel" in flags else 0)
    proxies = runs_of(result, PROXY_IMAGE)
    assert len(proxies) == (1 if "--log-api" in flags else 0)
    # With Seq beside it, the proxy container itself is asked whether it reaches seq:5341.
    probes = [c for c in result.commands if c[1:3] == ["exec", "claude-sandbox-api-logger"]]
    assert len(probes) == (1 if {"--otel", "--log-api"} <= set(flags) else 0)
    assert all('getaddrinfo("seq", 5341' in " ".join(probe) for probe in probes)
    for secret in SECRETS:
        assert secret not in result.stdout and secret not in result.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("flags", FLAG_SETS.values(), ids=FLAG_SETS.keys())
def test_claude_container_environment_follows_the_flags(
    sandbox: Sandbox, flags: list[str], runtime: str
) -> None:
    """Claude gets OTEL variables only with --otel and ANTHROPIC_BASE_URL only with --log-api."""
    result = sandbox.dry_run("--runtime", runtime, *flags, env={"SEQ_API_KEY": SECRET_SEQ_KEY})
    env = options(container_run(result, "claude-sandbox"), "-e")

    assert "ANTHROPIC_API_KEY" in env  # the name alone: the runtime copies the value
    otel_env = {
        "CLAUDE_CODE_ENABLE_TELEMETRY=1",
        "OTEL_LOGS_EXPORTER=otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://seq:5341/ingest/otlp",
        "OTEL_EXPORTER_OTLP_HEADERS",
    }
    if "--otel" in flags:
        assert otel_env <= set(env)
    else:
        assert not [e for e in env if e.startswith(("OTEL_", "CLAUDE_CODE_ENABLE_TELEMETRY"))]
    if "--log-api" in flags:
        assert "ANTHROPIC_BASE_URL=http://api-logger:8000" in env
    else:
        assert not [e for e in env if e.startswith("ANTHROPIC_BASE_URL")]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_companions_share_one_network_under_their_aliases(sandbox: Sandbox, runtime: str) -> None:
    """Seq and the proxy join the one network as `seq`/`api-logger`, ports on 127.0.0.1 only."""
    result = sandbox.dry_run(
        "--runtime", runtime, "--otel", "--log-api", env={"SEQ_API_KEY": SECRET_SEQ_KEY}
    )
    seq = container_run(result, "claude-sandbox-seq")
    proxy = container_run(result, "claude-sandbox-api-logger")
    claude = container_run(result, "claude-sandbox")
    for command in (seq, proxy, claude):
        assert option(command, "--network") == "claude-sandbox-net"
    assert "host.containers.internal" not in result.stdout
    assert option(seq, "--network-alias") == "seq"
    assert option(proxy, "--network-alias") == "api-logger"
    assert "-d" in seq and "-d" in proxy
    assert options(seq, "-p") == ["127.0.0.1:5480:80"]
    assert options(proxy, "-p") == ["127.0.0.1:5481:8000"]
    assert options(claude, "-p") == []
    assert "ACCEPT_EULA=Y" in options(seq, "-e")
    assert "claude-sandbox-seq-data:/data" in options(seq, "-v")
    proxy_env = set(options(proxy, "-e"))
    assert {"OTELPROXY_SEQ_URL=http://seq:5341", "OTELPROXY_SEQ_API_KEY"} <= proxy_env
    assert "claude-sandbox-logs:/var/log/otelproxy" in options(proxy, "-v")


def test_seq_gets_the_admin_password_by_name_or_starts_without_authentication(
    sandbox: Sandbox,
) -> None:
    """Seq gets the admin password by name when set, else starts without authentication."""
    with_password = sandbox.dry_run("--otel", env={"SEQ_FIRSTRUN_ADMINPASSWORD": "pw-VALUE"})
    seq = container_run(with_password, "claude-sandbox-seq")
    assert "SEQ_FIRSTRUN_ADMINPASSWORD" in options(seq, "-e")
    assert "pw-VALUE" not in with_password.stdout
    without = sandbox.dry_run("--otel")
    seq = container_run(without, "claude-sandbox-seq")
    assert "SEQ_FIRSTRUN_NOAUTHENTICATION=true" in options(seq, "-e")


def test_without_seq_api_key_no_key_variables_are_passed(sandbox: Sandbox) -> None:
    """With no SEQ_API_KEY, neither the proxy nor Claude Code gets an API key variable."""
    result = sandbox.dry_run("--otel", "--log-api")
    proxy = container_run(result, "claude-sandbox-api-logger")
    assert "OTELPROXY_SEQ_API_KEY" not in options(proxy, "-e")
    claude = container_run(result, "claude-sandbox")
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in options(claude, "-e")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mount_mode_mounts_the_current_directory_as_the_workspace(
    sandbox: Sandbox, runtime: str
) -> None:
    """mount: the current directory is /workspace and the working directory; home is a volume."""
    result = sandbox.dry_run("--runtime", runtime, "mount")
    claude = container_run(result, "claude-sandbox")
    assert f"{sandbox.workdir}:/workspace" in options(claude, "-v")
    assert option(claude, "-w") == "/workspace"
    assert "claude-sandbox-home:/home/node" in options(claude, "-v")
    assert "-i" in claude and "-t" in claude and "--rm" not in claude
    assert claude[-2:] == ["claude-sandbox:local", "claude"]
    # A dry run asks no runtime whether podman is rootless: it goes by the invoking user.
    rootless = runtime == "podman" and os.geteuid() != 0
    keep_id = [word for word in claude if word.startswith("--userns=keep-id")]
    assert keep_id == (["--userns=keep-id:uid=1000,gid=1000"] if rootless else [])


@pytest.mark.parametrize("rootless", [True, False], ids=["rootless", "root"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_keep_id_only_for_rootless_podman(sandbox: Sandbox, runtime: str, rootless: bool) -> None:
    """--userns=keep-id goes to rootless podman only: root podman refuses it, docker lacks it."""
    sandbox.set_state(["claude-sandbox-net"], ["claude-sandbox:local"], rootless=rootless)
    result = sandbox.run("--runtime", runtime, "mount")
    assert result.status == 0, result.stderr
    claude = next(c for c in result.calls if c[1] == "run")
    keep_id = [word for word in claude if word.startswith("--userns")]
    wanted = runtime == "podman" and rootless
    assert keep_id == (["--userns=keep-id:uid=1000,gid=1000"] if wanted else [])


def test_rm_flag_removes_the_claude_container_on_exit(sandbox: Sandbox) -> None:
    """--rm is passed to the Claude container only."""
    result = sandbox.dry_run("--rm", "--otel")
    assert "--rm" in container_run(result, "claude-sandbox")
    assert "--rm" not in container_run(result, "claude-sandbox-seq")


def test_claude_login_directory_is_mounted_read_only_when_present(sandbox: Sandbox) -> None:
    """~/.claude is mounted read-only when it exists, and not mounted when it does not."""
    absent = options(container_run(sandbox.dry_run(), "claude-sandbox"), "-v")
    assert not [volume for volume in absent if ".claude" in volume]
    (sandbox.home / ".claude").mkdir()
    present = options(container_run(sandbox.dry_run(), "claude-sandbox"), "-v")
    assert f"{sandbox.home}/.claude:/opt/claude-host:ro" in present


def test_credentials_are_passed_by_name_only_when_set(sandbox: Sandbox) -> None:
    """Each Claude credential variable set on the host is passed by name; unset ones are not."""
    result = sandbox.dry_run(env={"ANTHROPIC_AUTH_TOKEN": "tok-VALUE"})
    env = options(container_run(result, "claude-sandbox"), "-e")
    assert {"ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"} <= set(env)
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in env
    assert "tok-VALUE" not in result.stdout


def test_clone_mode_clones_into_a_volume_with_the_url_passed_by_name(sandbox: Sandbox) -> None:
    """clone: /workspace is a volume; the repository URL and branch are passed by name."""
    result = sandbox.dry_run("clone", "--repo", SECRET_REPO, "--branch", "dev")
    claude = container_run(result, "claude-sandbox")
    assert "claude-sandbox-workspace:/workspace" in options(claude, "-v")
    assert {"CLAUDE_SANDBOX_REPO", "CLAUDE_SANDBOX_BRANCH"} <= set(options(claude, "-e"))
    assert not [v for v in options(claude, "-v") if str(sandbox.workdir) in v]
    assert "SECRETVALUE" not in result.stdout


def test_name_and_port_base_rename_everything_and_move_the_ports(sandbox: Sandbox) -> None:
    """--name prefixes containers, network and volumes; --port-base moves the published ports."""
    result = sandbox.dry_run("--name", "box2", "--port-base", "6100", "--otel", "--log-api")
    assert network_creates(result)[0][-1] == "box2-net"
    assert options(container_run(result, "box2-seq"), "-p") == ["127.0.0.1:6100:80"]
    assert options(container_run(result, "box2-api-logger"), "-p") == ["127.0.0.1:6101:8000"]
    claude = container_run(result, "box2")
    assert option(claude, "--network") == "box2-net"
    assert "box2-home:/home/node" in options(claude, "-v")


def test_arguments_after_double_dash_go_to_claude(sandbox: Sandbox) -> None:
    """Words after `--` are appended to the `claude` command in the container."""
    result = sandbox.dry_run("mount", "--", "-p", "hello world")
    claude = container_run(result, "claude-sandbox")
    assert claude[-4:] == ["claude-sandbox:local", "claude", "-p", "hello world"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_recover_reattaches_to_the_kept_container(sandbox: Sandbox, runtime: str) -> None:
    """recover starts the kept Claude container attached instead of creating one."""
    result = sandbox.dry_run("--runtime", runtime, "recover")
    attach = [runtime, "start", "--attach", "--interactive", "claude-sandbox"]
    assert result.commands[-1] == attach
    assert not [c for c in result.commands if c[1] == "run"]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("volumes", [False, True], ids=["keep-volumes", "volumes"])
def test_clean_removes_containers_and_network_and_volumes_only_when_asked(
    sandbox: Sandbox, runtime: str, volumes: bool
) -> None:
    """clean removes the three containers and the network; --volumes also the four volumes."""
    result = sandbox.dry_run("--runtime", runtime, "clean", *(["--volumes"] if volumes else []))
    assert result.commands[:4] == [
        [runtime, "rm", "-f", "claude-sandbox"],
        [runtime, "rm", "-f", "claude-sandbox-api-logger"],
        [runtime, "rm", "-f", "claude-sandbox-seq"],
        [runtime, "network", "rm", "claude-sandbox-net"],
    ]
    removed_volumes = [c[-1] for c in result.commands if c[1:3] == ["volume", "rm"]]
    every_volume = [
        "claude-sandbox-home",
        "claude-sandbox-workspace",
        "claude-sandbox-logs",
        "claude-sandbox-seq-data",
    ]
    assert removed_volumes == (every_volume if volumes else [])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_build_builds_both_images(sandbox: Sandbox, runtime: str) -> None:
    """build builds the proxy and the Claude image (version build arg; podman: docker format)."""
    result = sandbox.dry_run("--runtime", runtime, "build", env={"CLAUDE_CODE_VERSION": "2.1.0"})
    proxy, claude = result.commands
    assert proxy[1] == claude[1] == "build"
    assert option(proxy, "-t") == PROXY_IMAGE
    assert option(proxy, "-f") == str(REPO_ROOT / "Containerfile")
    assert proxy[-1] == str(REPO_ROOT)
    assert option(claude, "-t") == "claude-sandbox:local"
    assert option(claude, "-f") == str(SANDBOX / "Containerfile.claude")
    assert claude[-1] == str(SANDBOX)
    assert option(claude, "--build-arg") == "CLAUDE_CODE_VERSION=2.1.0"
    for command in (proxy, claude):
        assert (option(command, "--format") == "docker") == (runtime == "podman")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_build_takes_base_images_from_the_environment(sandbox: Sandbox, runtime: str) -> None:
    """PYTHON_IMAGE and NODE_IMAGE become the base-image build arguments of the two images."""
    env = {"PYTHON_IMAGE": "localhost/base:1", "NODE_IMAGE": "localhost/node:1"}
    proxy, claude = sandbox.dry_run("--runtime", runtime, "build", env=env).commands
    assert options(proxy, "--build-arg") == ["PYTHON_IMAGE=localhost/base:1"]
    assert options(claude, "--build-arg") == ["CLAUDE_CODE_VERSION=latest",
                                              "NODE_IMAGE=localhost/node:1"]
    plain_proxy, plain_claude = sandbox.dry_run("--runtime", runtime, "build").commands
    assert options(plain_proxy, "--build-arg") == []
    assert options(plain_claude, "--build-arg") == ["CLAUDE_CODE_VERSION=latest"]


def test_proxy_upstream_is_passed_by_name_only_when_set(sandbox: Sandbox) -> None:
    """OTELPROXY_DEFAULT_UPSTREAM reaches the proxy container (by name) only when it is set."""
    plain = sandbox.dry_run("--otel", "--log-api")
    assert "OTELPROXY_DEFAULT_UPSTREAM" not in options(
        container_run(plain, "claude-sandbox-api-logger"), "-e")
    env = {"OTELPROXY_DEFAULT_UPSTREAM": "http://upstream:9000"}
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", env=env)
    assert result.status == 0, result.stderr
    passed = [values for call, values in zip(result.calls, result.passed_env, strict=True)
              if option(call, "--name") == "claude-sandbox-api-logger"]
    assert passed == [{"OTELPROXY_DEFAULT_UPSTREAM": "http://upstream:9000"}]


def test_dry_run_of_a_sandbox_builds_the_images_it_needs(sandbox: Sandbox) -> None:
    """A dry run builds the Claude image, and the proxy image only with --log-api."""
    assert built_images(sandbox.dry_run()) == ["claude-sandbox:local"]
    logged = sandbox.dry_run("--otel", "--log-api")
    assert built_images(logged) == ["claude-sandbox:local", PROXY_IMAGE]


# --------------------------------------------------------------------------------------------
# Runtime detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "flags", "expected"),
    [
        (("podman", "docker"), [], "podman"),
        (("docker",), [], "docker"),
        (("podman",), [], "podman"),
        (("podman", "docker"), ["--runtime", "docker"], "docker"),
        ((), ["--runtime", "docker"], "docker"),  # a dry run needs no installed runtime
    ],
)
def test_runtime_is_podman_if_present_else_docker_unless_named(
    tmp_path: Path, installed: tuple[str, ...], flags: list[str], expected: str
) -> None:
    """Detection prefers podman, falls back to docker, and --runtime overrides it."""
    result = Sandbox.create(tmp_path, *installed).dry_run(*flags, "--otel")
    assert {c[0] for c in result.commands} == {expected}


def test_no_container_runtime_is_a_clear_error(tmp_path: Path) -> None:
    """With neither podman nor docker on PATH the script says so and fails, running nothing."""
    world = Sandbox.create(tmp_path)
    for args in (["--dry-run"], []):
        result = world.run(*args)
        assert result.status == 1 and result.stdout == ""
        assert "no container runtime found" in result.stderr


def test_named_runtime_that_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    """Outside a dry run, --runtime naming a runtime that is not installed fails clearly."""
    result = Sandbox.create(tmp_path, "podman").run("--runtime", "docker")
    assert result.status == 1 and "'docker' not found" in result.stderr and result.calls == []


# --------------------------------------------------------------------------------------------
# Usage errors: status 2, nothing started
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-api"], "--log-api needs --otel"),
        (["--log-api", "mount"], "--log-api needs --otel"),
        (["--dry-run", "--log-api"], "--log-api needs --otel"),
        (["--log-api", "recover"], "--log-api needs --otel"),
        (["--bogus"], "unknown flag: --bogus"),
        (["teleport"], "unknown mode: teleport"),
        (["mount", "clone"], "one mode at a time"),
        (["clone"], "clone needs --repo"),
        (["clone", "--branch", "dev"], "clone needs --repo"),
        (["mount", "--repo", "https://example.com/r.git"], "for clone mode only"),
        (["--runtime"], "--runtime needs a value"),
        (["--repo", "--otel", "clone"], "--repo needs a value"),
        (["--runtime", "lxc"], "--runtime must be podman or docker"),
        (["--port-base", "http"], "--port-base must be a port number"),
        (["--port-base", "70000"], "--port-base must be a port number"),
        (["--name", "bad name"], "--name must be"),
        (["clean", "--", "-p", "x"], "arguments after -- are for Claude Code"),
    ],
)
def test_usage_errors_exit_2_and_start_nothing(
    sandbox: Sandbox, args: list[str], message: str
) -> None:
    """A usage error prints one clear message on stderr, exits 2, and calls no runtime."""
    result = sandbox.run(*args)
    assert result.status == 2, result.stderr
    assert message in result.stderr
    assert result.stdout == "" and result.calls == []


# --------------------------------------------------------------------------------------------
# Real runs against the stateful fake runtime
# --------------------------------------------------------------------------------------------


def created(calls: list[list[str]]) -> list[str]:
    """What a run created: images, networks and containers, in order."""
    out = []
    for call in calls:
        if call[1:3] == ["network", "create"]:
            out.append(f"network {call[3]}")
        elif call[1] == "exec":
            out.append(f"probe in {call[2]}")  # does the proxy reach seq:5341?
        elif call[1] == "run":
            out.append(f"container {option(call, '--name')}")
        elif call[1] == "build":
            out.append(f"image {option(call, '-t')}")
    return out


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_second_run_reuses_the_network_seq_and_proxy(sandbox: Sandbox, runtime: str) -> None:
    """A second run reuses the network, images, Seq and proxy; only Claude's container is new."""
    args = ("--runtime", runtime, "--otel", "--log-api", "mount")
    first = sandbox.run(*args)
    assert first.status == 0, first.stderr
    assert created(first.calls) == [
        "image claude-sandbox:local",
        "image otelproxy:local",
        "network claude-sandbox-net",
        "container claude-sandbox-seq",
        "container claude-sandbox-api-logger",
        "probe in claude-sandbox-api-logger",
        "container claude-sandbox",
    ]

    second = sandbox.run(*args)
    assert second.status == 0, second.stderr
    assert created(second.calls) == ["container claude-sandbox"]
    assert [runtime, "rm", "claude-sandbox"] in second.calls  # the stopped one; volumes stay
    assert "reusing running container claude-sandbox-seq" in second.stderr
    assert "reusing running container claude-sandbox-api-logger" in second.stderr
    for secret in SECRETS:
        assert not [call for call in first.calls + second.calls if secret in " ".join(call)]


PROXY_PROBE = ["podman", "exec", "claude-sandbox-api-logger"]


def probes_and_restarts(calls: list[list[str]]) -> list[str]:
    return [c[1] for c in calls if c[:3] == PROXY_PROBE or c[1] == "restart"]


def test_proxy_that_cannot_resolve_seq_is_restarted_once_and_asked_again(
    sandbox: Sandbox,
) -> None:
    """`seq` unresolvable in the new proxy (status 3): restart the proxy, then ask it again."""
    sandbox.set_state(images=["claude-sandbox:local", PROXY_IMAGE], exec_exits=[3, 0])
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", "mount")
    assert result.status == 0, result.stderr
    assert probes_and_restarts(result.calls) == ["exec", "restart", "exec"]
    assert ["podman", "restart", "claude-sandbox-api-logger"] in result.calls
    assert "the proxy container cannot resolve seq; restarting it" in result.stderr
    assert result.calls[-1][1] == "run"  # and Claude Code starts after it


def test_proxy_that_resolves_seq_but_cannot_reach_it_yet_is_not_restarted(
    sandbox: Sandbox,
) -> None:
    """Seq not accepting yet (status 1) is said and left to the export's retries: no restart."""
    sandbox.set_state(images=["claude-sandbox:local", PROXY_IMAGE], exec_exits=[1])
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", "mount")
    assert result.status == 0, result.stderr
    assert probes_and_restarts(result.calls) == ["exec"]
    assert "Seq is not reachable from the proxy yet" in result.stderr


def test_running_proxy_is_not_asked_again(sandbox: Sandbox) -> None:
    """A proxy that was already running is reused as it is: no probe, no restart."""
    sandbox.set_state(
        ["claude-sandbox-net"], ["claude-sandbox:local", PROXY_IMAGE],
        claude_sandbox_seq=True, claude_sandbox_api_logger=True,
    )
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", "mount")
    assert result.status == 0, result.stderr
    assert probes_and_restarts(result.calls) == []


def runs_named(calls: list[list[str]], name: str) -> list[list[str]]:
    return [c for c in calls if c[1] == "run" and option(c, "--name") == name]


def proxy_runs(calls: list[list[str]]) -> list[list[str]]:
    return runs_named(calls, "claude-sandbox-api-logger")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_proxy_finds_seq_by_the_address_the_runtime_gave_it(
    sandbox: Sandbox, runtime: str
) -> None:
    """The proxy is made with `--add-host seq:<Seq's address>`, read after Seq started: no DNS."""
    sandbox.set_state(images=["claude-sandbox:local", PROXY_IMAGE])
    result = sandbox.run("--runtime", runtime, "--otel", "--log-api", "mount")
    assert result.status == 0, result.stderr
    seq_address = "10.89.0.20"  # the fake's first new address: Seq's, created first
    (proxy,) = proxy_runs(result.calls)
    assert options(proxy, "--add-host") == [f"seq:{seq_address}"]
    asked = [c for c in result.calls if c[1:3] == ["container", "inspect"] and "IPAddr" in c[4]]
    assert asked and asked[0][-1] == "claude-sandbox-seq" and '"claude-sandbox-net"' in asked[0][4]
    (claude,) = runs_named(result.calls, "claude-sandbox")
    assert "--add-host" not in claude  # Claude Code's container resolves seq as before


def test_dry_run_shows_where_seq_address_goes(sandbox: Sandbox) -> None:
    """A dry run cannot ask for Seq's address: the proxy's --add-host shows a placeholder."""
    result = sandbox.dry_run("--otel", "--log-api")
    proxy = container_run(result, "claude-sandbox-api-logger")
    assert options(proxy, "--add-host") == ["seq:<address-of-claude-sandbox-seq>"]


def test_kept_proxy_made_for_another_seq_address_is_replaced(sandbox: Sandbox) -> None:
    """A running proxy made for an address Seq no longer has is removed and made anew."""
    sandbox.set_state(
        ["claude-sandbox-net"], ["claude-sandbox:local", PROXY_IMAGE],
        proxy_seq_host="seq:10.89.0.7", claude_sandbox_seq=True, claude_sandbox_api_logger=True,
    )
    result = sandbox.run("--runtime", "docker", "--otel", "--log-api", "mount")
    assert result.status == 0, result.stderr
    assert ["docker", "rm", "-f", "claude-sandbox-api-logger"] in result.calls
    (proxy,) = proxy_runs(result.calls)
    assert options(proxy, "--add-host") == [f"seq:{KEPT_SEQ_ADDRESS}"]
    assert "replacing the proxy container" in result.stderr
    assert probes_and_restarts(
        [["podman", *c[1:]] for c in result.calls]) == ["exec"]  # asked again, as a new one


def test_recover_replaces_the_proxy_when_seq_comes_back_at_another_address(
    sandbox: Sandbox,
) -> None:
    """recover starts the stopped Seq; at its new address the kept proxy is recreated for it;
    stdout stays Claude Code's."""
    sandbox.set_state(
        ["claude-sandbox-net"], ["claude-sandbox:local", PROXY_IMAGE],
        claude_sandbox=False, claude_sandbox_seq=False, claude_sandbox_api_logger=False,
    )
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", "recover")
    assert result.status == 0, result.stderr
    assert ["podman", "start", "claude-sandbox-seq"] in result.calls
    assert ["podman", "rm", "-f", "claude-sandbox-api-logger"] in result.calls
    assert ["podman", "start", "claude-sandbox-api-logger"] not in result.calls
    (proxy,) = proxy_runs(result.calls)
    assert options(proxy, "--add-host") == ["seq:10.89.0.20"]  # Seq's address once started
    assert result.calls[-1] == ["podman", "start", "--attach", "--interactive", "claude-sandbox"]
    assert result.stdout == ""  # the names `start` and `rm` print stay off Claude Code's stdout


def test_kept_proxy_for_seq_unchanged_address_is_started_not_recreated(sandbox: Sandbox) -> None:
    """With Seq still at the address the stopped proxy was made for, the proxy is just started."""
    sandbox.set_state(
        ["claude-sandbox-net"], ["claude-sandbox:local", PROXY_IMAGE],
        claude_sandbox_seq=True, claude_sandbox_api_logger=False,
    )
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", "mount")
    assert result.status == 0, result.stderr
    assert ["podman", "start", "claude-sandbox-api-logger"] in result.calls
    assert proxy_runs(result.calls) == []


def test_stdout_is_left_to_claude_code(sandbox: Sandbox) -> None:
    """The ids that detached runs print stay off stdout, so `-- -p` output is Claude's alone."""
    result = sandbox.run("--runtime", "podman", "--otel", "--log-api", "mount", "--", "-p", "x")
    assert result.status == 0, result.stderr
    assert len([c for c in result.calls if "-d" in c]) == 2
    assert result.stdout == ""



def test_stopped_companions_are_started_not_recreated(sandbox: Sandbox) -> None:
    """A stopped Seq is started again rather than created anew (or failing on its name)."""
    sandbox.set_state(["claude-sandbox-net"], ["claude-sandbox:local"], claude_sandbox_seq=False)
    result = sandbox.run("--runtime", "docker", "--otel")
    assert result.status == 0, result.stderr
    assert ["docker", "start", "claude-sandbox-seq"] in result.calls
    assert created(result.calls) == ["container claude-sandbox"]


def test_running_claude_container_is_not_started_twice(sandbox: Sandbox) -> None:
    """When the Claude container is already running, mount refuses and points at recover."""
    sandbox.set_state(images=["claude-sandbox:local"], claude_sandbox=True)
    result = sandbox.run("--runtime", "podman")
    assert result.status == 1 and "already running" in result.stderr
    assert "recover" in result.stderr
    assert not [c for c in result.calls if c[1] == "run"]


def test_recover_without_a_kept_container_is_a_clear_error(sandbox: Sandbox) -> None:
    """recover with no kept container says how to start one."""
    result = sandbox.run("--runtime", "podman", "recover")
    assert result.status == 1 and "no kept container named claude-sandbox" in result.stderr


def test_recover_restarts_stopped_companions_and_attaches(sandbox: Sandbox) -> None:
    """recover starts the stopped Seq it finds, then the Claude container attached."""
    sandbox.set_state(
        ["claude-sandbox-net"],
        claude_sandbox=False,
        claude_sandbox_seq=False,
        claude_sandbox_api_logger=True,
    )
    result = sandbox.run("--runtime", "podman", "recover")
    assert result.status == 0, result.stderr
    assert [c for c in result.calls if c[1] == "start"] == [
        ["podman", "start", "claude-sandbox-seq"],
        ["podman", "start", "--attach", "--interactive", "claude-sandbox"],
    ]


def test_clean_removes_only_what_exists(sandbox: Sandbox) -> None:
    """Outside a dry run, clean removes what exists and skips the rest without failing."""
    sandbox.set_state(
        ["claude-sandbox-net"], volumes=["claude-sandbox-home"], claude_sandbox_seq=True
    )
    result = sandbox.run("--runtime", "podman", "clean", "--volumes")
    assert result.status == 0, result.stderr
    assert [c for c in result.calls if "rm" in c[1:3]] == [
        ["podman", "rm", "-f", "claude-sandbox-seq"],
        ["podman", "network", "rm", "claude-sandbox-net"],
        ["podman", "volume", "rm", "claude-sandbox-home"],
    ]


def test_dry_run_never_consults_a_runtime_even_when_one_is_installed(sandbox: Sandbox) -> None:
    """A dry run prints the create commands without asking the installed runtime what exists."""
    sandbox.set_state(["claude-sandbox-net"], ["claude-sandbox:local"], claude_sandbox_seq=True)
    result = sandbox.dry_run("--otel")
    assert network_creates(result) and runs_of(result, SEQ_IMAGE)


def test_values_passed_by_name_reach_the_runtime(sandbox: Sandbox) -> None:
    """Each `-e NAME` finds its value (credentials, Seq key, clone URL) in the runtime's env."""
    env = {"SEQ_API_KEY": SECRET_SEQ_KEY, "SEQ_FIRSTRUN_ADMINPASSWORD": SECRET_SEQ_PASSWORD}
    result = sandbox.run(
        "--runtime", "podman", "--otel", "--log-api", "clone", "--repo", SECRET_REPO, env=env
    )
    assert result.status == 0, result.stderr
    passed = {
        option(call, "--name"): values
        for call, values in zip(result.calls, result.passed_env, strict=True)
        if call[1] == "run"
    }
    assert passed["claude-sandbox-seq"] == {"SEQ_FIRSTRUN_ADMINPASSWORD": SECRET_SEQ_PASSWORD}
    assert passed["claude-sandbox-api-logger"] == {"OTELPROXY_SEQ_API_KEY": SECRET_SEQ_KEY}
    assert passed["claude-sandbox"] == {
        "ANTHROPIC_API_KEY": SECRET_API_KEY,
        "CLAUDE_SANDBOX_REPO": SECRET_REPO,
        "OTEL_EXPORTER_OTLP_HEADERS": f"X-Seq-ApiKey={SECRET_SEQ_KEY}",
    }
