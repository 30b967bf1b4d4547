"""Giving freed heap back to the system.

Starting a process (imports, building the pipeline, opening the record) frees much of what it
allocated, but glibc keeps freed heap pages resident. ``release_free_heap`` asks glibc to return
them (``malloc_trim(0)``: the top of the heap and whole free pages inside it). Where the C
library is not glibc (musl, macOS), it does nothing.
"""

from __future__ import annotations

import functools

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


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
