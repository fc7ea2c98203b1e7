"""Update windows on the device: downloads and activations wait for their windows.

In-process pipeline (real trust files and signatures, HTTP artifact server,
stores, event spool, persisted record) on a clock the test sets
(:class:`tests.support.policy.ManualClock`): the test sees the device wait,
sees that the wait was computed to the opening rather than polled, moves the
clock there, and sees the update go on. The table checks when a window is
open and when it next opens across time zones, midnight and DST changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import protocol as p
from agent.config import AgentConfig
from agent.update.clock import SystemClock
from agent.update.locks import UpdateLocks
from agent.update.policy_gate import PolicyGate
from protocol.update_policy import UpdatePolicy, Window
from tests.support.policy import DEVICE, ManualClock, PolicyDevice, at, policy_device
from tests.support.updates import sign_set, variant_for
from tests.test_agent_updater import run

E = p.EventType
NIGHT = Window(cron="0 2 * * *", duration_s=3600, tz="UTC")
NIGHT_OPENS = at("2026-06-01T02:00:00+00:00")


@pytest.fixture
def device(tmp_path: Path) -> Iterator[PolicyDevice]:
    yield from policy_device(tmp_path, 64 * 1024)


def test_a_closed_activation_window_keeps_the_candidate_staged_until_it_opens(
    device: PolicyDevice,
) -> None:
    clock = device.clock

    async def go() -> None:
        updater = await device.boot()
        aid = await device.deliver("a.bin", "1.0.0", UpdatePolicy(activation_window=NIGHT))

        deferred = device.of_type(aid, E.DEFERRED)[0]
        assert deferred.code == p.EventCode.ACTIVATION_WINDOW
        assert "opens at 2026-06-01T02:00:00+00:00" in deferred.reason
        assert device.types(aid) == [E.RECEIVED, E.VERIFIED, E.FIT_CHECKED, E.DOWNLOADING,
                                     E.STAGED, E.HEALTH_PASSED, E.DEFERRED]
        assert updater.stores.store("m").active() is None, "nothing activated before it opens"
        record = device.record()
        assert (record.state, record.reason) == (p.UpdateState.STAGED, deferred.reason)
        assert updater.status().state == p.UpdateState.STAGED
        # One sleep, to the opening: no polling.
        await device.until(lambda: clock.sleeps, "the wait")
        assert clock.sleeps == [at("2026-06-01T02:00:00+00:00")]

        clock.set(at("2026-06-01T01:59:59+00:00"))
        await asyncio.sleep(0.2)
        assert device.final(aid) is None, "a second early is still closed"
        clock.set(at("2026-06-01T02:00:00+00:00"))
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED
        assert updater.stores.store("m").active().key == "m@1.0.0-micro"
        assert len(device.health.calls) == 1

    run(go)


def test_a_unit_waits_whole_for_a_members_activation_window(device: PolicyDevice) -> None:
    """Entries sharing a unit (a base and its adapter) activate together: a window
    on either holds both, each told why, and both go at the opening."""

    async def go() -> None:
        updater = await device.boot()
        device.sequence += 1
        releases = {name: device.sim.release(name, "1.0.0", variants={
            p.Tier.MICRO: variant_for(device.server.directory / "a.bin", "a.bin")})
            for name in ("base", "adapter")}
        device.sim.now = time.time()
        await updater.offer(sign_set(
            device.sim, DEVICE, releases, sequence=device.sequence,
            artifact_url_base=device.server.base_url, ids={"base": "a-b", "adapter": "a-a"},
            units={"base": "u", "adapter": "u"},
            policies={"adapter": UpdatePolicy(activation_window=NIGHT)}))
        await device.until(lambda: device.of_type("a-b", E.DEFERRED)
                           and device.of_type("a-a", E.DEFERRED), "the unit to wait")
        assert device.of_type("a-b", E.DEFERRED)[0].code == p.EventCode.ACTIVATION_WINDOW
        assert updater.stores.store("base").active() is None
        assert updater.stores.store("adapter").active() is None
        device.clock.set(NIGHT_OPENS)
        await device.until(lambda: device.final("a-b") and device.final("a-a"),
                           "the unit to activate")
        assert device.final("a-b").type == E.ACTIVATED == device.final("a-a").type

    run(go)


def test_a_closed_download_window_holds_the_download(device: PolicyDevice) -> None:
    clock = device.clock
    server = device.server

    async def go() -> None:
        updater = await device.boot()
        window = Window(cron="30 1 * * *", duration_s=600, tz="UTC")
        aid = await device.deliver("a.bin", "1.0.0", UpdatePolicy(download_window=window),
                                   lambda a: device.of_type(a, E.WAITING_WINDOW))

        waiting = device.of_type(aid, E.WAITING_WINDOW)[0]
        assert waiting.code == p.EventCode.DOWNLOAD_WINDOW
        assert "opens at 2026-06-01T01:30:00+00:00" in waiting.reason
        assert device.record().state == p.UpdateState.WAITING_WINDOW
        assert updater.status().state == p.UpdateState.WAITING_WINDOW
        assert server.requests("a.bin") == [], "nothing downloaded outside the window"

        clock.set(at("2026-06-01T01:30:00+00:00"))
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED
        assert len(server.requests("a.bin")) == 1
        assert clock.sleeps[0] == at("2026-06-01T01:30:00+00:00")

    run(go)


def test_a_newer_document_ends_a_wait_at_once(device: PolicyDevice) -> None:
    async def go() -> None:
        updater = await device.boot()
        first = await device.deliver("a.bin", "1.0.0", UpdatePolicy(activation_window=NIGHT))
        payload, second = device.offer("a.bin", "1.0.1", None)
        await updater.offer(payload)
        await device.until(lambda: device.final(second), "the newer update")
        assert device.final(second).type == E.ACTIVATED
        assert device.final(first).code == p.EventCode.SUPERSEDED

    run(go)


@pytest.mark.parametrize("which", ["download", "activation"])
def test_restarts_while_waiting_for_a_window_wait_again_then_complete(
    device: PolicyDevice, which: str
) -> None:
    """Six crashes while waiting (more than the crash-loop limit): still waiting, then done."""
    async def go() -> None:
        await device.boot()
        if which == "download":
            policy, state = UpdatePolicy(download_window=NIGHT), p.UpdateState.WAITING_WINDOW
            aid = await device.deliver("a.bin", "1.0.0", policy,
                                       lambda a: device.of_type(a, E.WAITING_WINDOW))
        else:
            policy, state = UpdatePolicy(activation_window=NIGHT), p.UpdateState.STAGED
            aid = await device.deliver("a.bin", "1.0.0", policy)
        for restart in range(1, 7):
            await device.crash()
            updater = await device.boot()
            await device.until(lambda n=restart: len(device.clock.sleeps) > n
                               and device.clock.sleeps[-1] == NIGHT_OPENS, "the wait again")
            record = device.record()
            assert (record.state, record.resumes) == (state, 0), "waiting is not a crash loop"
        assert device.final(aid) is None and updater.stores.store("m").active() is None
        assert len(device.server.requests("a.bin")) == (0 if which == "download" else 1)
        device.clock.set(at("2026-06-01T02:10:00+00:00"))
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED

    run(go)


# -- when a window is open, and when it next opens ---------------------------------------

CASES = [
    # (id, cron, duration_s, tz, device zone, now (UTC), open, next opening (UTC))
    ("utc-before", "0 2 * * *", 3600, "UTC", None,
     "2026-06-01T01:30:00", False, "2026-06-01T02:00:00"),
    ("utc-inside", "0 2 * * *", 3600, "UTC", None, "2026-06-01T02:59:59", True, None),
    ("utc-just-closed", "0 2 * * *", 3600, "UTC", None,
     "2026-06-01T03:00:00", False, "2026-06-02T02:00:00"),
    ("berlin-summer-inside", "0 2 * * *", 3600, "Europe/Berlin", None,
     "2026-06-01T00:30:00", True, None),
    ("new-york-crosses-midnight-after", "0 23 * * *", 7200, "America/New_York", None,
     "2026-06-02T04:30:00", True, None),
    ("new-york-crosses-midnight-closed", "0 23 * * *", 7200, "America/New_York", None,
     "2026-06-02T06:00:00", False, "2026-06-03T03:00:00"),
    ("local-is-the-device-zone", "0 2 * * *", 3600, "local", "Asia/Kolkata",
     "2026-06-01T20:00:00", False, "2026-06-01T20:30:00"),
    ("local-inside", "0 2 * * *", 3600, "local", "Asia/Kolkata",
     "2026-06-01T20:45:00", True, None),
    # 02:30 does not exist on 29 March in Berlin: the window opens as the clocks jump
    ("dst-spring-forward", "30 2 * * *", 3600, "Europe/Berlin", None,
     "2026-03-29T00:00:00", False, "2026-03-29T01:00:00"),
    # 02:30 happens twice on 25 October in Berlin: the window opens once, at the first
    ("dst-fall-back-first", "30 2 * * *", 3600, "Europe/Berlin", None,
     "2026-10-24T23:00:00", False, "2026-10-25T00:30:00"),
    ("dst-fall-back-not-twice", "30 2 * * *", 3600, "Europe/Berlin", None,
     "2026-10-25T01:45:00", False, "2026-10-26T01:30:00"),
    ("weekly", "0 2 * * 6", 3600, "UTC", None,
     "2026-06-01T20:00:00", False, "2026-06-06T02:00:00"),
]


@pytest.mark.parametrize(("cron", "duration", "tz", "zone", "now", "is_open", "opens"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_window_table(tmp_path: Path, cron: str, duration: int, tz: str, zone: str | None,
                      now: str, is_open: bool, opens: str | None) -> None:
    config = AgentConfig(device_id="dev-1", state_dir=tmp_path, timezone=zone, metered="no")
    clock = ManualClock(at(f"{now}+00:00"))
    gate = PolicyGate(config, clock, UpdateLocks(tmp_path / "locks.json", SystemClock()))
    window = Window(cron=cron, duration_s=duration, tz=tz)
    for policy, state in ((UpdatePolicy(download_window=window), p.UpdateState.WAITING_WINDOW),
                          (UpdatePolicy(activation_window=window), p.UpdateState.STAGED)):
        hold = (gate.download_hold(policy) if policy.download_window
                else gate.activation_hold(policy))
        if is_open:
            assert hold is None
            continue
        assert hold is not None and hold.state is state
        assert hold.until == at(f"{opens}+00:00")
        assert f"opens at {opens}+00:00" in hold.reason


def test_the_device_zone_defaults_to_the_system_zone_file(tmp_path: Path) -> None:
    from agent.update.timezone import device_zone

    zoneinfo = Path("/usr/share/zoneinfo/Asia/Kolkata")
    if not zoneinfo.is_file():
        pytest.skip("no system zone database")
    local = device_zone(None, zoneinfo)
    window = Window(cron="0 2 * * *", duration_s=3600, tz="local")
    assert window.next_open(at("2026-06-01T20:00:00+00:00"), local) == \
        at("2026-06-01T20:30:00+00:00")
    with pytest.raises(ValueError, match="unknown time zone"):
        AgentConfig(device_id="dev-1", timezone="Mars/Olympus")
