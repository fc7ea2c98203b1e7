"""Giving freed memory back: works on glibc, a no-op elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

#: four threads allocate from glibc's heap at the same time, then glibc
#: lists its arenas on stderr (malloc_stats(3): one "Arena N:" block each)
ARENAS_SCRIPT = (
    "import ctypes, sys, threading\n"
    "from agent.malloc_trim import limit_malloc_arenas\n"
    "if sys.argv[1] == 'limit':\n"
    "    limit_malloc_arenas()\n"
    "together = threading.Barrier(4)\n"
    "def work():\n"
    "    keep = [bytes(600) for _ in range(1000)]\n"  # 600 B: glibc's heap, not pymalloc
    "    together.wait()\n"
    "threads = [threading.Thread(target=work) for _ in range(4)]\n"
    "for t in threads: t.start()\n"
    "for t in threads: t.join()\n"
    "ctypes.CDLL(None).malloc_stats()\n"
)


def _arenas(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, mode], capture_output=True,
                            text=True, timeout=60, check=True)
    return sum(line.startswith("Arena ") for line in result.stderr.splitlines())


@glibc_only
def test_arena_limit_keeps_threads_in_one_arena() -> None:
    # Without the limit each thread gets an arena of its own: the check can see the difference.
    assert _arenas("default") > 1
    assert _arenas("limit") == 1


@glibc_only
def test_trim_gives_memory_back() -> None:
    """Freed heap below a live allocation leaves the resident set only through the release."""
    script = (
        "import gc, re\n"
        "from agent.malloc_trim import release_freed_memory\n"
        "def rss():\n"
        "    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "burst = [bytes(600) for _ in range(100_000)]\n"  # 600 B: glibc's heap, not pymalloc
        "pin = bytes(600)\n"  # above the burst: free() alone cannot shrink the heap past it
        "del burst\n"
        "gc.collect()\n"
        "before = rss()\n"
        "release_freed_memory()\n"
        "print(before - rss())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert int(out) > 30_000  # kB: most of the ~64 MB burst went back
