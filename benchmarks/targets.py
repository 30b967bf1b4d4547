"""The proxies a run measures, how each is started, and how the run knows it is done recording.

direct           no proxy: the load generator talks to the fake upstream (the floor)
relay            ``benchmarks.servers relay``: a TCP relay, the floor any proxy on CPU 1 pays
relay-c          ``benchmarks/relay.c`` (built with ``cc -O2`` into the run's directory): the
                 same relay in C, the floor of a hop through CPU 1 without an interpreter
bare             ``benchmarks.servers bare``: otelproxy's forwarding without the record
otelproxy        ``python -m otelproxy`` recording into a temporary log dir (JSONL + SQLite)
otelproxy+otlp   the same, exporting OTLP/HTTP to the loopback receiver as well (``--seq-url``;
                 batches sent after at most 1 s, ``OTEL_BSP/BLRP_SCHEDULE_DELAY=1000``)
otelproxy-other  ``python -m otelproxy`` from another copy of the code (``--other-src DIR``: DIR
                 holds an ``otelproxy`` package; started in DIR, which ``-m`` puts first on
                 ``sys.path``), for an A/B of two versions in one run; only when asked for
otelproxy-other+otlp  the other copy exporting, as otelproxy+otlp (``--targets`` names it)
mitmproxy        ``mitmdump --mode reverse:UPSTREAM -w FILE -s benchmarks/mitm_sse.py``: records
                 every flow to a file; SSE streamed through (see mitm_sse.py)
claude-tap       ``claude-tap --tap-no-launch --tap-proxy-mode reverse --tap-target UPSTREAM``:
                 records every exchange into its SQLite trace store (live viewer off)

The peers come from their own virtualenv (``benchmarks/install-peers.sh``); one that is not
installed or does not start is reported with the reason, never left out silently.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import HOST, Pinning, Process, free_port, wait_listening

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"
PROXIES = ("relay-c", "relay", "bare", "otelproxy", "otelproxy+otlp", "mitmproxy", "claude-tap")
OURS = ("otelproxy", "otelproxy+otlp")
OTHER = "otelproxy-other"
OTHER_OTLP = "otelproxy-other+otlp"
PEERS = ("mitmproxy", "claude-tap")


@dataclass
class Target:
    """One thing the load generator sends requests to."""

    name: str
    url: str = ""
    """The Anthropic ``/v1/messages`` URL on this target."""
    process: Process | None = None
    health_url: str | None = None
    """otelproxy only: its ``/healthz``, to wait until the record has caught up."""
    record_path: Path | None = None
    """Where the target writes its record (file or directory), to show it recorded."""
    version: str = ""
    error: str | None = None
    """Why this target could not be measured (not installed, did not start)."""
    sent: int = 0
    failures: int = 0
    """Requests that did not come back whole (status, body or stream cut short)."""
    notes: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.error is None and bool(self.url)


@contextlib.contextmanager
def serving(role: str) -> Iterator[int]:
    """One of the benchmark's servers (``benchmarks.servers ROLE``: ``upstream``, ``otlp``) in
    its own process, unpinned, for the tools beside the main run; yields its port."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.servers", role, "--port",
                                str(port)], cwd=HERE.parent, env=clean_env(),
                               stdout=subprocess.DEVNULL)
    try:
        wait_listening(port, process, 60)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus proxy and OpenTelemetry settings that would send traffic
    elsewhere, plus ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("OTEL_") and key.lower() not in (
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env.update(extra)
    return env


def _missing(executable: Path, target: Target) -> bool:
    """True, with the reason on ``target``, when a peer's program is not installed."""
    if executable.exists():
        return False
    target.error = f"not installed: no {executable} (bash benchmarks/install-peers.sh)"
    return True


def _build_c_relay(work: Path, target: Target) -> Path | None:
    """``benchmarks/relay.c`` compiled into ``work``; None, with the reason on ``target``, when
    it cannot be."""
    executable = work / "relay-c"
    try:
        completed = subprocess.run(["cc", "-O2", "-o", str(executable), str(HERE / "relay.c")],
                                   capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        target.error = f"not built: no C compiler ({type(exc).__name__}: cc)"
        return None
    if completed.returncode != 0:
        target.error = f"not built: cc failed: {completed.stderr.strip()[-300:]}"
        return None
    return executable


def _peer_version(executable: Path, distribution: str) -> str:
    python = executable.parent / "python"
    completed = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
        capture_output=True, text=True, timeout=60, check=False)
    return completed.stdout.strip()


def compile_sources(other_src: str = "") -> None:
    """Byte-compile the Python code the targets run from this checkout (otelproxy, the
    benchmark's servers, ``other_src``), as ``pip install`` does for an installed package.
    Without it, where ``PYTHONDONTWRITEBYTECODE`` is set (as on the development machine), every
    start compiled otelproxy's modules from source, and compilation's freed heap stayed
    resident: idle, otelproxy's tree took 60.8 MiB instead of 60.2, bare 40.2 instead of 39.8
    (``benchmarks.idle``, 2026-12-07)."""
    import otelproxy

    dirs = [Path(otelproxy.__file__).parent, Path(__file__).parent]
    if other_src:
        dirs.append(Path(other_src))
    for directory in dirs:
        compileall.compile_dir(directory, quiet=1)


def build(name: str, upstream_port: int, otlp_port: int | None, work: Path,
          pinning: Pinning, peers_venv: Path = PEERS_VENV, other_src: str = "") -> Target:
    """Describe and start ``name`` (not yet waited for): see the module docstring."""
    target = Target(name)
    if name == "direct":
        target.url = f"http://{HOST}:{upstream_port}/v1/messages"
        return target
    port = free_port()
    upstream = f"http://{HOST}:{upstream_port}"
    route = f"http://{HOST}:{port}/anthropic/{HOST}:{upstream_port}/v1/messages"
    log_path = work / f"{name}.log"
    if name == "relay-c":
        executable = _build_c_relay(work, target)
        if executable is None:
            return target
        argv = [str(executable), str(port), str(upstream_port)]
        target.url = f"http://{HOST}:{port}/v1/messages"
        env = clean_env()
    elif name == "relay":
        argv = [sys.executable, "-X", "faulthandler",  # a crash leaves its traceback
                "-m", "benchmarks.servers", "relay", "--port", str(port),
                "--upstream-port", str(upstream_port)]
        target.url = f"http://{HOST}:{port}/v1/messages"
        env = clean_env()
    elif name == "bare":
        argv = [sys.executable, "-m", "benchmarks.servers", "bare", "--port", str(port)]
        target.url = route
        env = clean_env()
    elif name in OURS or name in (OTHER, OTHER_OTLP):
        log_dir = target.record_path = work / f"{name}-record"
        argv = [sys.executable, "-m", "otelproxy", "--port", str(port), "--log-dir",
                str(log_dir), "--upstream", upstream, "--log-level", "warning",
                "--grace-period", "5"]
        target.url = route
        target.health_url = f"http://{HOST}:{port}/healthz"
        # Export batches leave after 1 s instead of the default 5 s, so the run need not wait
        # 5 s after each phase for the last batch; smaller batches cost otelproxy more, not less.
        # The service name tells the receiver whose spans it counts (two may export).
        env = clean_env(OTEL_BSP_SCHEDULE_DELAY="1000", OTEL_BLRP_SCHEDULE_DELAY="1000",
                        OTEL_SERVICE_NAME=name)
        if exports(name):
            assert otlp_port is not None
            argv += ["--seq-url", f"http://{HOST}:{otlp_port}", "--seq-api-key", "bench-key"]
        from otelproxy import __version__

        target.version = __version__
    elif name == "mitmproxy":
        executable = peers_venv / "bin" / "mitmdump"
        target.record_path = work / "mitmproxy.flows"
        if _missing(executable, target):
            return target
        argv = [str(executable), "--mode", f"reverse:{upstream}/", "--listen-host", HOST,
                "--listen-port", str(port), "-q", "-w", str(target.record_path),
                "-s", str(HERE / "mitm_sse.py"), "--set", f"confdir={work / 'mitmproxy-conf'}",
                "--set", "termlog_verbosity=error"]
        target.url = f"http://{HOST}:{port}/v1/messages"
        target.version = _peer_version(executable, "mitmproxy")
        env = clean_env()
    elif name == "claude-tap":
        executable = peers_venv / "bin" / "claude-tap"
        target.record_path = work / "claude-tap-data"
        if _missing(executable, target):
            return target
        argv = [str(executable), "--tap-no-launch", "--tap-proxy-mode", "reverse",
                "--tap-host", HOST, "--tap-port", str(port), "--tap-target", upstream,
                "--tap-no-live", "--tap-no-open", "--tap-max-traces", "0",
                "--tap-output-dir", str(work / "claude-tap-traces")]
        target.url = f"http://{HOST}:{port}/v1/messages"
        target.version = _peer_version(executable, "claude-tap")
        env = clean_env(HOME=str(work / "claude-tap-home"),
                        XDG_DATA_HOME=str(target.record_path),
                        CLOUDTAP_DB=str(target.record_path / "traces.db"))
        (work / "claude-tap-home").mkdir(exist_ok=True)
    else:
        raise ValueError(f"unknown target {name!r}")
    target.process = Process(name, argv, env, log_path, pinning.for_proxy(),
                             other_src if name in (OTHER, OTHER_OTLP) else None)
    target.process.start()
    return target


def exports(name: str) -> bool:
    """Whether target ``name`` exports OTLP to the run's receiver."""
    return name in ("otelproxy+otlp", OTHER_OTLP)


def record_bytes(target: Target) -> int | None:
    """Bytes the target's record holds on disk (None: it keeps none)."""
    path = target.record_path
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def wait_ready(target: Target, port_timeout: float = 60.0) -> None:
    """Wait until the target accepts connections; on failure set ``target.error``."""
    process = target.process
    if process is None or target.error is not None:
        return
    port = int(target.url.split(":")[2].split("/")[0])
    try:
        wait_listening(port, process.popen, port_timeout)
    except RuntimeError as exc:
        target.error = f"did not start: {exc}; its output ends with: {process.log_tail(600)!r}"
