"""Update locks: an app on the device holds off model swaps over the local API.

The in-process pipeline of tests/test_agent_update_policy.py, with the real
local API in front of its lock registry; the app is a real HTTP client (and,
for the holder that dies, a real process killed with SIGKILL). Leases run on
the test's clock, so expiry is exact and instant.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import protocol as p
from agent.inference.api import ApiSettings, LocalApi
from agent.inference.runtime import InferenceRuntime
from agent.update.locks import MAX_LOCKS, UpdateLocks
from protocol.update_policy import LockOverride, UpdatePolicy
from tests.support.policy import (
    DEVICE,
    START,
    ManualClock,
    PolicyDevice,
    policy_device,
    sign_policy_set,
    variant_for,
)
from tests.test_agent_updater import run

E = p.EventType


@pytest.fixture
def device(tmp_path: Path) -> Iterator[PolicyDevice]:
    yield from policy_device(tmp_path, 64 * 1024)


class App:
    """The device's app: the agent's local API over real HTTP."""

    def __init__(self, api: LocalApi) -> None:
        self.api = api
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=10)

    async def take(self, reason: str, lease_s: float) -> dict[str, Any]:
        reply = await self.http.post("/v1/update-lock", json={"reason": reason,
                                                              "lease_s": lease_s})
        assert reply.status_code == 200, reply.text
        return reply.json()


async def serve(device: PolicyDevice) -> App:
    """Boot the device and its local API (no model served: the lock routes need none)."""
    updater = await device.boot()
    api = LocalApi(InferenceRuntime(), ApiSettings(), locks=updater.locks)
    await api.start()
    return App(api)


def deferred_by_lock(device: PolicyDevice, aid: str) -> list[p.Event]:
    return [e for e in device.of_type(aid, E.DEFERRED) if e.code == p.EventCode.LOCKED]


def test_a_lock_defers_activation_renewals_keep_it_and_release_swaps_at_once(
    device: PolicyDevice,
) -> None:
    clock = device.clock

    async def go() -> None:
        app = await serve(device)
        lock = await app.take("robot arm mid-task", 60)
        assert lock["expires_at"] == START + 60 and lock["reason"] == "robot arm mid-task"

        aid = await device.deliver("a.bin", "1.0.0", None)
        event = deferred_by_lock(device, aid)[0]
        assert event.reason == "locked: update lock held by 'robot arm mid-task'"
        assert device.record().state == p.UpdateState.STAGED
        assert device.updater.stores.store("m").active() is None
        # It sleeps to the lease's end, not in small steps.
        await device.until(lambda: START + 60 in clock.sleeps, "the wait to the lease's end")

        for _ in range(3):  # renewed before each lease ends: held past the first lease
            clock.advance(50)
            reply = await app.http.post(f"/v1/update-lock/{lock['id']}/renew")
            assert reply.status_code == 200, reply.text
            assert reply.json()["expires_at"] == clock.now() + 60
        await asyncio.sleep(0.2)
        assert device.final(aid) is None, "renewals keep it"
        assert len(deferred_by_lock(device, aid)) == 1, "a renewal is not a new deferral"

        released = time.monotonic()
        reply = await app.http.delete(f"/v1/update-lock/{lock['id']}")
        assert reply.json() == {"released": lock["id"]}
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED
        assert time.monotonic() - released < 2.0, "release lets the swap happen at once"
        assert (await app.http.get("/v1/update-lock")).json() == {"locks": []}
        await app.api.close()

    run(go)


HOLDER = """
import json, sys, time, urllib.request
request = urllib.request.Request(sys.argv[1] + "/v1/update-lock", method="POST",
    data=json.dumps({"reason": "checkout in progress", "lease_s": 30}).encode(),
    headers={"content-type": "application/json"})
