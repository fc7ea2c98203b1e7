"""Thread-safe counters of the MQTT ingest.

The MQTT thread counts what arrives, the writer thread what it settles
(written, refused by the database, or dropped at shutdown); readers get a
consistent :class:`IngestStatsSnapshot`. ``accepted - settled`` is what is
still in flight, which :meth:`IngestStats.wait_settled` waits on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

#: reasons reported from the first scrape on, so dashboards see zeros, not gaps
KNOWN_REJECT_REASONS = ("too_large", "malformed", "wrong_schema", "bad_topic", "id_mismatch")


@dataclass(frozen=True, slots=True)
class IngestStatsSnapshot:
    """Counters at one instant."""

    received: int
    accepted: int
    written: int
    rejected: dict[str, int]
    dropped: int
    batches: int
    last_batch_ms: float | None
    last_batch_size: int
    write_errors: int
    queue_depth: int
    queue_max: int
    connected: bool

    @property
    def rejected_total(self) -> int:
        """All rejected messages, whatever the reason."""
        return sum(self.rejected.values())


@dataclass
class IngestStats:
    """Mutable counters behind one lock; see the module docstring."""

    received: int = 0
    accepted: int = 0
    written: int = 0
    dropped: int = 0
    batches: int = 0
    last_batch_ms: float | None = None
    last_batch_size: int = 0
    write_errors: int = 0
    rejected: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(KNOWN_REJECT_REASONS, 0)
    )
    _settled: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def count_accepted(self) -> None:
        """A message arrived and validated (MQTT thread)."""
        with self._cond:
            self.received += 1
            self.accepted += 1

    def count_rejected(self, reason: str, *, accepted: bool = False) -> None:
        """A message was refused; ``accepted`` when it had passed validation first."""
        with self._cond:
            if accepted:
                self._settled += 1
                self._cond.notify_all()
            else:
                self.received += 1
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_batch(self, size: int, elapsed_s: float) -> None:
        """A batch of ``size`` accepted messages was committed."""
        with self._cond:
            self.written += size
            self._settled += size
            self.batches += 1
            self.last_batch_ms = elapsed_s * 1000.0
            self.last_batch_size = size
            self._cond.notify_all()

    def count_written(self, size: int) -> None:
        """Messages committed outside a regular batch (one at a time after a failure)."""
        with self._cond:
            self.written += size
            self._settled += size
            self._cond.notify_all()

    def count_write_error(self) -> None:
        """A batch write attempt failed (it will be retried or split)."""
        with self._cond:
            self.write_errors += 1

    def count_dropped(self, size: int) -> None:
        """Accepted messages abandoned at shutdown."""
        with self._cond:
            self.dropped += size
            self._settled += size
            self._cond.notify_all()

    def export(self) -> dict[str, object]:
        """The counters as plain values, to send across a process boundary."""
        with self._cond:
            return {**self._counters(), "settled": self._settled}

    def snapshot(self, *, queue_depth: int, queue_max: int, connected: bool) -> IngestStatsSnapshot:
        """A consistent copy of the counters."""
        with self._cond:
            return IngestStatsSnapshot(
                **self._counters(),
                queue_depth=queue_depth,
                queue_max=queue_max,
                connected=connected,
            )

    def _counters(self) -> dict[str, Any]:
        # The caller holds the lock: export and snapshot read one instant.
        return {
            "received": self.received,
            "accepted": self.accepted,
            "written": self.written,
            "rejected": dict(self.rejected),
            "dropped": self.dropped,
            "batches": self.batches,
            "last_batch_ms": self.last_batch_ms,
            "last_batch_size": self.last_batch_size,
            "write_errors": self.write_errors,
        }

    def wait_settled(self, timeout: float, received_at_least: int = 0) -> bool:
        """Wait until ``received_at_least`` arrived and every accepted one is settled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.received < received_at_least or self._settled < self.accepted:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Arrivals don't notify (keeps the MQTT thread lean), so poll.
                self._cond.wait(min(remaining, 0.05))
            return True
