"""Run the real ``otelproxy`` command line as a subprocess (for CLI, signal and stderr checks).

    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(tmp_path)]) as running:
        httpx2.get(running.url + "/healthz")
    running.returncode, running.stderr

It listens on ``--port 0`` unless the arguments say otherwise and learns the port from the
start-up log line; stderr goes to a file (no pipe to fill up) and is read back after exit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on http://[^:\s]+:(\d+)")


def otelproxy_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "otelproxy", *args]


def run_cli(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 20,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``otelproxy ARGS`` to completion (for --help and start-up errors)."""
    return subprocess.run(
        otelproxy_command(args), capture_output=True, text=True, timeout=timeout,
        env=child_env(env), cwd=cwd or REPO,
    )


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without OTELPROXY_*/OTEL_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTELPROXY_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class ProxyProcess:
    """``otelproxy`` in a subprocess; ``url``/``port`` once it listens."""

    def __init__(
        self, args: Sequence[str], env: Mapping[str, str] | None = None,
        cwd: Path | None = None, startup_timeout: float = 20,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """``preexec_fn`` runs in the child before otelproxy starts (e.g. to lower a limit)."""
        if "--port" not in args:
            args = [*args, "--port", "0"]
        self._stderr_file = tempfile.NamedTemporaryFile(prefix="otelproxy-stderr-")  # noqa: SIM115
        self._saved_stderr: str | None = None
        self.process = subprocess.Popen(
            otelproxy_command(args), stdout=subprocess.DEVNULL, stderr=self._stderr_file,
            env=child_env(env), cwd=cwd or REPO, preexec_fn=preexec_fn,
        )
        self.port = self._wait_listening(startup_timeout)
        self.url = f"http://127.0.0.1:{self.port}"
        self.returncode: int | None = None

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.stderr)
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"otelproxy exited with {self.process.returncode}: "
                                   f"{self.stderr}")
            time.sleep(0.02)
        self.process.kill()
        raise RuntimeError(f"otelproxy did not start in {timeout} s: {self.stderr}")

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr so far (all of it after the ``with``)."""
        if self._saved_stderr is not None:
            return self._saved_stderr
        return Path(self._stderr_file.name).read_text(errors="replace")

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20) -> int:
        self.returncode = self.process.wait(timeout)
        return self.returncode

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.send_signal(signum)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.process.poll() is None:
                self.stop()
            else:
                self.returncode = self.process.returncode
        finally:
            self._saved_stderr = self.stderr
            self._stderr_file.close()
