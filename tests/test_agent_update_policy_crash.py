"""kill -9 while waiting for a window, then while deferred by a lock: the device still waits.

A real agent process on the real clock, real broker, the real SmolLM2 GGUF
(download, real health check in the serving worker), and an app holding an
update lock over real HTTP. The download window opens at the next minute
boundary at least 45 s away (cron has minutes, not seconds; the first
restart needs a few seconds of it):

1. an app takes a lock; the set arrives; the device waits for the window;
2. kill -9; after the restart it still waits: nothing is requested from the
   artifact server before the opening;
3. at the opening it downloads and health-checks, then defers for the lock;
4. kill -9; after the restart the lock (persisted) still defers the swap;
5. the app releases it (with the id it was given before both crashes) and
   the swap happens at once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

import protocol as p
from agent.update.state import UpdateStateStore
from protocol import GoldenPrompt, HealthCheck
from protocol.update_policy import UpdatePolicy, Window
from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import ready_url, serving_rig
from tests.support.policy import sign_policy_set
from tests.support.updates import DeviceRig, link_or_copy, variant_for, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

E = p.EventType
GGUF = "smollm2.gguf"
MODEL = "smollm2-135m"
#: one short golden prompt, not gated on speed: this test is about waiting and crashing,
#: on a machine that may be busy with other suites
QUICK_CHECK = HealthCheck(golden_prompts=[GoldenPrompt(prompt="What is the opposite of hot?",
                                                       expected=["cold"], max_tokens=8)],
                          max_ttft_ms=120_000.0)


@pytest.fixture
def rig(tmp_path: Path, broker, cp_credentials, model_path: Path) -> Iterator[DeviceRig]:
    link_or_copy(model_path, tmp_path / "artifacts" / GGUF)
    device_id = f"wait-{secrets.token_hex(3)}"
    with (
        ArtifactServer(tmp_path / "artifacts") as server,
        serving_rig(tmp_path / device_id, broker, cp_credentials, device_id, server, model_path,
                    MODEL, metered="no") as rig,
    ):
        yield rig


def _state(rig: DeviceRig) -> p.UpdateState:
    return UpdateStateStore(rig.state_dir / "update" / "state.json").load().models[MODEL].state


def _of_type(rig: DeviceRig, aid: str, kind: p.EventType) -> list[p.Event]:
    return [e for e in rig.events(aid) if e.type == kind]


def _wait(rig: DeviceRig, aid: str, kind: p.EventType, timeout: float, count: int = 1,
          ) -> list[p.Event]:
    """``count`` events of ``kind``; on a timeout, says what the device did instead."""
    try:
        return wait_for(lambda: len(_of_type(rig, aid, kind)) >= count and
                        _of_type(rig, aid, kind), timeout, f"{count} {kind.value} event(s)")
    except AssertionError:
        seen = [(e.type.value, e.reason) for e in rig.events(aid)]
        log = rig.agent.log()[-3000:] if rig.agent else ""
        raise AssertionError(f"no {kind.value} for {aid}: {seen}\n{log}") from None


def test_kill_9_while_waiting_for_a_window_or_a_lock(rig: DeviceRig) -> None:
    url = ready_url(rig)
    lock = httpx.post(f"{url}/v1/update-lock", json={"reason": "demo in progress",
                                                     "lease_s": 3600}).json()
    opens = (int(time.time()) // 60 + 1) * 60
    if opens - time.time() < 45:
        opens += 60
    at = datetime.fromtimestamp(opens, UTC)
    window = Window(cron=f"{at.minute} {at.hour} * * *", duration_s=900, tz="UTC")
    release = rig.release("2.0.0", variant_for(rig.server.directory / GGUF, GGUF,
                                               health_check=QUICK_CHECK))
    aid = "wait-1"
    rig.publish(sign_policy_set(rig.sim, rig.device_id, MODEL, release,
                                UpdatePolicy(download_window=window),
                                sequence=rig.next_sequence(), assignment_id=aid,
                                artifact_url_base=rig.server.base_url))
    waiting = _wait(rig, aid, E.WAITING_WINDOW, 30)
    assert f"opens at {at.isoformat()}" in waiting[0].reason

    rig.restart()  # kill -9, start again
    wait_for(lambda: rig.hellos() and rig.hellos()[-1].update is not None
             and rig.hellos()[-1].update.state == p.UpdateState.WAITING_WINDOW, 30,
             "hello to report the wait after the restart")
    assert _state(rig) == p.UpdateState.WAITING_WINDOW
    assert time.time() < opens, "the restart came before the opening"
    wait_for(lambda: time.time() >= opens - 1, 120, "just before the opening")
    assert rig.server.requests(GGUF) == [], "nothing downloaded before the window"

    _wait(rig, aid, E.DEFERRED, 240)
    first_request = rig.server.requests(GGUF)[0]
    assert first_request.range is None
    deferred = _of_type(rig, aid, E.DEFERRED)[0]
    assert (deferred.code, deferred.reason) == (
        p.EventCode.LOCKED, "locked: update lock held by 'demo in progress'")
    downloading = _of_type(rig, aid, E.DOWNLOADING)[0]
    assert downloading.ts >= opens, "the download began at the opening, not before"

    rig.restart()
    _wait(rig, aid, E.DEFERRED, 240, count=2)
    assert rig.store.active().key == f"{MODEL}@1.0.0-micro", "the old version still serves"
    assert _state(rig) == p.UpdateState.STAGED
    url = ready_url(rig)
    listed = httpx.get(f"{url}/v1/update-lock").json()["locks"]
    assert [lock_["reason"] for lock_ in listed] == ["demo in progress"]

    released = time.monotonic()
    reply = httpx.delete(f"{url}/v1/update-lock/{lock['id']}")
    assert reply.status_code == 200, reply.text
    final = rig.wait_final(aid, timeout=60)
    assert final.type == E.ACTIVATED, final.reason
    assert time.monotonic() - released < 10
    assert rig.active()[0] == f"{MODEL}@2.0.0-micro"
