"""Tie a child process's life to the agent's (used by every worker-like child)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """End this process as soon as the agent that started it is gone.

    An orphaned worker would keep llama.cpp's threads spinning next to the
    restarted agent's own worker, and two llama.cpp thread pools on the same
    cores slow each other down a hundredfold. So: the kernel's parent-death
    signal (set here in the child: ``preexec_fn`` is unsafe in a threaded
    parent), then a check that the parent did not die before it was set,
    and a polling thread where prctl is unavailable.

    It also ignores SIGINT and SIGTERM. The agent decides when its children
    stop (it closes their stdin, then kills them), but systemd's default
    KillMode=control-group and Ctrl-C in a terminal signal the whole group at
    once: a health check cut short by that signal would be reported as a
    failed check of a model nobody judged, and a request as a worker crash.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(3)

    def poll() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=poll, daemon=True).start()


def parent_from(argv: list[str]) -> int:
    """The pid after ``--parent`` (the agent passes its own: it may be gone by now)."""
    if argv[:1] == ["--parent"] and len(argv) == 2:
        return int(argv[1])
    return os.getppid()