print(json.load(urllib.request.urlopen(request))["id"], flush=True)
time.sleep(600)
"""


def test_a_lock_whose_holder_dies_expires_after_its_lease(device: PolicyDevice) -> None:
    clock = device.clock

    async def go() -> None:
        app = await serve(device)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(app.http.base_url)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            line = await asyncio.to_thread(holder.stdout.readline)
            assert len(line.strip()) == 32, line
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        aid = await device.deliver("a.bin", "1.0.0", None)
        assert "'checkout in progress'" in deferred_by_lock(device, aid)[0].reason

        clock.set(START + 29)
        await asyncio.sleep(0.2)
        assert device.final(aid) is None, "held for its whole lease"
        clock.set(START + 30)
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED
        assert START + 30 in clock.sleeps, "the wait was computed to the lease's end"
        await app.api.close()

    run(go)


def test_an_operator_override_skips_locks_taken_before_it(device: PolicyDevice) -> None:
    clock = device.clock

    async def go() -> None:
        app = await serve(device)
        await app.take("stuck kiosk session", 3600)
        clock.advance(10)
        override = LockOverride(id="ovr-7", issued_at=clock.now() - 1, reason="hotfix")
        payload, aid = device.offer("a.bin", "1.0.0", UpdatePolicy(lock_override=override))
        await device.updater.offer(payload)
        await device.until(lambda: device.final(aid), "the activation")
        activated = device.final(aid)
        assert activated.type == E.ACTIVATED and activated.code == p.EventCode.LOCK_OVERRIDDEN
        assert "override ovr-7 (hotfix)" in activated.reason
        assert "'stuck kiosk session'" in activated.reason
        assert deferred_by_lock(device, aid) == []

        # A lock taken after the override was issued still defers.
        await app.take("new task", 3600)
        second = await device.deliver("a.bin", "1.0.1", UpdatePolicy(lock_override=override))
        assert deferred_by_lock(device, second)[0].reason == \
            "locked: update lock held by 'new task'"
        await app.api.close()

    run(go)


def test_an_override_re_signed_into_a_waiting_entry_ends_the_wait(device: PolicyDevice) -> None:
    """The control plane's override keeps the entry's assignment id: the agent takes
    the re-signed entry's policy into the update already deferred by a lock."""
    clock = device.clock

    async def go() -> None:
        app = await serve(device)
        await app.take("stuck kiosk session", 3600)
        release = device.sim.release("m", "1.0.0", variants={
            p.Tier.MICRO: variant_for(device.server.directory / "a.bin", "a.bin")})

        def signed(policy: UpdatePolicy | None) -> bytes:
            device.sequence += 1
            return sign_policy_set(device.sim, DEVICE, "m", release, policy,
                                   sequence=device.sequence, assignment_id="a-m-held",
                                   artifact_url_base=device.server.base_url)

        assert device.updater is not None
        await device.updater.offer(signed(None))
        await device.until(lambda: deferred_by_lock(device, "a-m-held"), "the lock to defer it")
        assert device.final("a-m-held") is None
        clock.advance(5)
        override = LockOverride(id="ovr-9", issued_at=clock.now(), reason="security fix")
        await device.updater.offer(signed(UpdatePolicy(lock_override=override)))
        await device.until(lambda: device.final("a-m-held"), "the activation")
        activated = device.final("a-m-held")
        assert activated.type == E.ACTIVATED and activated.code == p.EventCode.LOCK_OVERRIDDEN
        assert "override ovr-9 (security fix)" in activated.reason
        await app.api.close()

    run(go)


def test_a_crash_while_locked_still_waits_then_completes(device: PolicyDevice) -> None:
    async def go() -> None:
        app = await serve(device)
        lock = await app.take("surgery robot", 600)
        aid = await device.deliver("a.bin", "1.0.0", None)
        await device.crash()

        updater = await device.boot()  # a new process: the locks come back from disk
        app.api.locks = updater.locks
        await device.until(lambda: len(deferred_by_lock(device, aid)) == 2, "deferred again")
        await asyncio.sleep(0.2)
        assert device.final(aid) is None and updater.stores.store("m").active() is None
        reply = await app.http.delete(f"/v1/update-lock/{lock['id']}")
        assert reply.status_code == 200, reply.text
        await device.until(lambda: device.final(aid), "the activation")
        assert device.final(aid).type == E.ACTIVATED
        await app.api.close()

    run(go)


