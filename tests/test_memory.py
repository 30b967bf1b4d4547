"""Freed heap goes back to the system, and the proxy process runs its full garbage collections
when it chooses (``otelproxy.memory``)."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx2
import pytest

from otelproxy import server as server_module
from otelproxy.memory import (
    NO_AUTOMATIC,
    YOUNG_THRESHOLD,
    full_collections_held,
    release_free_heap,
)
from tests.conftest import RunningProxy, wait_for
from tests.fake_upstream import FakeUpstream, Reply
from tests.proxy_process import ProxyProcess

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; /proc is Linux's")
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


def _python(code: str, *args: str) -> str:
    """What ``code`` prints, run in a Python process of its own."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60, check=True).stdout


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_free_heap_does_not_load_the_ctypes_package() -> None:
    """The trim goes through ``_ctypes`` alone: the ``ctypes`` package, imported for this one
    call, kept 0.2 MiB more resident in each of the proxy's processes."""
    code = ("import sys\nfrom otelproxy.memory import release_free_heap\n"
            "assert release_free_heap() is True\nprint(sorted(sys.modules))")
    modules = _python(code)
    assert "'ctypes'" not in modules
    assert "'_ctypes'" in modules


def test_hold_full_collections_freezes_start_up_and_shortens_the_young_collections() -> None:
    """In a process of its own: what is alive is frozen, the collector never starts a full
    collection by itself, and its young collections come every ``YOUNG_THRESHOLD`` objects,
    every other one taking in the middle generation."""
    code = ("import gc, json\n"
            "from otelproxy.memory import full_collections_held, hold_full_collections\n"
            "before, held_before = gc.get_threshold(), full_collections_held()\n"
            "hold_full_collections()\n"
            "print(json.dumps([before, held_before, gc.get_threshold(), gc.get_freeze_count(),"
            " full_collections_held()]))")
    before, held_before, after, frozen, held = json.loads(_python(code))
    assert not held_before and held
    assert after[:2] == [YOUNG_THRESHOLD, 0] and after[2] >= NO_AUTOMATIC > before[2]
    assert frozen > 1000


# Objects that stay alive, made a few at a time (streams opening), while the collector's
# callback counts what each young collection walks: the young generation, and the middle one
# when it is taken in. Prints the most any collection walked, and how many collections ran.
_WALKED = """
import gc, json, sys
from otelproxy.memory import hold_full_collections
if sys.argv[1] == "held":
    hold_full_collections()
walked = []
def count(phase, info):
    if phase == "start" and info["generation"] < 2:
        walked.append(sum(len(gc.get_objects(g)) for g in range(info["generation"] + 1)))
gc.callbacks.append(count)
alive = []
for _ in range(3000):
    alive.append([[], {}, [], {}, [], {}, [], {}, [], {}])
gc.callbacks.remove(count)
print(json.dumps([max(walked), len(walked)]))
"""


def test_young_collections_walk_a_few_hundred_objects_while_objects_pile_up() -> None:
    """33 000 objects that stay alive: with Python's default thresholds a middle-generation
    collection walks thousands of them at once (the proxy's 4-11 ms stalls while 500 streams
    open); held, no young collection walks more than two thresholds' worth."""
    default_most, default_runs = json.loads(_python(_WALKED, "default"))
    held_most, held_runs = json.loads(_python(_WALKED, "held"))
    assert default_most > 5 * YOUNG_THRESHOLD, default_most
    assert held_most <= 2 * YOUNG_THRESHOLD + 100, held_most
    assert held_runs > default_runs


def test_the_proxy_process_runs_a_full_collection_once_idle(tmp_path: Path,
                                                            fake: FakeUpstream) -> None:
    """``otelproxy serve`` holds full collections back and runs one when no request is in
    flight and its collector has moved objects into the oldest generation: ``/healthz`` counts
    it and its time; idle with nothing new, it runs no other."""
    with ProxyProcess(["--upstream", fake.url, "--log-dir", str(tmp_path / "logs")]) as running:
        health = httpx2.get(running.url + "/healthz").json()
        assert health["full_collections"] == 0
        client = anthropic.Anthropic(base_url=f"{running.url}/anthropic/{fake.host_port}",
                                     api_key="sk-ant-x", max_retries=0)
        deadline = time.monotonic() + 30
        # Requests one at a time leave the oldest generation as it was (what they allocate
        # dies young); 40 at once live long enough to be moved there.
        while (health := httpx2.get(running.url + "/healthz").json())["full_collections"] == 0:
            assert time.monotonic() < deadline, health
            fake.replies.extend(Reply(blocks=[{"type": "text", "text": "x"}],
                                      first_byte_delay=0.3) for _ in range(40))
            with concurrent.futures.ThreadPoolExecutor(40) as pool:
                list(pool.map(lambda _: client.messages.create(
                    model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]),
                    range(40)))
            time.sleep(2 * server_module.IDLE_CHECK)
        assert health["full_collections"] == 1 and health["full_collection_ms"] > 0
        time.sleep(2.5 * server_module.IDLE_CHECK)  # idle, nothing new: no other collection
        assert httpx2.get(running.url + "/healthz").json()["full_collections"] == 1


@pytest.fixture
def held_collections() -> Iterator[None]:
    """Full collections held back in this (the test's) process for the test, as ``serve`` holds
    them in the proxy's, without freezing the test process's objects."""
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], NO_AUTOMATIC)
    try:
        assert full_collections_held()
        yield
    finally:
        gc.set_threshold(*threshold)


