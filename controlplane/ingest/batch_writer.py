"""The single writer thread between the ingest queue and the database.

It takes up to ``batch_max`` items, or whatever arrived within ``flush_s``
of the first one, and writes them in one transaction. A failed batch is
retried with backoff so a database hiccup (SQLite busy, PostgreSQL
restarting) loses nothing; a batch that keeps failing for a reason other
than the database being unavailable is written one message at a time so a
single poisonous message is refused alone and the stream goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy.exc import DBAPIError, OperationalError

from ..db.writes import IngestItem
from ..logs import RateLimitedLog
from .stats import IngestStats

log = logging.getLogger(__name__)

#: attempts before a non-transient failure is split into single messages
SPLIT_AFTER_ATTEMPTS = 3
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


def is_transient(exc: Exception) -> bool:
    """True when retrying the same batch later can succeed (the database, not the data)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError)


class BatchWriter:
    """Drain ``source`` into ``write`` in batches on one thread."""

    def __init__(
        self,
        source: queue.Queue[IngestItem],
        write: Callable[[Sequence[IngestItem]], None],
        stats: IngestStats,
        *,
        batch_max: int,
        flush_s: float,
        on_write_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._source = source
        self._write = write
        self._stats = stats
        self._batch_max = batch_max
        self._flush_s = flush_s
        self._on_write_error = on_write_error
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_full = False
        self._log = RateLimitedLog(log)

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("BatchWriter already started")
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop; give up (counting drops) after ``timeout``."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout)
        if thread.is_alive():
            # The database is still failing: stop retrying and count the loss.
            self._abandon.set()
            thread.join(BACKOFF_MAX_S + 1.0)
        if thread.is_alive():
            log.error("ingest writer did not stop; %d messages left", self._source.qsize())

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch:
                self._write_with_retry(batch)
            elif self._stopping.is_set():
                return

    def _collect(self) -> list[IngestItem]:
        try:
            first = self._source.get(timeout=0.1)
        except queue.Empty:
            return []
        # Let a batch build up by sleeping rather than waking on every put:
        # a get() per message would hand the GIL back and forth with the MQTT
        # thread for each one, which costs more than the work itself. Under
        # load the previous batch was full, so there is no pause at all.
        if not self._last_full:
            self._stopping.wait(self._flush_s)
        batch = [first]
        try:
            while len(batch) < self._batch_max:
                batch.append(self._source.get_nowait())
        except queue.Empty:
            pass
        self._last_full = len(batch) >= self._batch_max
        return batch

    def _write_with_retry(self, batch: list[IngestItem]) -> None:
        delay = BACKOFF_MIN_S
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                self._write(batch)
            # Any failure, not only SQLAlchemyError: a driver can raise
            # OverflowError or ValueError for a value it cannot bind, and this
            # thread must outlive every message.
            except Exception as exc:
                attempt += 1
                self._stats.count_write_error()
                self._on_write_error()
                transient = is_transient(exc)
                self._log.log(
                    logging.ERROR,
                    "write",
                    "writing a batch of %d messages failed (attempt %d, %s): %s",
                    len(batch),
                    attempt,
                    "will retry" if transient else "data error",
                    exc,
                    exc_info=exc,
                )
                if not transient and attempt >= SPLIT_AFTER_ATTEMPTS:
                    self._write_one_by_one(batch)
                    return
                if self._abandon.wait(delay):
                    self._stats.count_dropped(len(batch))
                    log.error(
                        "dropped %d messages: shutting down while the database fails", len(batch)
                    )
                    return
                delay = min(delay * 2, BACKOFF_MAX_S)
            else:
                self._stats.count_batch(len(batch), time.perf_counter() - started)
                return

    def _write_one_by_one(self, batch: list[IngestItem]) -> None:
        for item in batch:
            try:
                self._write([item])
            except Exception as exc:  # refused alone: this message is the poison
                self._stats.count_rejected("db_error", accepted=True)
                self._on_write_error()
                self._log.log(
                    logging.ERROR,
                    "poison",
                    "database refused %s from %s: %s",
                    item.kind.value,
                    item.message.device_id,
                    exc,
                )
            else:
                self._stats.count_written(1)
