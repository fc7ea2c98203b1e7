"""Hand memory the agent no longer uses back to the operating system.

Start-up allocates much more than the idling agent keeps: imports compile
and discard, pydantic builds and drops schemas, the hardware probe's answer
is parsed, the first connection resolves names in executor threads. CPython
frees those objects, but glibc keeps freed heap pages (and each thread's
arena) mapped for reuse, so they stay in the resident set for as long as
the agent runs. ``malloc_trim(0)`` returns them, and capping glibc at one
arena keeps threads from holding arenas of their own.
"""

from __future__ import annotations

import functools
import gc
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

#: mallopt(3) parameter number of M_ARENA_MAX (glibc malloc.h)
M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The running glibc through ctypes, or None (another libc, another OS, no ctypes)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # the C library already loaded, not a second copy
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (ImportError, OSError, AttributeError, MemoryError):
        # musl and others have no malloc_trim: nothing to tune then. MemoryError:
        # a libffi that needs writable+executable memory for the callback ctypes
        # creates on import, under MemoryDenyWriteExecute=.
        return None
    return libc


def limit_malloc_arenas(arenas: int = 1) -> None:
    """Let every thread allocate from at most ``arenas`` glibc malloc arenas.

    glibc gives each thread that allocates its own arena; the executor
    threads that connect to the broker each keep one (~0.3 MB resident)
    for the agent's lifetime. CPython threads allocate under the GIL, so
    extra arenas buy no concurrency. Call before any thread starts; the
    inference workers are separate processes and keep glibc's default.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, arenas)


def release_freed_memory() -> None:
    """Collect garbage cycles, then return free heap pages to the OS where glibc allows."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
