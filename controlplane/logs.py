"""The control plane's logs: one JSON object per line (for journald or any log
shipper), and a rate limit so a flood of bad input cannot flood the log."""

from __future__ import annotations

import json
import logging
import threading
import time

#: LogRecord attributes that are not a caller's ``extra=`` fields
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra, "exc"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line; ``extra=`` fields are kept as keys."""
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Log to stderr at ``level``, as ``json`` lines or ``text``."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


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
