"""Default update policies by label and firmware profile, and a rollout's own over them.

The API (set, list, remove, refusals) against a real control plane and
database; what a device gets is read from its signed document, verified as
an agent verifies it. The merge itself is also checked as a pure function.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

import protocol as p
from controlplane.db.models import DesiredDocument
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.rollouts.outcome import ReportedEvent, outcome
from controlplane.rollouts.waiting import waiting_until
from controlplane.service import ControlPlane
from controlplane.update_policies import PolicyLayer, effective
from slmfleet.app import build_app
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings
from tests.support.policy_fleet import TestClock, add_policy_devices
from tests.support.registry import TrustFiles, publish
from tests.support.rollout_fleet import SimFleet, wait_for
from tests.support.signer import TrustSimulator

pytest_plugins = ["tests.support.trust_fixtures", "tests.support.rollout_fixtures"]

MODEL = "smollm2-defaults"
NIGHT = {"cron": "0 1 * * *", "duration_s": 7200, "tz": "local"}
WEEKEND = {"cron": "0 3 * * 6", "duration_s": 3600, "tz": "America/New_York"}


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, cp_credentials: Any,
       trust: TrustFiles, sim: TrustSimulator) -> Iterator[ControlPlane]:
    settings = cp_settings(tmp_path_factory.mktemp("cp"), broker, cp_credentials,
                           **trust.settings())
    plane = ControlPlane(settings, rollout_tick_s=0.2).start()
    with httpx.Client(base_url=plane.api_url, headers=ADMIN_HEADERS) as client:
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            publish(client, sim, MODEL, version, (p.Tier.SMALL,))
    yield plane
    plane.stop()


def _policy(cp: ControlPlane, sim: TrustSimulator, device_id: str) -> p.UpdatePolicy | None:
    assert cp.engine is not None
    with cp.engine.connect() as conn:
        envelope = conn.execute(select(DesiredDocument.envelope).where(
            DesiredDocument.device_id == device_id)).scalar_one()
    verified = p.verify_desired(
        envelope.encode(), device_id=device_id, release_keys=sim.release_keys,
        director_keys=sim.director_keys, now=time.time(), highest_sequence=0,
        device_tier=p.Tier.SMALL)
    return verified.entries[MODEL].entry.policy


def test_layers_merge_field_by_field_the_rollout_last() -> None:
    profile = PolicyLayer(max_bytes_per_s=1 << 20, allow_metered=False,
                          download_window=p.Window(**NIGHT))
    label = PolicyLayer(allow_metered=True)
    rollout = PolicyLayer(download_window=p.Window(**WEEKEND))
    merged = effective([profile, label, rollout])
    assert merged == p.UpdatePolicy(download_window=p.Window(**WEEKEND),
                                    max_bytes_per_s=1 << 20, allow_metered=True)
    assert effective([PolicyLayer(), None]) is None
    assert effective([None, PolicyLayer(allow_metered=False)]) == p.UpdatePolicy()


@pytest.mark.parametrize(("events", "state", "reason"), [
    ([("received", None), ("waiting_window", "opens at 2026-12-07T02:00:00Z")],
     "waiting", "waiting_window: opens at 2026-12-07T02:00:00Z"),
    ([("waiting_network", "metered link"), ("downloading", None)], "assigned", None),
    ([("staged", "deferred: locked: kiosk busy")], "waiting",
     "staged: deferred: locked: kiosk busy"),
    ([("deferred", "locked: kiosk"), ("activated", None)], "succeeded", None),
    ([("deferred", "activation window opens at 2026-12-07T02:00:00Z"),
      ("failed", "health_failed: x")], "failed", "failed: health_failed: x"),
])
def test_waiting_events_make_a_waiting_member_never_a_failed_one(
    events: list[tuple[str, str | None]], state: str, reason: str | None
) -> None:
    values = outcome(ReportedEvent("a-1", t, None, r) for t, r in events)
    assert values["state"] == state and values["reason"] == reason


@pytest.mark.parametrize(("reason", "until"), [
    ("download window opens at 2026-12-07T02:00:00Z", 1796608800.0),
    ("activation window opens at 2026-12-07T03:00:00+01:00", 1796608800.0),
    ("locked: robot mid-task", None),
    ("opens at 2026-12-07T02:00:00 (no zone)", None),
    (None, None),
])
def test_until_is_read_from_the_waiting_reason(reason: str | None, until: float | None) -> None:
    assert waiting_until(reason) == until


def test_defaults_are_set_listed_refused_and_removed(api: httpx.Client,
                                                     cp: ControlPlane) -> None:
    key = f"site{secrets.token_hex(3)}"
    r = api.put(f"/v1/update-policies/label/{key}/store", json={"download_window": NIGHT})
    assert r.status_code == 200, r.text
    assert r.json()["policy"] == {"download_window": NIGHT, "activation_window": None,
                                  "max_bytes_per_s": None, "allow_metered": None}
    listed = api.get("/v1/update-policies").json()["items"]
    assert [(d["selector"], d["key"], d["value"]) for d in listed if d["key"] == key] == \
        [("label", key, "store")]
    # Refusals, each saying what is wrong, and nothing stored.
    long = api.put(f"/v1/update-policies/profile/{'x' * 129}", json={"allow_metered": True})
    assert long.status_code == 422 and long.json()["detail"][0]["loc"] == ["path", "name"]
    assert api.put(f"/v1/update-policies/profile/{key}",
                   json={"max_bytes_per_s": 10}).status_code == 422
    assert api.put(f"/v1/update-policies/profile/{key}",
                   json={"download_window": {**NIGHT, "cron": "61 1 * * *"}}).status_code == 422
    assert api.put(f"/v1/update-policies/profile/{key}",
                   json={"download_window": {**NIGHT, "tz": "Mars/Olympus"}}).status_code == 422
    assert api.put(f"/v1/update-policies/profile/{key}",
                   json={"lock_override": {"id": "x", "issued_at": 1, "reason": "r"}}
                   ).status_code == 422
    assert api.put("/v1/update-policies/device/x", json={"allow_metered": True}) \
        .status_code == 404  # defaults are by label or profile only
    issued = api.post("/v1/tokens", json={"name": f"viewer-{key}", "role": "viewer"}).json()
    with httpx.Client(base_url=cp.api_url,
                      headers={"Authorization": f"Bearer {issued['token']}"}) as viewer:
        assert viewer.put(f"/v1/update-policies/profile/{key}",
                          json={"allow_metered": True}).status_code == 403
        assert viewer.get("/v1/update-policies").status_code == 200
    assert [d["key"] for d in api.get("/v1/update-policies").json()["items"]].count(key) == 1
    assert api.delete(f"/v1/update-policies/label/{key}/store").status_code == 204
    assert api.delete(f"/v1/update-policies/label/{key}/store").status_code == 404


def test_label_and_profile_defaults_apply_and_a_rollouts_own_policy_wins(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet, sim: TrustSimulator
) -> None:
    labels = {"test": secrets.token_hex(4)}
    clock = TestClock(time.time())
    devices = add_policy_devices(fleet, "dflt", 2, labels=labels, clock=clock, model=MODEL,
                                 version="1.0.0")
    wait_for(lambda: len(api.get("/v1/devices", params={
        "label": f"test={labels['test']}", "online": True}).json()["items"]) == 2, 15, "online")
    # The profile says: cap 1 MiB/s, nightly window; the label: metered links are fine.
    profile = "sim-small"  # what these simulated devices report
    assert api.put(f"/v1/update-policies/profile/{profile}",
                   json={"max_bytes_per_s": 1 << 20, "download_window": NIGHT}).status_code == 200
    try:
        assert api.put(f"/v1/update-policies/label/test/{labels['test']}",
                       json={"allow_metered": True}).status_code == 200
        # A direct assignment gets the defaults.
        target = devices[0].device_id
        r = api.post(f"/v1/devices/{target}/assignment", json={"model": MODEL,
                                                               "version": "1.1.0"})
        assert r.status_code == 200, r.text
        assert _policy(cp, sim, target) == p.UpdatePolicy(
            download_window=p.Window(**NIGHT), max_bytes_per_s=1 << 20, allow_metered=True)

        # A rollout's own window wins over the profile's; the rest stays.
        r = api.post("/v1/rollouts", json={
            "model": MODEL, "version": "1.2.0", "target": {"labels": labels},
            "stages": [{"percent": 100, "bake_s": 0}], "download_window": WEEKEND,
            "allow_metered": False})
        assert r.status_code == 201, r.text

        def signed_weekend() -> bool:
            return all(_policy(cp, sim, d.device_id) == p.UpdatePolicy(
                download_window=p.Window(**WEEKEND), max_bytes_per_s=1 << 20,
                allow_metered=False) for d in devices)

        wait_for(signed_weekend, 15, "both devices signed the rollout's policy")
        # What the device verified and holds is the same policy.
        assert devices[1].documents[-1].entries[MODEL].entry.policy.download_window == \
            p.Window(**WEEKEND)  # type: ignore[union-attr]
    finally:
        api.delete(f"/v1/update-policies/profile/{profile}")
        api.delete(f"/v1/update-policies/label/test/{labels['test']}")


def test_an_old_agent_with_a_default_policy_is_told_to_upgrade(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    labels = {"test": secrets.token_hex(4)}
    old = fleet.add(f"old-{secrets.token_hex(3)}", "small", {}, labels=labels,
                    active=(MODEL, "1.0.0"))
    wait_for(lambda: api.get(f"/v1/devices/{old.device_id}").status_code == 200, 15, "seen")
    assert api.put(f"/v1/update-policies/label/test/{labels['test']}",
                   json={"max_bytes_per_s": 4096}).status_code == 200
    try:
        r = api.post(f"/v1/devices/{old.device_id}/assignment",
                     json={"model": MODEL, "version": "1.1.0"})
        assert r.status_code == 409
        assert r.json()["detail"]["status"] == "needs_upgrade"
        assert "slmfleet.hello/2" in r.json()["detail"]["reason"]
        time.sleep(0.5)
        assert old.received == []
    finally:
        api.delete(f"/v1/update-policies/label/test/{labels['test']}")
    # Without the default it takes the release as before.
    r = api.post(f"/v1/devices/{old.device_id}/assignment",
                 json={"model": MODEL, "version": "1.1.0"})
    assert r.status_code == 200, r.text


def test_policies_cli_sets_lists_and_removes(cp: ControlPlane, tmp_path: Any) -> None:
    from typer.testing import CliRunner

    def cli(*args: str, code: int = 0) -> str:
        result = CliRunner(env={"COLUMNS": "300"}).invoke(build_app("policies"), [
            "policies", *args, "--server", cp.api_url, "--token", ADMIN_TOKEN])
        assert result.exit_code == code, result.output
        return " ".join(result.output.split())

    key = f"fleet{secrets.token_hex(3)}"
    spec = tmp_path / "policy.yaml"
    spec.write_text("activation_window: {cron: '30 2 * * *', duration_s: 1800, tz: local}\n"
                    "max_bytes_per_s: 1048576\n")
    assert "30 2 * * * for 1800 s (local)" in cli("set", "label", f"{key}=kiosk", "-f", str(spec))
    listed = cli("list")
    assert f"label {key}=kiosk" in listed and "1048576" in listed
    spec.write_text("max_bytes_per_s: 12\n")
    assert "HTTP 422" in cli("set", "profile", key, "-f", str(spec), code=1)
    assert "removed" in cli("remove", "label", f"{key}=kiosk")
    assert f"{key}=kiosk" not in cli("list")


def test_the_old_form_never_carries_a_policy() -> None:
    from dataclasses import replace

    from controlplane.documents import SET, SINGLE, Entry, Release
    from controlplane.plans import Change, plan_change

    release = Release(1, f"{MODEL}@1.0.0", {}, b"{}")
    entry = Entry(MODEL, "a-1", release, p.Tier.SMALL, None, p.UpdatePolicy(allow_metered=True))
    # A new assignment with a policy, to an agent reading one model: refused.
    plan, refused = plan_change(Change("d", MODEL, entry), {}, SINGLE)
    assert plan is None and refused is not None and refused.status == "needs_upgrade"
    # Without one it goes out in the old form, as before.
    plan, _ = plan_change(Change("d", MODEL, replace(entry, policy=None)), {}, SINGLE)
    assert plan is not None and plan.form == SINGLE
    # An agent gone back to the old form while holding an entry with a policy: its
    # re-sign stays a set, the only form that says what the entry is.
    plan, refused = plan_change(Change("d"), {MODEL: entry}, SINGLE)
    assert refused is None and plan is not None and plan.form == SET
