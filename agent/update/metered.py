"""Is the device's link metered? Asked before and during each download.

The agent setting ``metered`` says how to tell:

* ``auto`` (default): NetworkManager's own answer where it runs, its
  ``Metered`` property on D-Bus (``busctl get-property
  org.freedesktop.NetworkManager /org/freedesktop/NetworkManager
  org.freedesktop.NetworkManager Metered``: 1 yes, 3 guessed yes), else
  ``nmcli -t -f GENERAL.STATE,GENERAL.METERED device show`` for the first
  connected device. No NetworkManager, or an answer of "unknown", is
  taken as not metered: a device that cannot tell must not stall for ever.
* ``yes`` / ``no``: the operator knows the link.
* ``metered_file``: a file whose first word is ``yes`` or ``no`` (anything
  else, or no file: not metered); a script of the device's own (a modem
  hook) can flip it, and so does a test.

Answers from NetworkManager are cached for :data:`CACHE_S`: the download
loop asks every few seconds and a subprocess per question would cost more
than the question is worth.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: NetworkManager's answer is reused this long
CACHE_S = 10.0
#: a NetworkManager query that takes longer is given up (not metered)
QUERY_TIMEOUT_S = 3.0
#: NMMetered values that mean metered: NM_METERED_YES, NM_METERED_GUESS_YES
_NM_METERED = {"1", "3"}


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s failed: %s", argv[0], exc)
        return None
    return done.stdout if done.returncode == 0 else None


def parse_busctl(out: str) -> bool | None:
    """``u 1`` -> True; ``u 2`` -> False; anything else (``u 0``, unknown) -> None."""
    parts = out.split()
    if len(parts) != 2 or parts[0] != "u":
        return None
    if parts[1] in _NM_METERED:
        return True
    return False if parts[1] in ("2", "4") else None


def parse_nmcli(out: str) -> bool | None:
    """The first connected device's ``GENERAL.METERED`` from ``nmcli -t`` output."""
    state: str | None = None
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key == "GENERAL.STATE":
            state = value
        elif key == "GENERAL.METERED" and state is not None and state.startswith("100"):
            # "yes", "yes (guessed)", "no", "no (guessed)", "unknown"
            if value.startswith("yes"):
                return True
            return False if value.startswith("no") else None
    return None


def network_manager_metered() -> bool | None:
    """NetworkManager's answer: True, False, or None when it cannot tell (or is absent)."""
    out = _run(["busctl", "get-property", "org.freedesktop.NetworkManager",
                "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager",
                "Metered"])
    if out is not None:
        answer = parse_busctl(out)
        if answer is not None:
            return answer
    out = _run(["nmcli", "-t", "-f", "GENERAL.STATE,GENERAL.METERED", "device", "show"])
    return parse_nmcli(out) if out is not None else None


def file_metered(path: Path) -> bool:
    """The flag file's answer: its first word is ``yes``."""
    try:
        words = path.read_text(errors="replace").split()
    except OSError:
        return False
    return bool(words) and words[0].lower() == "yes"


class MeteredLink:
    """Says whether the link is metered now; thread-safe (the download thread asks)."""

    def __init__(self, mode: str = "auto", path: Path | None = None,
                 query: Callable[[], bool | None] = network_manager_metered) -> None:
        if mode not in ("auto", "yes", "no"):
            raise ValueError(f"metered must be auto, yes or no, not {mode!r}")
        self._mode, self._path, self._query = mode, path, query
        self._lock = threading.Lock()
        self._cached: tuple[float, bool] | None = None

    def metered(self) -> bool:
        """True when downloads that do not allow metered links must wait."""
        if self._path is not None:
            return file_metered(self._path)
        if self._mode != "auto":
            return self._mode == "yes"
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < CACHE_S:
                return self._cached[1]
            answer = bool(self._query())
            self._cached = (now, answer)
            return answer

    @property
    def poll_s(self) -> float:
        """How often a waiting download asks again (a flag file is cheap to read)."""
        return 1.0 if self._path is not None else CACHE_S
