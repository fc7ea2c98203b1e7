"""The updater in-process, where a test must decide exactly when a step ends:
a newer assignment superseding a running update, a re-sign arriving mid-update,
and start-up recovery from the states a crash can leave on disk.

Real pieces throughout (trust files, HTTP artifact server, model store, event
spool, persisted record); only the health check is a stand-in behind its
interface, so the test can hold it open and let it pass or fail on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import protocol as p
from agent.config import AgentConfig
from agent.events import EventLog
from agent.healthcheck import HealthAborted, HealthChecker, HealthRequest, HealthResult
from agent.profiles import generic_profile
from agent.update.pipeline import Updater
from agent.update.recovery import write_clean_marker
from agent.update.state import UpdateStateStore
from tests.support.http_artifacts import ArtifactServer
from tests.support.signer import TrustSimulator, capabilities
from tests.support.updates import file_sha256, variant_for, write_trust

E = p.EventType
DEVICE = "dev-1"


class GatedHealth(HealthChecker):
    """Holds every check open until the test says pass or fail."""

    def __init__(self) -> None:
        self.calls: list[Path] = []
        self.running = asyncio.Event()
        self._verdict: asyncio.Future[bool] | None = None

    def finish(self, passed: bool = True) -> None:
        assert self._verdict is not None, "no check is running"
        self._verdict.set_result(passed)

    async def check(self, request: HealthRequest, abort: asyncio.Event) -> HealthResult:
        self.calls.append(request.model)
        self._verdict = asyncio.get_running_loop().create_future()
        self.running.set()
        stop = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({self._verdict, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            self.running.clear()
        if not self._verdict.done():
            raise HealthAborted("aborted")
        passed = self._verdict.result()
        return HealthResult(passed, [] if passed else ["gated: told to fail"])


class Device:
    """A device's disk, and an Updater over it that can be 'killed' and started again."""

    def __init__(self, root: Path, server: ArtifactServer) -> None:
        self.sim = TrustSimulator()
        self.config = AgentConfig(device_id=DEVICE, state_dir=root / "state")
        write_trust(self.config.state_dir, self.sim)
        self.server = server
        self.health = GatedHealth()
        self.updater: Updater | None = None
        self._task: asyncio.Task | None = None
        self.sequence = 0

    async def boot(self) -> Updater:
        caps = capabilities()
        events = EventLog(self.config.event_spool_path, DEVICE)
        self.updater = Updater(self.config, capabilities=caps, profile=generic_profile(caps),
                               events=events, health=self.health)
        await self.updater.start()
        self._task = asyncio.create_task(self.updater.run())
        return self.updater

    async def crash(self) -> None:
        """Drop the updater mid-flight, as kill -9 would: no stop, no clean marker."""
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.health.running.clear()

    def assign(self, artifact: str, version: str, **kwargs) -> bytes:
        self.sequence = kwargs.pop("sequence", self.sequence + 1)
        variant = variant_for(self.server.directory / artifact, artifact)
        release = self.sim.release("m", version, variants={p.Tier.MICRO: variant})
        self.sim.now = time.time()
        kwargs.setdefault("assignment_id", f"a-{self.sequence}")
        return self.sim.assign(DEVICE, release, p.Tier.MICRO, sequence=self.sequence,
                               artifact_url_base=self.server.base_url, **kwargs)

    def events(self, assignment_id: str | None = None) -> list[p.Event]:
        spool = self.config.event_spool_path / "spool"
        out = [p.decode(p.TopicKind.EVENTS, f.read_bytes()) for f in sorted(spool.iterdir())]
        return [e for e in out if assignment_id in (None, e.assignment_id)]

    def types(self, assignment_id: str) -> list[p.EventType]:
        out: list[p.EventType] = []
        for e in self.events(assignment_id):
            if not (out and out[-1] == e.type == E.DOWNLOADING):
                out.append(e.type)
        return out

    async def until(self, predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.01)

        try:
            await asyncio.wait_for(poll(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}: {self.events()}") from None

    def final(self, assignment_id: str) -> p.Event | None:
        finals = {E.ACTIVATED, E.REJECTED, E.FAILED, E.ROLLED_BACK}
        return next((e for e in self.events(assignment_id) if e.type in finals), None)


@pytest.fixture
def server(tmp_path: Path) -> ArtifactServer:
    root = tmp_path / "artifacts"
    root.mkdir()
    for name in ("a.bin", "b.bin"):
        (root / name).write_bytes(secrets.token_bytes(32 * 1024))
    with ArtifactServer(root) as s:
        yield s


@pytest.fixture
def device(tmp_path: Path, server: ArtifactServer) -> Device:
    return Device(tmp_path, server)


def run(coro_fn: Callable[[], object]) -> None:
    asyncio.run(coro_fn())


async def _activate(device: Device, artifact: str, version: str) -> str:
    """Take one assignment all the way to active; return its assignment id."""
    payload = device.assign(artifact, version)
    aid = f"a-{device.sequence}"
    await device.updater.offer(payload)
    await asyncio.wait_for(device.health.running.wait(), 10)
    device.health.finish(True)
    await device.until(lambda: device.final(aid), f"{aid} to finish")
    assert device.final(aid).type == E.ACTIVATED
    return aid


async def _boot_to_health_check(device: Device, **assign: Any) -> Updater:
    """Boot, offer a.bin 1.0.0 and return once its health check is running."""
    updater = await device.boot()
    await updater.offer(device.assign("a.bin", "1.0.0", **assign))
    await asyncio.wait_for(device.health.running.wait(), 10)
    return updater


def test_newer_assignment_supersedes_a_running_update(device: Device) -> None:
    async def go() -> None:
        updater = await _boot_to_health_check(device)

        await updater.offer(device.assign("b.bin", "2.0.0"))
        await device.until(lambda: len(device.health.calls) == 2 and device.health.running.is_set(),
                           "the second health check")
        device.health.finish(True)
        await device.until(lambda: device.final("a-2"), "a-2 to finish")

        assert device.types("a-1") == [E.RECEIVED, E.VERIFIED, E.FIT_CHECKED, E.DOWNLOADING,
                                       E.STAGED, E.FAILED]
        superseded = device.final("a-1")
        assert superseded.reason == "superseded: by a-2 (sequence 2)"
        assert superseded.code == p.EventCode.SUPERSEDED
        assert device.final("a-2").type == E.ACTIVATED
        # a-1 ended before a-2 began.
        assert superseded.seq < device.events("a-2")[0].seq
        assert updater.stores.store("m").active().key == "m@2.0.0-micro"
        assert updater.highest_sequence == 2
        assert updater.status().state == p.UpdateState.ACTIVATED

    run(go)


def test_failed_health_check_ends_the_update_with_its_code(device: Device) -> None:
    async def go() -> None:
        updater = await _boot_to_health_check(device)
        device.health.finish(False)
        await device.until(lambda: device.final("a-1"), "a-1 to finish")

        [health] = [e for e in device.events("a-1") if e.type == E.HEALTH_FAILED]
        assert (health.code, health.reason) == (p.EventCode.HEALTH_FAILED, "gated: told to fail")
        final = device.final("a-1")
        assert final.type == E.FAILED
        assert (final.code, final.reason) == (
            p.EventCode.HEALTH_FAILED, "health_failed: gated: told to fail"
        )
        assert updater.stores.store("m").active() is None

    run(go)


def test_resign_mid_update_continues_it(device: Device) -> None:
    async def go() -> None:
        updater = await _boot_to_health_check(device, assignment_id="a-x")
        before = len(device.events())

        await updater.offer(device.assign("a.bin", "1.0.0", assignment_id="a-x", sequence=2))
        assert updater.highest_sequence == 2
        assert len(device.events()) == before, "a refresh reports nothing"
        assert device.health.running.is_set(), "and does not disturb the running check"
        device.health.finish(True)
        await device.until(lambda: device.final("a-x"), "a-x to finish")
        assert device.final("a-x").type == E.ACTIVATED
        assert updater.status().sequence == 2
        persisted = UpdateStateStore(device.config.update_state_path).load()
        assert persisted.highest_sequence == 2 and persisted.models["m"].sequence == 2

    run(go)


def test_staged_update_rechecks_health_after_a_crash(device: Device) -> None:
    async def go() -> None:
        updater = await _boot_to_health_check(device)
        await device.crash()

        updater = await device.boot()
        assert updater.status().state == p.UpdateState.STAGED
        await asyncio.wait_for(device.health.running.wait(), 10)
        assert len(device.health.calls) == 2, "the health check runs again"
        assert len(device.server.requests("a.bin")) == 1, "nothing is downloaded again"
        device.health.finish(True)
        await device.until(lambda: device.final("a-1"), "a-1 to finish")
        assert device.final("a-1").type == E.ACTIVATED

    run(go)


def test_activation_not_yet_recorded_is_reconciled(device: Device) -> None:
    async def go() -> None:
        updater = await device.boot()
        await _activate(device, "a.bin", "1.0.0")
        await _activate(device, "b.bin", "1.1.0")
        aid = await _activate(device, "a.bin", "1.2.0")
        # The clean-up after an activation runs on after its event: let it end
        # before the crash, or it races the version installed below.
        await device.until(lambda: len(updater.stores.store("m").installed()) == 2, "the clean-up")
        await device.crash()
        # As if killed between the pointer swap and writing the record, so
        # also before the clean-up that deletes the oldest version.
        store = UpdateStateStore(device.config.update_state_path)
        state = store.load()
        current = state.models["m"].model_copy(update={"state": p.UpdateState.HEALTH_CHECKED})
        store.save(state.with_record(current))
        old = device.server.directory / "a.bin"
        left_over = updater.stores.store("m").staging_path("m@0.9.0-micro")
        left_over.write_bytes(old.read_bytes())
        updater.stores.store("m").install("m@0.9.0-micro", left_over,
                              {"sha256": file_sha256(old), "size": old.stat().st_size})
        assert len(updater.stores.store("m").installed()) == 3

        updater = await device.boot()
        assert updater.status().state == p.UpdateState.ACTIVATED
        assert [e.type for e in device.events(aid)].count(E.ACTIVATED) == 2
        assert len(device.health.calls) == 3, "no health check is run again"
        assert updater.stores.store("m").installed() == ["m@1.1.0-micro", "m@1.2.0-micro"]

    run(go)


def test_damaged_active_model_rolls_back_at_an_unclean_start(device: Device) -> None:
    async def go() -> None:
        updater = await device.boot()
        await _activate(device, "a.bin", "1.0.0")
        bid = await _activate(device, "b.bin", "2.0.0")
        await device.crash()
        damaged = updater.stores.store("m").active().artifact
        os.chmod(damaged, 0o644)
        with damaged.open("r+b") as f:
            f.write(b"\x00")

        updater = await device.boot()
        assert updater.stores.store("m").active().key == "m@1.0.0-micro"
        assert device.types(bid)[-2:] == [E.ACTIVATED, E.ROLLED_BACK]
        rolled = device.events(bid)[-1]
        assert rolled.reason == "active model m@2.0.0-micro fails its sha256 check"
        assert rolled.code == p.EventCode.ACTIVE_BROKEN
        assert updater.status().state == p.UpdateState.ROLLED_BACK
        assert updater.active_model().version == "1.0.0"

    run(go)


def test_clean_stop_skips_the_rehash(device: Device) -> None:
    async def go() -> None:
        updater = await device.boot()
        await _activate(device, "a.bin", "1.0.0")
        updater.stop()
        write_clean_marker(device.config.state_dir)
        await device.crash()
        marker = device.config.state_dir / "clean-shutdown"
        assert marker.exists()
        await device.boot()
        assert not marker.exists(), "consumed: the next crash is unclean again"

    run(go)


def test_unreadable_state_refuses_updates_without_overwriting(device: Device) -> None:
    async def go() -> None:
        path = device.config.update_state_path
        path.parent.mkdir(parents=True)
        path.write_text("{ torn")
        updater = await device.boot()
        await updater.offer(device.assign("a.bin", "1.0.0"))
        event = device.final("a-1")
        assert event.type == E.REJECTED and event.reason.startswith("state_corrupt: ")
        assert event.code == p.EventCode.STATE_CORRUPT
        assert path.read_text() == "{ torn", "the replay floor is never reset"

    run(go)


def test_an_update_interrupted_by_too_many_restarts_gives_up(device: Device) -> None:
    async def go() -> None:
        updater = await _boot_to_health_check(device)
        for _ in range(4):
            await device.crash()
            await device.boot()
            await asyncio.wait_for(device.health.running.wait(), 10)
        await device.crash()
        updater = await device.boot()
        event = device.final("a-1")
        assert event.type == E.FAILED and event.reason.startswith("crash_loop: ")
        assert event.code == p.EventCode.CRASH_LOOP
        assert updater.stores.store("m").active() is None

    run(go)
