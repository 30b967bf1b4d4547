"""Freed heap goes back to the system (``otelproxy.memory``)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from otelproxy.memory import release_free_heap


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's; /proc is Linux's")
def test_release_free_heap_returns_freed_pages_to_the_system() -> None:
    """Blocks freed in the middle of the heap (a live block above them keeps glibc from trimming
    on its own) stay resident until ``release_free_heap``, which gives most of them back."""
    blocks = [bytearray(4000) for _ in range(10_000)]  # ~40 MB from malloc, each page touched
    for block in blocks:
        block[::512] = b"x" * len(block[::512])
    keep_top = bytearray(4000)
    del blocks
    before = _rss_anon_kib()
    assert release_free_heap() is True
    after = _rss_anon_kib()
    assert before - after > 20_000, (before, after)
    assert keep_top[0] == 0
