"""Processes of a benchmark run: CPU pinning, starting a target, and reading a process tree's
CPU time and resident memory from ``/proc`` (Linux)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
LOAD_CPU = 0
"""The load generator, the fake upstream, the OTLP receiver and wrk run here."""
PROXY_CPU = 1
"""The measured proxy's whole process tree runs here."""


@dataclass(frozen=True)
class Pinning:
    """Whether the run pins CPUs, and why not when it does not."""

    active: bool
    reason: str = ""

    def for_proxy(self) -> Callable[[], None] | None:
        """A ``preexec_fn`` that moves a starting proxy (and so its children) to PROXY_CPU."""
        if not self.active:
            return None
        return lambda: os.sched_setaffinity(0, {PROXY_CPU})

    def for_load(self) -> Callable[[], None] | None:
        if not self.active:
            return None
        return lambda: os.sched_setaffinity(0, {LOAD_CPU})


def pin_load_generator() -> Pinning:
    """Pin this process (and every process it starts later, unless moved) to LOAD_CPU."""
    if not hasattr(os, "sched_setaffinity"):
        return Pinning(False, "os.sched_setaffinity is not available on this system")
    allowed = os.sched_getaffinity(0)
    if not {LOAD_CPU, PROXY_CPU} <= allowed:
        return Pinning(False, f"CPUs {LOAD_CPU} and {PROXY_CPU} are not both available "
                       f"(allowed: {sorted(allowed)})")
    os.sched_setaffinity(0, {LOAD_CPU})
    return Pinning(True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Until something accepts on 127.0.0.1:``port``; raise when the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout:g} s")


@dataclass
class Process:
    """One started server process, its output in a log file."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    preexec: Callable[[], None] | None = None
    cwd: str | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                list(self.argv), env=dict(self.env), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=self.preexec, start_new_session=True,
                cwd=self.cwd)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process, wait, then SIGKILL its whole group if it is still there."""
        popen = self.popen
        if popen is None:
            return None
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, 9)
                popen.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, 9)  # whatever it left behind in its own session
        return popen.returncode


# -- /proc ---------------------------------------------------------------------------------------


def _stat(pid: int | str) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def tree(pid: int) -> list[int]:
    """``pid`` and every live process below it (a recorder subprocess, say)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(_stat(entry.name)[1]), []).append(int(entry.name))
    found = [pid]
    todo = [pid]
    while todo and len(found) < 1000:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


_TICKS = os.sysconf("SC_CLK_TCK")


def _label(member: int) -> str:
    """What a process of a tree is, for the CPU split: otelproxy's recorder process
    (``python -m otelproxy.recorder_process``), else the program's name."""
    try:
        command = Path(f"/proc/{member}/cmdline").read_bytes()
    except OSError:
        return "gone"
    if b"otelproxy.recorder_process" in command:
        return "recorder"
    return Path(command.split(b"\0")[0].decode(errors="replace")).name or "?"


def tree_cpu_by_process(pid: int) -> dict[str, float]:
    """CPU seconds (user + system, every thread) per process of ``pid``'s tree: ``main`` (with
    the children it has waited for), the others by what they are (``_label``)."""
    ticks: dict[str, int] = {}
    for index, member in enumerate(tree(pid)):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat(member)
            used = int(fields[11]) + int(fields[12])  # utime, stime
            if index == 0:
                used += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
            label = "main" if index == 0 else _label(member)
            ticks[label] = ticks.get(label, 0) + used
    return {label: used / _TICKS for label, used in ticks.items()}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants, including children it has waited for."""
    return sum(tree_cpu_by_process(pid).values())


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    return 0


def tree_rss_mib(pid: int) -> float:
    """Resident memory (``VmRSS``) of ``pid`` and its descendants, summed, in MiB."""
    return round(sum(_status_kib(member, "VmRSS") for member in tree(pid)) / 1024, 1)


_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_PFN = (1 << 55) - 1


def _frames(pid: int) -> set[int]:
    """The physical page frames ``pid`` has resident (``/proc/PID/pagemap``)."""
    frames: set[int] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if line.rstrip().endswith("[vsyscall]"):
                continue  # not readable through pagemap
            pagemap.seek(start // _PAGE * 8)
            data = pagemap.read((end - start) // _PAGE * 8)
            frames.update(entry & _PFN for (entry,) in struct.iter_unpack("<Q", data)
                          if entry & _PRESENT)
    return frames


def tree_unique_mib(pid: int) -> float | None:
    """Resident memory of ``pid``'s tree with every physical page counted once: a library or
    interpreter page two processes of the tree both map is one page of memory, which summing
    ``VmRSS`` counts twice. None where page frames cannot be read (they read as 0 without
    CAP_SYS_ADMIN)."""
    frames: set[int] = set()
    try:
        for member in tree(pid):
            frames |= _frames(member)
    except OSError:
        return None
    if not frames or frames == {0}:
        return None
    return round(len(frames) * _PAGE / (1 << 20), 1)


def tree_rss_by_process(pid: int) -> dict[str, float]:
    """Resident MiB per process of ``pid``'s tree, labelled as in ``tree_cpu_by_process``."""
    return RssSampler(pid).sample()


