"""Simulated devices that honour each entry's signed update policy, on a clock the test sets.

A :class:`PolicyDevice` is a :class:`tests.support.rollout_fleet.SimDevice`
reading sets (``slmfleet.hello/2``) whose installs follow the policy signed
into the entry, as an agent does: outside the download window it reports
``waiting_window`` (naming the next opening) and downloads nothing; after
the download and health check it reports ``deferred`` while the activation
window is closed or an app holds an update lock (unless the entry's lock
override was issued after the lock was taken). Windows are judged by
:mod:`protocol.update_policy` against :class:`TestClock`, so a test puts the
opening at a set time without waiting for it. Each heartbeat looks again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import protocol as p
from tests.support.rollout_fleet import SimDevice, SimFleet


class TestClock:
    """A clock a test sets: control plane and devices read the same instant."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, now: float) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def set(self, now: float) -> None:
        """Jump to ``now`` (epoch seconds)."""
        with self._lock:
            self._now = now


def iso(ts: float | None) -> str:
    """``ts`` as an ISO 8601 UTC time, as an agent names a window's next opening."""
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Pending:
    name: str
    assignment_id: str
    sequence: int
    manifest: p.ReleaseManifest
    policy: p.UpdatePolicy | None
    #: "download" (not downloaded yet) or "activate" (staged and health-checked)
    phase: str = "download"
    #: the waiting reason last reported (said once, not on every look)
    said: str | None = None


@dataclass
class PolicyDevice(SimDevice):
    """A set-reading simulated device that honours windows and update locks."""

    clock: TestClock | None = None
    #: an app's update lock: (reason, when taken); None: no lock held
    lock: tuple[str, float] | None = None
    pending: dict[str, _Pending] = field(default_factory=dict)

    def _now(self) -> float:
        return self.clock() if self.clock is not None else time.time()

    def _on_set(self, payload: bytes) -> None:
        desired: p.VerifiedDesired | None = self._verify(p.verify_desired, payload)
        if desired is None:
            return
        self._highest, self._accepted = desired.sequence, payload
        self.documents.append(desired)
        for name, entry in desired.entries.items():
            waiting = self.pending.get(name)
            if waiting is not None and waiting.assignment_id == entry.assignment_id:
                # A refresh: the policy may have changed (an operator's lock override).
                waiting.policy = entry.entry.policy
                continue
            update = self._updates.get(name)
            if update is not None and update.assignment_id == entry.assignment_id:
                continue
            self.received.append(entry)
            for step in ("received", "verified", "fit_checked"):
                self._event(step, entry.assignment_id)
            self.pending[name] = _Pending(name, entry.assignment_id, desired.sequence,
                                          entry.manifest, entry.entry.policy)
        self._look()
        self._hello()

    def _wait(self, pending: _Pending, type_: str, reason: str) -> None:
        if pending.said != reason:
            pending.said = reason
            self._event(type_, pending.assignment_id, reason)

    def _locked(self, policy: p.UpdatePolicy | None) -> str | None:
        if self.lock is None:
            return None
        reason, taken_at = self.lock
        override = policy.lock_override if policy else None
        if override is not None and override.issued_at >= taken_at:
            return None
        return reason

    def _look(self) -> None:
        """Move every pending install as far as its policy lets it now."""
        now = self._now()
        for pending in list(self.pending.values()):
            policy = pending.policy
            if pending.phase == "download":
                window = policy.download_window if policy else None
                if window is not None and not window.is_open(now):
                    self._wait(pending, "waiting_window",
                               f"download window opens at {iso(window.next_open(now))}")
                    continue
                for step in ("downloading", "staged", "health_passed"):
                    self._event(step, pending.assignment_id)
                pending.phase, pending.said = "activate", None
            window = policy.activation_window if policy else None
            if window is not None and not window.is_open(now):
                self._wait(pending, "deferred",
                           f"activation window opens at {iso(window.next_open(now))}")
                continue
            locked = self._locked(policy)
            if locked is not None:
                self._wait(pending, "deferred", f"locked: {locked}")
                continue
            del self.pending[pending.name]
            self.models[pending.name] = pending.manifest.version
            self._event("activated", pending.assignment_id)
            self._record(pending.name, p.UpdateStatus(
                model=pending.name, assignment_id=pending.assignment_id,
                sequence=pending.sequence, ref=pending.manifest.ref,
                state=p.UpdateState.ACTIVATED, ts=time.time()))

    def heartbeat(self) -> None:
        """Telemetry, then another look at what waits (a window may have opened)."""
        super().heartbeat()
        with self._lock:
            if self.pending:
                self._look()
                self._hello()

    def status(self, name: str) -> str:
        """``waiting``/``deferred`` with the phase, or the model's version, for messages."""
        pending = self.pending.get(name)
        return f"{pending.phase}: {pending.said}" if pending else self.models.get(name, "-")


def add_policy_devices(fleet: SimFleet, prefix: str, count: int, *, labels: dict[str, str],
                       clock: TestClock, model: str, version: str,
                       tier: str = "small") -> list[PolicyDevice]:
    """``count`` policy-honouring devices on ``model@version`` under ``labels``."""
    from tests.support.rollout_fleet import ids

    devices = []
    for device_id in ids(prefix, count):
        device = PolicyDevice(fleet.broker, device_id, tier, fleet.trust, {}, labels=labels,
                              active=(model, version), sets=True, clock=clock).connect()
        fleet.devices[device_id] = device
        devices.append(device)
    return devices