BAD = [
    # (id, method, path, body, status, code)
    ("not-json", "POST", "/v1/update-lock", b"{", 400, "invalid_json"),
    ("not-an-object", "POST", "/v1/update-lock", b"[]", 400, "invalid_json"),
    ("no-reason", "POST", "/v1/update-lock", {"lease_s": 10}, 400, "invalid_reason"),
    ("blank-reason", "POST", "/v1/update-lock", {"reason": "  ", "lease_s": 10}, 400,
     "invalid_reason"),
    ("long-reason", "POST", "/v1/update-lock", {"reason": "x" * 257, "lease_s": 10}, 400,
     "invalid_reason"),
    ("two-line-reason", "POST", "/v1/update-lock", {"reason": "a\nb", "lease_s": 10}, 400,
     "invalid_reason"),
    ("no-lease", "POST", "/v1/update-lock", {"reason": "r"}, 400, "invalid_lease"),
    ("lease-zero", "POST", "/v1/update-lock", {"reason": "r", "lease_s": 0}, 400,
     "invalid_lease"),
    ("lease-too-long", "POST", "/v1/update-lock", {"reason": "r", "lease_s": 86_401}, 400,
     "invalid_lease"),
    ("lease-text", "POST", "/v1/update-lock", {"reason": "r", "lease_s": "10"}, 400,
     "invalid_lease"),
    ("lease-bool", "POST", "/v1/update-lock", {"reason": "r", "lease_s": True}, 400,
     "invalid_lease"),
    ("unknown-field", "POST", "/v1/update-lock", {"reason": "r", "lease_s": 5, "x": 1}, 400,
     "unknown_field"),
    ("renew-bad-lease", "POST", "/v1/update-lock/{id}/renew", {"lease_s": -1}, 400,
     "invalid_lease"),
    ("renew-unknown", "POST", "/v1/update-lock/nope/renew", {}, 404, "lock_not_found"),
    ("release-unknown", "DELETE", "/v1/update-lock/nope", None, 404, "lock_not_found"),
    ("renew-wrong-path", "POST", "/v1/update-lock/{id}/extend", {}, 404, "not_found"),
    ("put", "PUT", "/v1/update-lock", {}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_lock_requests_get_a_clear_error_and_lose_nothing(
    device: PolicyDevice, method: str, path: str, body: Any, status: int, code: str
) -> None:
    async def go() -> None:
        app = await serve(device)
        kept = await app.take("kept", 100)
        content = body if isinstance(body, bytes) else None
        reply = await app.http.request(method, path.format(id=kept["id"]), content=content,
                                       json=None if content is not None else body)
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["code"] == code
        listed = (await app.http.get("/v1/update-lock")).json()["locks"]
        assert listed == [{k: v for k, v in kept.items() if k != "id"}], "the lock is intact"
        await app.api.close()

    run(go)


def test_the_number_of_locks_is_capped(device: PolicyDevice) -> None:
    async def go() -> None:
        app = await serve(device)
        for n in range(MAX_LOCKS):
            await app.take(f"task {n}", 100)
        reply = await app.http.post("/v1/update-lock", json={"reason": "one more",
                                                             "lease_s": 100})
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "too_many_locks"
        assert len((await app.http.get("/v1/update-lock")).json()["locks"]) == MAX_LOCKS
        await app.api.close()

    run(go)


def test_locks_survive_a_restart_for_their_lease_only(tmp_path: Path) -> None:
    clock = ManualClock(START)
    path = tmp_path / "update" / "locks.json"
    locks = UpdateLocks(path, clock)
    short, long = locks.take("short", 10), locks.take("long", 100)
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    again = UpdateLocks(path, clock)
    assert [lock.id for lock in again.held()] == [short.id, long.id]
    clock.advance(10)
    assert [lock.id for lock in UpdateLocks(path, clock).held()] == [long.id]
    clock.advance(90)
    assert UpdateLocks(path, clock).held() == []

    path.write_text("{not json")
    assert UpdateLocks(path, clock).held() == [], "an unreadable file is no lock at all"
