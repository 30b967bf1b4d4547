"""Giving freed heap back to the system.

Starting a process (imports, building the pipeline, opening the record) frees much of what it
allocated, but glibc keeps freed heap pages resident. ``release_free_heap`` asks glibc to return
them (``malloc_trim(0)``: the top of the heap and whole free pages inside it). Where the C
library is not glibc (musl, macOS), it does nothing.
"""

from __future__ import annotations

import contextlib


def release_free_heap() -> bool:
    """Return freed heap pages to the system; ``False`` where the C library cannot."""
    with contextlib.suppress(ImportError, OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        return True
    return False
