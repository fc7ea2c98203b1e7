"""A set of models per device, on the control plane's side: real Mosquitto (ACLs
on), a real control plane (SQLite and PostgreSQL), and honest simulated devices
that check every document they get as an agent does (``protocol.verify_desired``
for those that say hello/2, ``protocol.verify_assignment`` for the old form).

Each test has devices of its own (a fresh label), so the tests share one control
plane, one broker and one set of registered releases.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, text

import protocol as p
from controlplane.db import make_engine
from controlplane.db.models import AssignmentRecord, DesiredDocument
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.controlplane import cp_settings
from tests.support.registry import TrustFiles, publish
from tests.support.rollout_fleet import Behaviour, SimDevice, SimFleet, ids, wait_for
from tests.support.signer import TrustSimulator

TICK_S = 0.2
CHAT = "smollm2"
EMBED = "embedder"
#: what each version does on the simulated devices (versions differ across models,
#: so one table serves both)
BEHAVIOURS = {
    "1.0.0": Behaviour(tokens_per_s=80.0),
    "1.1.0": Behaviour(tokens_per_s=82.0),
    "1.3.0": Behaviour(tokens_per_s=35.0, latency_p95_ms=900.0),
    # The embedder is slow and erratic: a gate that mixed models would see it.
    "2.0.0": Behaviour(tokens_per_s=10.0, latency_p95_ms=3000.0, errors_per_10=3),
}

# sim, trust; api, fleet
pytest_plugins = ["tests.support.trust_fixtures", "tests.support.rollout_fixtures"]


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, cp_credentials: Any,
       trust: TrustFiles, sim: TrustSimulator, database_backend: str) -> Iterator[ControlPlane]:
    settings = cp_settings(tmp_path_factory.mktemp("cp"), broker, cp_credentials,
                           **trust.settings())
    plane = ControlPlane(settings, rollout_tick_s=TICK_S).start()
    with httpx.Client(base_url=plane.api_url, headers=ADMIN_HEADERS) as client:
        for version in ("1.0.0", "1.1.0", "1.3.0"):
            publish(client, sim, CHAT, version, (p.Tier.SMALL,))
        publish(client, sim, EMBED, "2.0.0", (p.Tier.SMALL,))
    yield plane
    plane.stop()


def _devices(api: httpx.Client, fleet: SimFleet, prefix: str, n: int, *, sets: bool = True
             ) -> tuple[dict[str, str], list[SimDevice]]:
    labels = {"test": secrets.token_hex(4)}
    devices = [fleet.add(d, "small", BEHAVIOURS, labels=labels, sets=sets)
               for d in ids(prefix, n)]
    form = "set" if sets else "single"
    wait_for(lambda: len(api.get("/v1/devices", params={
        "label": f"test={labels['test']}", "online": True, "assignment_form": form,
    }).json()["items"]) == n, 15, "the simulated devices online")
    return labels, devices


def _assign(api: httpx.Client, labels: dict[str, str], model: str, version: str
            ) -> dict[str, Any]:
    r = api.post("/v1/devices/*/assignment", json={
        "model": model, "version": version, "selector": {"labels": labels}})
    assert r.status_code == 200, r.text
    return r.json()


def _running(device: SimDevice, models: dict[str, str]) -> None:
    wait_for(lambda: device.models == models, 10, f"{device.device_id} running {models}")


def _shown(api: httpx.Client, device_id: str, models: dict[str, str]) -> dict[str, Any]:
    """The device view once it shows ``models`` (name -> version), each serving."""
    def check() -> dict[str, Any] | None:
        view = api.get(f"/v1/devices/{device_id}").json()
        got = {n: (m["version"], m["state"]) for n, m in view["models"].items()}
        return view if got == {n: (v, "serving") for n, v in models.items()} else None

    return wait_for(check, 10, f"{device_id} shown with {models}")  # type: ignore[return-value]


def _on_both(api: httpx.Client, fleet: SimFleet, prefix: str, n: int
             ) -> tuple[dict[str, str], list[SimDevice]]:
    """``n`` set devices running the chat model 1.0.0 and the embedder 2.0.0."""
    labels, devices = _devices(api, fleet, prefix, n)
    _assign(api, labels, CHAT, "1.0.0")
    _assign(api, labels, EMBED, "2.0.0")
    for device in devices:
        _running(device, {CHAT: "1.0.0", EMBED: "2.0.0"})
        _shown(api, device.device_id, {CHAT: "1.0.0", EMBED: "2.0.0"})
    return labels, devices


def test_a_device_assigned_two_models_gets_one_signed_set_naming_both(
    api: httpx.Client, fleet: SimFleet
) -> None:
    labels, (device,) = _devices(api, fleet, "two", 1)
    chat = _assign(api, labels, CHAT, "1.0.0")["results"][0]
    embed = _assign(api, labels, EMBED, "2.0.0")["results"][0]
    assert embed["sequence"] == chat["sequence"] + 1  # one counter per device
    _running(device, {CHAT: "1.0.0", EMBED: "2.0.0"})

    last = device.documents[-1]
    assert not last.legacy and not last.refused
    assert last.sequence == embed["sequence"]
    assert {n: e.manifest.ref for n, e in last.entries.items()} == {
        CHAT: f"{CHAT}@1.0.0", EMBED: f"{EMBED}@2.0.0"}
    assert last.entries[CHAT].assignment_id == chat["assignment_id"]
    assert last.entries[EMBED].assignment_id == embed["assignment_id"]

    view = _shown(api, device.device_id, {CHAT: "1.0.0", EMBED: "2.0.0"})
    assert view["assignment_form"] == "set"
    for name, result in ((CHAT, chat), (EMBED, embed)):
        model = view["models"][name]
        assert model["tier"] == "small"
        assert model["assignment"]["assignment_id"] == result["assignment_id"]
        assert model["assignment"]["sequence"] == embed["sequence"]  # re-signed with the set
        assert model["update"]["state"] == "activated"
    listed = api.get("/v1/devices", params={"label": f"test={labels['test']}"}).json()
    assert {n: m["version"] for n, m in listed["items"][0]["models"].items()} == {
        CHAT: "1.0.0", EMBED: "2.0.0"}

    history = api.get(f"/v1/devices/{device.device_id}/history",
                      params={"model": EMBED, "limit": 500}).json()["items"]
    assert history and {h["assignment_id"] for h in history} == {embed["assignment_id"]}
    assert [h["type"] for h in history if h["kind"] == "assignment"] == ["assigned"]
    assert "activated" in [h["type"] for h in history if h["kind"] == "event"]


def test_removing_a_model_publishes_a_set_without_it(
    api: httpx.Client, fleet: SimFleet
) -> None:
    _, (device,) = _on_both(api, fleet, "remove", 1)
    before = device.documents[-1]
    r = api.delete(f"/v1/devices/{device.device_id}/assignment/{EMBED}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "unassigned" and r.json()["sequence"] > before.sequence
    _running(device, {CHAT: "1.0.0"})
    after = device.documents[-1]
    assert set(after.entries) == {CHAT} and after.sequence == r.json()["sequence"]
    # The chat entry is the same assignment, re-signed: no reinstall.
    assert after.entries[CHAT].assignment_id == before.entries[CHAT].assignment_id
    assert [e.manifest.ref for e in device.received].count(f"{CHAT}@1.0.0") == 1
    _shown(api, device.device_id, {CHAT: "1.0.0"})
    history = api.get(f"/v1/devices/{device.device_id}/history",
                      params={"model": EMBED, "limit": 500}).json()["items"]
    # Assigned last, so never re-signed for the other model's sake; then taken off.
    assert [h["type"] for h in history if h["kind"] == "assignment"] == [
        "assigned", "unassigned"]

    again = api.delete(f"/v1/devices/{device.device_id}/assignment/{EMBED}")
    assert again.status_code == 404 and EMBED in again.json()["detail"]
    # Taking a model off is audited like any assignment: the call and its answer.
    audit = api.get("/v1/audit", params={"limit": 500}).json()["items"]
    path = f"/v1/devices/{device.device_id}/assignment/{EMBED}"
    assert sorted(e["status"] for e in audit
                  if e["method"] == "DELETE" and e["path"] == path) == [200, 404]
    # The last model off: an empty set, signed (a set device unloads it too).
    assert api.delete(f"/v1/devices/{device.device_id}/assignment/{CHAT}").status_code == 200
    _running(device, {})
    assert device.documents[-1].entries == {} and not device.rejected


def test_an_old_form_device_gets_one_model_and_a_second_is_a_clear_409(
    api: httpx.Client, fleet: SimFleet, cp: ControlPlane
) -> None:
    labels, (device,) = _devices(api, fleet, "old", 1, sets=False)
    first = _assign(api, labels, CHAT, "1.0.0")["results"][0]
    wait_for(lambda: device.active == (CHAT, "1.0.0"), 10, "the old-form install")
    (got,) = device.received
    assert isinstance(got, p.VerifiedAssignment)  # verify_assignment read it: the old form
    assert got.assignment.assignment_id == first["assignment_id"]

    r = api.post(f"/v1/devices/{device.device_id}/assignment",
                 json={"model": EMBED, "version": "2.0.0"})
    assert r.status_code == 409
    detail = r.json()["detail"]
    assert detail["status"] == "needs_upgrade"
    assert "slmfleet.hello/1" in detail["reason"] and "upgrade" in detail["reason"]
    bulk = _assign(api, labels, EMBED, "2.0.0")
    assert bulk["needs_upgrade"] == 1 and bulk["assigned"] == 0
    # Nothing was signed for it: the same live assignment, the same number.
    view = api.get(f"/v1/devices/{device.device_id}").json()
    assert view["assignment_form"] == "single"
    assert set(view["models"]) == {CHAT}
    assert view["models"][CHAT]["assignment"]["sequence"] == first["sequence"]
    # Assigning the model it has is fine: the old form, one entry.
    again = _assign(api, labels, CHAT, "1.1.0")["results"][0]
    assert again["status"] == "assigned"
    wait_for(lambda: device.active == (CHAT, "1.1.0"), 10, "the second old-form install")
    assert not device.rejected

    metrics = api.get("/metrics").text
    single = next(line for line in metrics.splitlines()
                  if line.startswith('slmfleet_devices_by_assignment_form{form="single"}'))
    assert float(single.split()[-1]) >= 1
    olds = api.get("/v1/devices", params={"assignment_form": "single", "limit": 500}).json()
    assert device.device_id in {d["id"] for d in olds["items"]}
    sets = api.get("/v1/devices", params={"assignment_form": "set", "limit": 500}).json()
    assert device.device_id not in {d["id"] for d in sets["items"]}


def _cli(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slmfleet", "devices", *args, "--server", cp.api_url,
         "--token", ADMIN_TOKEN], capture_output=True, text=True, timeout=60)


def test_cli_assigns_and_unassigns_one_model_and_lists_the_forms(
    cp: ControlPlane, api: httpx.Client, fleet: SimFleet
) -> None:
    labels, (device,) = _devices(api, fleet, "cli", 1)
    for model, version in ((CHAT, "1.0.0"), (EMBED, "2.0.0")):
        done = _cli(cp, "assign", device.device_id, model, version)
        assert done.returncode == 0, done.stderr
        assert f"assigned {model}@{version} to {device.device_id}" in done.stdout
    _running(device, {CHAT: "1.0.0", EMBED: "2.0.0"})
    _shown(api, device.device_id, {CHAT: "1.0.0", EMBED: "2.0.0"})
    listed = _cli(cp, "list", "--label", f"test={labels['test']}", "--form", "set", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["assignment_form"] == "set" and set(row["models"]) == {CHAT, EMBED}
    shown = _cli(cp, "show", device.device_id)
    assert f"model {EMBED}" in shown.stdout and "2.0.0 (serving)" in shown.stdout

    removed = _cli(cp, "unassign", device.device_id, EMBED)
    assert removed.returncode == 0 and f"took {EMBED} off {device.device_id}" in removed.stdout
    _running(device, {CHAT: "1.0.0"})
    again = _cli(cp, "unassign", device.device_id, EMBED)
    assert again.returncode == 1 and "HTTP 404" in again.stderr
    nothing = _cli(cp, "list", "--label", f"test={labels['test']}", "--form", "single",
                   "-o", "json")
    assert json.loads(nothing.stdout) == []


def _rollout(api: httpx.Client, spec: dict[str, Any], states: set[str]) -> dict[str, Any]:
    r = api.post("/v1/rollouts", json=spec)
    assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]

    def done() -> dict[str, Any] | None:
        detail = api.get(f"/v1/rollouts/{rollout_id}").json()
        return detail if detail["state"] in states else None

    return wait_for(done, 40, f"rollout in {states}")  # type: ignore[return-value]


def test_a_rollout_of_one_model_leaves_the_other_entry_unchanged(
    api: httpx.Client, fleet: SimFleet
) -> None:
    labels, devices = _on_both(api, fleet, "roll", 4)
    embed_ids = {d.device_id: d.documents[-1].entries[EMBED].assignment_id for d in devices}
    detail = _rollout(api, {
        "model": CHAT, "version": "1.1.0", "target": {"labels": labels},
        "stages": [{"percent": 25, "bake_s": 0.3}, {"percent": 100, "bake_s": 0.3}]},
        {"completed", "paused", "rolled_back"})
    assert detail["state"] == "completed", detail["timeline"]
    assert detail["counts"] == {"succeeded": 4}
    for device in devices:
        _running(device, {CHAT: "1.1.0", EMBED: "2.0.0"})
        last = device.documents[-1]
        assert last.entries[CHAT].manifest.ref == f"{CHAT}@1.1.0"
        assert last.entries[CHAT].entry.rollout_id == detail["id"]
        # The embedder's entry: same release, same assignment, never reinstalled.
        assert last.entries[EMBED].manifest.ref == f"{EMBED}@2.0.0"
        assert last.entries[EMBED].assignment_id == embed_ids[device.device_id]
        assert [e.manifest.ref for e in device.received].count(f"{EMBED}@2.0.0") == 1
        view = _shown(api, device.device_id, {CHAT: "1.1.0", EMBED: "2.0.0"})
        assert view["models"][EMBED]["assignment"]["rollout_id"] is None


def test_gates_compare_the_rolled_out_models_versions_and_rollback_moves_only_it(
    api: httpx.Client, fleet: SimFleet
) -> None:
    """The embedder decodes at 10 tokens/s on every device: the chat model's gate
    must compare chat 1.3.0 with chat 1.0.0 (35/80), not a blend with it (45/90)."""
    labels, devices = _on_both(api, fleet, "gate", 5)
    embed_ids = {d.device_id: d.documents[-1].entries[EMBED].assignment_id for d in devices}
    detail = _rollout(api, {
        "model": CHAT, "version": "1.3.0", "target": {"labels": labels},
        "stages": [{"percent": 40, "bake_s": 1.5}, {"percent": 100, "bake_s": 0.3}],
        "gates": {"min_tokens_per_s_ratio": 0.8, "max_error_rate": 0.05}},
        {"rolled_back", "completed"})
    assert detail["state"] == "rolled_back", detail["timeline"]
    failed = next(d for d in detail["timeline"] if d["kind"] == "gate_failed")
    gates = {g["gate"]: g for g in failed["details"]["gates"]}
    assert gates["min_tokens_per_s_ratio"]["verdict"] == "fail"
    assert gates["min_tokens_per_s_ratio"]["measured"] == pytest.approx(35 / 80, rel=0.05)
    # The embedder's 30 % errors are not the chat model's.
    assert gates["max_error_rate"]["verdict"] == "pass"
    assert gates["max_error_rate"]["measured"] == pytest.approx(0.0)
    canary = [d for d in devices if any(e.manifest.version == "1.3.0" for e in d.received)]
    assert len(canary) == 2
    for device in devices:
        _running(device, {CHAT: "1.0.0", EMBED: "2.0.0"})
        assert device.documents[-1].entries[EMBED].assignment_id == embed_ids[device.device_id]


def test_upgrade_fills_model_names_and_each_devices_document(tmp_path: Path) -> None:
    """Rows written before sets: the migration names each assignment's model and
    moves each device's live envelope to its own document row."""
    from alembic import command

    from controlplane.db import upgrade_to_head
    from controlplane.db.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'cp.db'}"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0006")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO devices (id, labels, simulated, online, first_seen, state_changed_at, "
                "active_model) VALUES ('d-1', '{}', false, false, 1.0, 1.0, "
                "'{\"name\": \"m\", \"version\": \"1.0.0\", \"tier\": \"micro\"}')"))
            conn.execute(text("INSERT INTO models (name, created_at) VALUES ('m', 1.0)"))
            conn.execute(text(
                "INSERT INTO model_versions (id, model_name, version, sort_key, released_at, "
                "registered_at, description, manifest_sha256, envelope) "
                "VALUES (1, 'm', '1.0.0', '00', 1.0, 1.0, '', 'x', '{}')"))
            for seq, status in ((1, "superseded"), (2, "active")):
                conn.execute(text(
                    "INSERT INTO assignments (assignment_id, device_id, version_id, ref, tier, "
                    "sequence, issued_at, expires_at, kind, status, envelope) VALUES "
                    f"('a-1', 'd-1', 1, 'm@1.0.0', 'micro', {seq}, 1.0, {seq}00.0, 'assign', "
                    f"'{status}', '{{\"seq\": {seq}}}')"))
            conn.execute(text("INSERT INTO device_sequences VALUES ('d-1', 2, 2)"))
        upgrade_to_head(engine)
        with engine.connect() as conn:
            assert set(conn.execute(select(AssignmentRecord.model_name)).scalars()) == {"m"}
            document = conn.execute(select(DesiredDocument)).one()
            assert (document.envelope, document.expires_at, document.form) == (
                '{"seq": 2}', 200.0, "single")
            device = conn.execute(text(
                "SELECT assignment_form, models FROM devices")).one()
            assert device.assignment_form == "single" and '"m"' in device.models
            # One live row per device and model name, enforced.
            with pytest.raises(Exception, match="UNIQUE"):
                conn.execute(insert(AssignmentRecord), [{
                    "assignment_id": "a-2", "device_id": "d-1", "version_id": 1,
                    "model_name": "m", "ref": "m@1.0.0", "tier": "micro", "sequence": 3,
                    "issued_at": 1.0, "expires_at": 2.0, "kind": "assign", "status": "active"}])
    finally:
        engine.dispose()