class RssSampler:
    """The resident set of ``pid``'s tree, per process, cheaply enough to sample while a round
    runs in the same event loop as its clients: the tree (a walk of every ``/proc/N/stat``, 1-3
    ms) is learnt once, and again only when a member has gone; a sample then reads one
    ``/proc/N/status`` per member."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._members: list[tuple[int, str]] = []

    def _learn(self) -> None:
        self._members = [(member, "main" if index == 0 else _label(member))
                         for index, member in enumerate(tree(self.pid))]

    def sample(self) -> dict[str, float]:
        """Resident MiB per process, labelled as in ``tree_cpu_by_process``."""
        if not self._members:
            self._learn()
        sizes = [(label, _status_kib(member, "VmRSS")) for member, label in self._members]
        if not all(kib for _, kib in sizes):  # a member went (or a new one replaced it)
            self._learn()
            sizes = [(label, _status_kib(member, "VmRSS")) for member, label in self._members]
        out: dict[str, float] = {}
        for label, kib in sizes:
            out[label] = round(out.get(label, 0.0) + kib / 1024, 1)
        return out


def tree_members(pid: int) -> list[dict[str, object]]:
    """Each process of the tree: its command line (cut short), allowed CPUs and resident MiB."""
    members: list[dict[str, object]] = []
    for member in tree(pid):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{member}/cmdline").read_bytes().replace(b"\0", b" ")
            members.append({"command": command.decode(errors="replace").strip()[:120],
                            "cpus": sorted(os.sched_getaffinity(member)),
                            "rss_mib": round(_status_kib(member, "VmRSS") / 1024, 1)})
    return members


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU of the machine: (busy, total) clock ticks since boot (``/proc/stat``); busy is
    everything but idle and iowait, whoever ran (other users of a shared machine included)."""
    out: dict[int, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(value) for value in values[:8]]
                out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


def cpu_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
             ) -> dict[int, float]:
    """Fraction of the time each CPU was busy between two ``cpu_ticks`` readings."""
    out: dict[int, float] = {}
    for cpu, (busy, total) in after.items():
        was_busy, was_total = before.get(cpu, (0, 0))
        if total > was_total:
            out[cpu] = round((busy - was_busy) / (total - was_total), 3)
    return out


def tree_sched_by_process(pid: int) -> dict[str, tuple[int, int]]:
    """Per process of ``pid``'s tree (labelled as in ``tree_cpu_by_process``), summed over its
    threads: (ns run on a CPU, ns spent runnable waiting for a CPU) from
    ``/proc/PID/task/TID/schedstat``. The wait is what CPU contention costs the process: time
    it had work and the scheduler ran something else."""
    out: dict[str, tuple[int, int]] = {}
    for index, member in enumerate(tree(pid)):
        label = "main" if index == 0 else _label(member)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{member}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ran, waited = (int(x) for x in (task / "schedstat").read_text().split()[:2])
                    was_ran, was_waited = out.get(label, (0, 0))
                    out[label] = (was_ran + ran, was_waited + waited)
    return out
