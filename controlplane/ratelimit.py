"""Rate-limited logging, so a flood of bad input cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """Log at most one record per key every ``interval_s``; count the rest.

    The next record logged for a key says how many were suppressed, so the
    totals are never lost from the log, only compressed.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(
        self, level: int, key: str, msg: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """Log ``msg % args`` at ``level`` unless ``key`` was logged within the interval."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar suppressed in the last %.0f s)"
            args = (*args, suppressed, self._interval_s)
        self._logger.log(level, msg, *args, exc_info=exc_info)
