"""Update events: numbered, spooled to disk, delivered to ``events`` in order.

Every event is written to the spool *before* it is published, and deleted
only once the broker acknowledged it (QoS 1), so an event survives a broker
outage and a kill -9 alike; after a crash one may be sent twice, which the
control plane's ingest absorbs (it is idempotent on device and ``seq``).

``seq`` is monotonic per device across restarts: the next number is kept in
``meta.json`` next to the spool, written after each event's own file. A
crash between the two writes leaves the spooled file with the newest number,
and start-up takes the larger of the two.

The spool is bounded (``max_spooled``): while the broker is unreachable
the oldest events are dropped first and counted (``dropped`` in
``meta.json``, and a warning in the log); the gap in ``seq`` tells the
control plane that something is missing.

Layout::

    <dir>/meta.json               {"next_seq": N, "dropped": D}
    <dir>/spool/<seq:016d>.json   one encoded Event per file, oldest first
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocol import EvalOutcome, Event, EventCode, EventType, encode

from .atomic import ensure_dir, read_json, remove_stale_temps, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

Publish = Callable[[bytes], Awaitable[bool]]

#: how often the flusher retries while events wait and nothing else woke it
RETRY_S = 5.0
_SUFFIX = ".json"


class EventLog:
    """Numbers, spools and delivers one device's update events."""

    def __init__(self, directory: Path, device_id: str, *, max_spooled: int = 1000) -> None:
        if max_spooled < 1:
            raise ValueError("max_spooled must be at least 1")
        self._dir = directory
        self._spool = directory / "spool"
        self._meta = directory / "meta.json"
        self._device_id = device_id
        self._max = max_spooled
        ensure_dir(self._spool)
        remove_stale_temps(self._spool)
        self._pending: deque[int] = deque(sorted(self._spooled()))
        meta = self._read_meta()
        newest = self._pending[-1] if self._pending else 0
        self._next_seq = max(int(meta.get("next_seq", 1)), newest + 1)
        self.dropped = int(meta.get("dropped", 0))
        self._kick = asyncio.Event()
        self._idle = asyncio.Event()

    # -- queries -----------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events spooled and not yet acknowledged by the broker."""
        return len(self._pending)

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next event will carry."""
        return self._next_seq

    # -- writing -------------------------------------------------------------

    def emit(
        self,
        type_: EventType,
        assignment_id: str | None = None,
        *,
        reason: str | None = None,
        code: EventCode | None = None,
        progress_pct: float | None = None,
        eval: EvalOutcome | None = None,
        downloaded_bytes: int | None = None,
    ) -> Event:
        """Number and spool one event, and wake the flusher. Call from the event loop.

        ``reason`` says why for people, ``code`` for programs: an event with a
        reason carries the :class:`EventCode` of what produced it.
        """
        event = Event(
            device_id=self._device_id,
            ts=time.time(),
            seq=self._next_seq,
            type=type_,
            assignment_id=assignment_id[:128] if assignment_id else None,
            reason=reason[:1024] if reason else None,
            code=code,
            progress_pct=progress_pct,
            eval=eval,
            downloaded_bytes=downloaded_bytes,
        )
        write_bytes_atomic(self._path(event.seq), encode(event))
        self._pending.append(event.seq)
        self._next_seq += 1
        dropped = 0
        while len(self._pending) > self._max:
            self._path(self._pending.popleft()).unlink(missing_ok=True)
            dropped += 1
        if dropped:
            self.dropped += dropped
            log.warning(
                "event spool full (%d): dropped the %d oldest, %d in all", self._max, dropped,
                self.dropped,
            )
        write_json_atomic(self._meta, {"next_seq": self._next_seq, "dropped": self.dropped})
        self._idle.clear()
        self._kick.set()
        log.info(
            "event %d %s %s%s", event.seq, event.type.value, event.assignment_id or "-",
            f" ({event.reason})" if event.reason else "",
        )
        return event

    def kick(self) -> None:
        """Try to deliver now (e.g. the link just reconnected)."""
        self._kick.set()

    # -- delivery ------------------------------------------------------------

    async def run(self, publish: Publish) -> None:
        """Deliver spooled events in order with ``publish`` until cancelled.

        ``publish`` returns False when the link is down; the flusher then
        waits for :meth:`kick` (or retries every few seconds).
        """
        self._kick.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), RETRY_S)
            self._kick.clear()
            await self._drain(publish)

    async def wait_delivered(self, timeout: float) -> bool:
        """Wait until the spool is empty; False if events still wait after ``timeout``."""
        if not self._pending:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return not self._pending

    async def _drain(self, publish: Publish) -> None:
        while self._pending:
            seq = self._pending[0]
            path = self._path(seq)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                self._drop_head(seq)
                continue
            if not await publish(data):
                return
            # emit() may have dropped this one from a full spool while we waited.
            self._drop_head(seq)
            path.unlink(missing_ok=True)
        self._idle.set()

    # -- internals -------------------------------------------------------------

    def _drop_head(self, seq: int) -> None:
        if self._pending and self._pending[0] == seq:
            self._pending.popleft()

    def _path(self, seq: int) -> Path:
        return self._spool / f"{seq:016d}{_SUFFIX}"

    def _spooled(self) -> list[int]:
        seqs = []
        for entry in self._spool.iterdir():
            stem = entry.name.removesuffix(_SUFFIX)
            if entry.name.endswith(_SUFFIX) and stem.isdigit():
                seqs.append(int(stem))
        return seqs

    def _read_meta(self) -> dict[str, int]:
        try:
            meta = read_json(self._meta)
        except (OSError, ValueError) as exc:
            # The spool still holds the newest numbers; continuing beats refusing to report.
            log.error("event counter unreadable (%s); continuing from the spool", exc)
            return {}
        if not isinstance(meta, dict):
            return {}
        return {k: v for k, v in meta.items() if isinstance(v, int) and v >= 0}
