"""When one entry's update may go on: its signed policy, the device's locks and link.

Each entry of the director-signed set may carry an
:class:`~protocol.update_policy.UpdatePolicy`. The update run
(:mod:`agent.update.steps`) asks this gate at two points:

==================  ==============================  ======================================
point               held while                      state, event, code
==================  ==============================  ======================================
before download     the download window is closed   ``waiting_window``, ``download_window``
before download     the link is metered and the     ``waiting_network``, ``metered``
                    policy does not allow metered
during download     either of the two above         (the download pauses; resumes with Range)
before activation   the activation window is        ``staged``, ``deferred``,
                    closed (after the health check) ``activation_window``
before activation   an app holds an update lock     ``staged``, ``deferred``, ``locked``
                    not skipped by a lock override
==================  ==============================  ======================================

A hold's reason names the next opening (ISO 8601, UTC) or the lock
holders' reasons; it is both the event's reason
and the record's, so ``hello`` says why and until when. Holds are waited
out without polling: the run sleeps until the window opens or the earliest
lease ends, woken early when a lock is released, a newer document arrives
or the agent stops. Only a metered link, which has no announced end, is
asked again every few seconds (:attr:`MeteredLink.poll_s`).

A lock override (``policy.lock_override``) skips the locks taken before its
``issued_at``; the activation that goes ahead through them says so
(``activated``, code ``lock_overridden``, naming the override).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING

from protocol import EventCode, EventType, UpdateState
from protocol.update_policy import UpdatePolicy, Window

from ..config import AgentConfig
from .clock import Clock
from .locks import UpdateLock, UpdateLocks
from .metered import MeteredLink
from .throttle import stall_floor
from .timezone import device_zone

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .ledger import Ledger
    from .state import EntryRecord


@dataclass(frozen=True, slots=True)
class Hold:
    """Why an update waits, how it is recorded, and when to look again."""

    state: UpdateState
    event: EventType
    code: EventCode
    #: ``"<code>: <detail>"``, as every event reason
    reason: str
    #: look again at this wall-clock time; None: only when woken
    until: float | None = None
    #: also look again after this many real seconds (a metered link has no announced end)
    poll_s: float | None = None
    #: look again when one of these is set (the update locks changed)
    wake: tuple[asyncio.Event, ...] = ()


def iso(ts: float) -> str:
    """``ts`` as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _opens(window: Window, now: float, zone: tzinfo) -> tuple[str, float | None]:
    """The reason's words for ``window``'s next opening, and that time."""
    nxt = window.next_open(now, zone)
    if nxt is None:
        return "does not open within the next 400 days", None
    return f"opens at {iso(nxt)}", nxt


