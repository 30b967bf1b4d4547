"""Giving freed heap back to the system, and when the proxy process collects its garbage.

Starting a process (imports, building the pipeline, opening the record) frees much of what it
allocated, but glibc keeps freed heap pages resident. ``release_free_heap`` asks glibc to return
them (``malloc_trim(0)``: the top of the heap and whole free pages inside it). Where the C
library is not glibc (musl, macOS), it does nothing.

Python's garbage collector runs a full collection, which walks every container object in the
process, whenever enough objects have survived two younger collections. Hundreds of streams
opening at once are such objects: at 500 streams the proxy process stopped for full
collections of 22 and 40 ms (55 000 and 82 000 objects), and every stream it relayed waited
(``gc.callbacks`` in a copy of the proxy, ``benchmarks.run --phases sse500``). The proxy
process (``otelproxy.server.serve``, not a proxy embedded in another program) therefore holds
full collections back (``hold_full_collections``): what start-up left alive is frozen
(``gc.freeze``: never walked again) and the collector's young generations keep running (see
below), but the full collections run when the proxy's idle loop says so (``otelproxy.server``):
when a whole check has passed with no request in flight and none begun, and the collector has
moved objects into the oldest generation since the last one, and after
``FULL_COLLECTION_MAX`` seconds of load without a pause. Where the collector ignores the
oldest generation's threshold (CPython 3.14's incremental collector), nothing is held:
``full_collections_held`` says so and the idle loop leaves collecting to it.

The young collections are kept short as well (``YOUNG_THRESHOLD``, and a middle generation
collected every other time): with Python's defaults (700, 10) the middle generation waited for
ten young collections' survivors and walked them all at once, and while 500 streams opened
that stopped the proxy for 4-11 ms every 0.2-0.3 s (a stream holds about 70 objects while it
lasts). With 300 and 0, each object is walked at most twice, a few hundred at a time, before it
reaches the oldest generation, and the longest young collection in three 500-stream rounds was
1.4 ms (``gc.callbacks`` in both versions' proxy processes, A/B in one run,
``benchmarks.run --phases sse500``, 2026-12-07 23:44 UTC). What the proxy allocates per
exchange is freed by reference counting (the 116 young collections of a later 500-stream round
found no garbage, 2026-12-08 00:26 UTC), so what reaches the oldest generation sooner costs
nothing until the next full collection walks it.
"""

from __future__ import annotations

import functools
import gc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


FULL_COLLECTION_MAX = 30.0
"""Seconds of load without a pause after which the proxy process runs a full collection with
requests in flight: under a load that never pauses, cycles that died old are freed at least
this often."""
NO_AUTOMATIC = 1 << 30
"""The old generation's threshold that the collector never reaches (young collections between
two full ones)."""
YOUNG_THRESHOLD = 300
"""Objects allocated net (allocations less deallocations) between two young collections, where
the full ones are held; Python's default is 700."""


def hold_full_collections() -> None:
    """From now on this process runs full collections only when asked (``gc.collect()``): the
    garbage start-up left is collected, what is alive is frozen, the old generation's threshold
    is put out of reach, and the young collections come every ``YOUNG_THRESHOLD`` objects, every
    other one taking in the middle generation. Where the collector has no old-generation
    threshold to hold (an incremental collector, whose second value is the pace of its old
    generation's scan), the thresholds stay as they were."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, 0, NO_AUTOMATIC)
    if not full_collections_held():
        gc.set_threshold(young, middle)


def full_collections_held() -> bool:
    """Whether ``hold_full_collections`` is in force in this process."""
    return gc.get_threshold()[2] >= NO_AUTOMATIC


def release_free_heap() -> bool:
    """Return freed heap pages to the system; ``False`` where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], object] | None:
    """glibc's ``malloc_trim`` (None where there is none), called as ``ctypes.CDLL(None)``
    would call it (C calling convention, an ``int`` back, the GIL let go), through ``_ctypes``,
    the C half of ``ctypes``: the ``ctypes`` package itself (its C types, ``CDLL``), loaded for
    this one call, kept 0.2 MiB more resident in each process."""
    try:
        from _ctypes import FUNCFLAG_CDECL, CFuncPtr, dlopen, dlsym

        address = dlsym(dlopen("libc.so.6"), "malloc_trim")
    except (ImportError, OSError):  # no ctypes, not glibc
        return None

    class Function(CFuncPtr):
        _flags_ = FUNCFLAG_CDECL

    return Function(address)