def _slow_requests(proxy: RunningProxy, count: int, seconds: float) -> Callable[[], None]:
    """``count`` requests through ``proxy`` whose answers come after ``seconds``, each on a
    thread; the returned call joins them."""
    proxy.fake.replies.extend(Reply(blocks=[{"type": "text", "text": "slow"}],
                                    first_byte_delay=seconds) for _ in range(count))
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    threads = [threading.Thread(target=lambda: client.messages.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]))
        for _ in range(count)]
    for thread in threads:
        thread.start()

    def join() -> None:
        for thread in threads:
            thread.join(30)
    return join


def test_under_a_load_that_never_pauses_a_full_collection_runs_every_max_interval(
    fake: FakeUpstream, make_proxy: Callable[..., RunningProxy], held_collections: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests always in flight: the proxy is never idle, yet it runs a full collection once
    it has gone ``FULL_COLLECTION_MAX`` without a pause or a collection."""
    monkeypatch.setattr(server_module, "IDLE_CHECK", 0.05)
    monkeypatch.setattr(server_module, "FULL_COLLECTION_MAX", 0.4)
    proxy = make_proxy(fake)
    stats = proxy.server.state.stats
    join = _slow_requests(proxy, 2, 3.0)  # in flight all along
    wait_for(lambda: stats.in_flight >= 2, 5, "both slow requests in flight")
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    while stats.in_flight >= 2 and stats.full_collections_busy < 2:
        fake.replies.append(Reply(blocks=[{"type": "text", "text": "x"}]))
        client.messages.create(model="m", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
        gc.collect(1)  # objects moved into the oldest generation: a full collection has work
        time.sleep(0.05)
    busy, in_flight = stats.full_collections_busy, stats.in_flight
    join()
    assert busy >= 2 and in_flight >= 2, (busy, in_flight)


def test_a_burst_after_a_pause_is_not_met_by_a_full_collection(
    fake: FakeUpstream, make_proxy: Callable[..., RunningProxy], held_collections: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``FULL_COLLECTION_MAX`` counts load without a pause: after an idle spell longer than it,
    the requests of a new burst run without a full collection for that long."""
    monkeypatch.setattr(server_module, "IDLE_CHECK", 0.05)
    monkeypatch.setattr(server_module, "FULL_COLLECTION_MAX", 0.6)
    proxy = make_proxy(fake)
    stats = proxy.server.state.stats
    gc.collect(1)
    wait_for(lambda: stats.full_collections >= 1, 5, "the idle collection")
    time.sleep(1.0)  # idle, longer than FULL_COLLECTION_MAX
    join = _slow_requests(proxy, 1, 0.4)
    wait_for(lambda: stats.in_flight >= 1, 5, "the slow request in flight")
    gc.collect(1)  # work for a full collection while the request is in flight
    join()
    assert stats.full_collections_busy == 0
    wait_for(lambda: stats.full_collections >= 2, 5, "a collection once idle again")


def test_no_request_in_flight_between_two_is_not_idle(
    fake: FakeUpstream, make_proxy: Callable[..., RunningProxy], held_collections: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests one after another leave moments with none in flight, but each look finds
    exchanges begun since the one before: no full collection runs until a whole check has
    passed without a new exchange (a burst that begins just after one ends is not stopped by
    one)."""
    monkeypatch.setattr(server_module, "IDLE_CHECK", 0.5)
    proxy = make_proxy(fake)
    stats = proxy.server.state.stats
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        fake.replies.append(Reply(blocks=[{"type": "text", "text": "x"}]))
        client.messages.create(model="m", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
        gc.collect(1)  # work for a full collection all along
    assert stats.full_collections == 0 and stats.exchanges > 20, stats
    wait_for(lambda: stats.full_collections >= 1, 5, "the collection once a check was quiet")


def test_traffic_that_is_no_exchange_is_collected_too(
    fake: FakeUpstream, make_proxy: Callable[..., RunningProxy], held_collections: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Health checks and refused requests leave garbage as exchanges do; with no exchange at
    all, the idle proxy still collects what reached the oldest generation."""
    monkeypatch.setattr(server_module, "IDLE_CHECK", 0.05)
    proxy = make_proxy(fake)
    stats = proxy.server.state.stats
    for _ in range(20):
        assert httpx2.get(proxy.url + "/healthz").status_code == 200
        assert httpx2.get(proxy.url + "/nowhere/x").status_code == 404
    gc.collect(1)
    wait_for(lambda: stats.full_collections >= 1, 5, "a collection with no exchange")
    assert stats.exchanges == 0


def test_a_proxy_embedded_in_another_program_leaves_its_collector_alone(
    fake: FakeUpstream, make_proxy: Callable[..., RunningProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``hold_full_collections`` (a ``Server`` in a test, an embedding program) the idle
    loop runs no collection of its own: the program's collector does its work."""
    monkeypatch.setattr(server_module, "IDLE_CHECK", 0.05)
    assert not full_collections_held()
    proxy = make_proxy(fake)
    client = anthropic.Anthropic(base_url=proxy.base(), api_key="sk-ant-x", max_retries=0)
    fake.replies.append(Reply(blocks=[{"type": "text", "text": "x"}]))
    client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    proxy.flush()
    time.sleep(0.5)  # ten idle checks
    assert proxy.server.state.stats.full_collections == 0
