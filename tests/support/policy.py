"""Update policies in tests: a clock the test sets, signed sets with policies, a device.

:class:`ManualClock` is the pipeline's :class:`~agent.update.clock.Clock`
with a time the test sets; every sleep wakes when it is set, and each
sleep's target is kept (:attr:`ManualClock.sleeps`) so a test can see that
a wait was computed to the opening rather than polled.

:class:`PolicyDevice` is tests/test_agent_updater.py's in-process device
(real trust files, HTTP artifact server, stores, spool, persisted record)
with that clock, a metered flag file the test flips, health checks that
pass at once, and documents signed with a policy per entry.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import protocol as p
from agent.config import AgentConfig
from agent.events import EventLog
from agent.healthcheck import HealthChecker, HealthRequest, HealthResult
from agent.profiles import generic_profile
from agent.update.clock import Clock, first_of
from agent.update.pipeline import Updater
from agent.update.state import UpdateStateStore
from protocol.update_policy import UpdatePolicy
from tests.support.http_artifacts import ArtifactServer
from tests.support.signer import TrustSimulator, capabilities
from tests.support.updates import variant_for
from tests.test_agent_updater import DEVICE, Device


def at(text: str) -> float:
    """Epoch seconds of an ISO 8601 time with its offset (``2026-06-01T02:00:00+00:00``)."""
    return datetime.fromisoformat(text).timestamp()


#: where the tests' clocks start: an hour before the ``0 2 * * *`` UTC window opens
START = at("2026-06-01T01:00:00+00:00")


def policy_device(tmp_path: Path, size: int) -> Iterator[PolicyDevice]:
    """A fixture body: a :class:`PolicyDevice` on a clock at :data:`START`, whose real
    HTTP artifact server holds ``a.bin``, ``size`` random bytes."""
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "a.bin").write_bytes(secrets.token_bytes(size))
    with ArtifactServer(root) as server:
        yield PolicyDevice(tmp_path, server, ManualClock(START))


def sign_policy_set(sim: TrustSimulator, device_id: str, name: str, release: dict[str, Any],
                    policy: UpdatePolicy | None, *, sequence: int, assignment_id: str,
                    artifact_url_base: str) -> bytes:
    """A director-signed set of one entry ``name`` (micro) carrying ``policy``."""
    sim.now = time.time()
    entry = p.ModelEntry(assignment_id=assignment_id, rollout_id="r-1", tier=p.Tier.MICRO,
                         release=dict(release), policy=policy)
    document = p.AssignmentSet(device_id=device_id, sequence=sequence, issued_at=sim.now,
                               expires_at=sim.now + 3600, models={name: entry},
                               artifact_url_base=artifact_url_base)
    return p.sign_assignment_set(document, sim.director_signers[: sim.director_keys.threshold])[1]


class ManualClock(Clock):
    """A wall clock the test sets; see the module docstring."""

    def __init__(self, start: float) -> None:
        self._now = start
        self._ticks: list[asyncio.Event] = []
        #: the ``when`` of every sleep, in order
        self.sleeps: list[float | None] = []

    def now(self) -> float:
        return self._now

    def set(self, when: float) -> None:
        """Move the clock to ``when`` and wake every sleeper to look again."""
        self._now = when
        for tick in self._ticks:
            tick.set()

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    async def sleep_until(self, when: float | None, wake: Any = (),
                          max_s: float | None = None) -> None:
        self.sleeps.append(when)
        if when is not None and self._now >= when:
            return
        tick = asyncio.Event()
        self._ticks.append(tick)
        try:
            await first_of([tick, *wake], max_s)
        finally:
            self._ticks.remove(tick)


class PassingHealth(HealthChecker):
    """Every check passes at once (the health check is not what these tests are about)."""

    def __init__(self) -> None:
        self.calls: list[Path] = []
        #: never set: no check is ever held open (the in-process device clears it on a crash)
        self.running = threading.Event()

    async def check(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        self.calls.append(request.model)
        return HealthResult(True, [])


class PolicyDevice(Device):
    """An in-process device whose pipeline runs on a :class:`ManualClock`."""

    def __init__(self, root: Path, server: ArtifactServer, clock: ManualClock,
                 **settings: Any) -> None:
        super().__init__(root, server)
        self.clock = clock
        self.metered_flag = root / "metered"
        self.metered_flag.write_text("no\n")
        self.config = AgentConfig(device_id=DEVICE, state_dir=root / "state",
                                  metered_file=self.metered_flag, download_retry_s=0.1,
                                  **settings)
        self.health = PassingHealth()  # type: ignore[assignment]

    async def boot(self) -> Updater:
        caps = capabilities()
        events = EventLog(self.config.event_spool_path, DEVICE)
        self.updater = Updater(self.config, capabilities=caps, profile=generic_profile(caps),
                               events=events, health=self.health, clock=self.clock)
        await self.updater.start()
        self._task = asyncio.create_task(self.updater.run())
        return self.updater

    def metered(self, on: bool) -> None:
        self.metered_flag.write_text("yes\n" if on else "no\n")

    def offer(self, artifact: str, version: str, policy: UpdatePolicy | None,
              name: str = "m") -> tuple[bytes, str]:
        """A signed set of one entry ``name`` with ``policy``; returns it and its assignment id."""
        self.sequence += 1
        release = self.sim.release(name, version, variants={
            p.Tier.MICRO: variant_for(self.server.directory / artifact, artifact)})
        aid = f"a-{name}-{self.sequence}"
        payload = sign_policy_set(self.sim, DEVICE, name, release, policy,
                                  sequence=self.sequence, assignment_id=aid,
                                  artifact_url_base=self.server.base_url)
        return payload, aid

    async def deliver(self, artifact: str, version: str, policy: UpdatePolicy | None,
                      until: Callable[[str], object] | None = None) -> str:
        """Offer a signed set of one entry (see :meth:`offer`) and wait for ``until(aid)``
        (default: the entry's first ``deferred`` event); returns the assignment id."""
        assert self.updater is not None
        payload, aid = self.offer(artifact, version, policy)
        await self.updater.offer(payload)
        await self.until(lambda: (until or (lambda a: self.of_type(a, p.EventType.DEFERRED)))(aid),
                         f"{aid} to wait")
        return aid

    def record(self, name: str = "m") -> Any:
        """``name``'s record as persisted on disk."""
        return UpdateStateStore(self.config.update_state_path).load().models[name]

    def of_type(self, aid: str, kind: p.EventType) -> list[p.Event]:
        return [e for e in self.events(aid) if e.type == kind]