class PolicyGate:
    """The device's side of update policies; see the module docstring."""

    def __init__(self, config: AgentConfig, clock: Clock, locks: UpdateLocks,
                 link: MeteredLink | None = None) -> None:
        self.clock, self.locks = clock, locks
        self._config = config
        self.link = link or MeteredLink(config.metered, config.metered_file)
        #: the zone of windows whose ``tz`` is ``local``
        self.zone = device_zone(config.timezone)

    # -- download ------------------------------------------------------------------

    def download_hold(self, policy: UpdatePolicy | None) -> Hold | None:
        """Why the download must wait now, None when it may run (safe from any thread)."""
        policy = policy or UpdatePolicy()
        window = policy.download_window
        now = self.clock.now()
        if window is not None and not window.is_open(now, self.zone):
            when, until = _opens(window, now, self.zone)
            return Hold(UpdateState.WAITING_WINDOW, EventType.WAITING_WINDOW,
                        EventCode.DOWNLOAD_WINDOW,
                        f"download_window: closed ({window.cron} {window.tz}); {when}", until)
        if not policy.allow_metered and self.link.metered():
            return Hold(UpdateState.WAITING_NETWORK, EventType.WAITING_NETWORK, EventCode.METERED,
                        "metered: the link is metered and this update may not use one",
                        poll_s=self.link.poll_s)
        return None

    def rate(self, policy: UpdatePolicy | None) -> int | None:
        """The download's cap in bytes/s: the lower of the agent's and the policy's."""
        caps = [c for c in (self._config.download_max_bytes_per_s,
                            policy.max_bytes_per_s if policy else None) if c]
        return min(caps) if caps else None

    def fetcher_factory(self, inner: Callable[[], Fetcher] | None, policy: UpdatePolicy | None,
                        cancel: threading.Event) -> Callable[[], Fetcher]:
        """Fetchers that keep the cap and pause when :meth:`download_hold` says so."""
        rate = self.rate(policy)

        def pause() -> str | None:
            hold = self.download_hold(policy)
            return hold.reason if hold else None

        def make() -> Fetcher:
            from .fetcher import HttpFetcher
            from .throttled_fetcher import ThrottledFetcher

            return ThrottledFetcher((inner or HttpFetcher)(), rate, hold=pause, cancel=cancel)

        return make

    def download_config(self, policy: UpdatePolicy | None) -> AgentConfig:
        """The agent's settings with a throughput floor the cap cannot trip."""
        floor = stall_floor(self._config.download_min_bytes_per_s, self.rate(policy))
        return self._config.model_copy(update={"download_min_bytes_per_s": floor})

    # -- activation -------------------------------------------------------------------

    def _blocking(self, policy: UpdatePolicy | None) -> tuple[list[UpdateLock],
                                                              list[UpdateLock]]:
        """(locks that defer the activation, locks the override skips)."""
        override = policy.lock_override if policy else None
        held = self.locks.held()
        if override is None:
            return held, []
        return ([lock for lock in held if lock.taken_at >= override.issued_at],
                [lock for lock in held if lock.taken_at < override.issued_at])

    def activation_hold(self, policy: UpdatePolicy | None) -> Hold | None:
        """Why the activation must wait now, None when it may go ahead."""
        window = policy.activation_window if policy else None
        now = self.clock.now()
        if window is not None and not window.is_open(now, self.zone):
            when, until = _opens(window, now, self.zone)
            return Hold(UpdateState.STAGED, EventType.DEFERRED, EventCode.ACTIVATION_WINDOW,
                        f"activation_window: closed ({window.cron} {window.tz}); {when}", until)
        blocking, _ = self._blocking(policy)
        if blocking:
            # No lease end in the reason: a renewal is not news worth an event.
            holders = "; ".join(repr(lock.reason) for lock in blocking)
            return Hold(UpdateState.STAGED, EventType.DEFERRED, EventCode.LOCKED,
                        f"locked: update lock held by {holders}",
                        until=min(lock.expires_at for lock in blocking),
                        wake=(self.locks.changed(),))
        return None

    def override_note(self, policy: UpdatePolicy | None) -> tuple[str, EventCode] | None:
        """The activation's reason and code when an override skips held locks."""
        _, skipped = self._blocking(policy)
        if not skipped or policy is None or policy.lock_override is None:
            return None
        override = policy.lock_override
        reasons = "; ".join(repr(lock.reason) for lock in skipped)
        return (f"lock_overridden: override {override.id} ({override.reason}) "
                f"skipped the update lock held by {reasons}", EventCode.LOCK_OVERRIDDEN)

    # -- waiting ------------------------------------------------------------------------

    async def wait(self, hold: Hold, *wake: asyncio.Event) -> None:
        """Sleep until ``hold`` may have ended (or one of ``wake`` is set)."""
        await self.clock.sleep_until(hold.until, (*wake, *hold.wake), hold.poll_s)


def record_hold(ledger: Ledger, record: EntryRecord, hold: Hold) -> None:
    """Record and report ``hold`` unless it is what ``record`` already says.

    Waiting is a safe point, not a crash: restarts while waiting (a device
    rebooted every night for a week-long window) do not count towards the
    crash-loop limit, so the record's ``resumes`` start again from zero.
    """
    if record.state is hold.state and record.reason == hold.reason:
        if record.resumes:  # resumed after a restart: still waiting, nothing new to say
            ledger.save(ledger.file.with_record(record.model_copy(update={"resumes": 0})))
        return
    ledger.save(ledger.file.with_record(record.model_copy(update={
        "state": hold.state, "reason": hold.reason, "ts": time.time(), "resumes": 0})))
    ledger.events.emit(hold.event, record.assignment_id, reason=hold.reason, code=hold.code)
    ledger.status_changed()
