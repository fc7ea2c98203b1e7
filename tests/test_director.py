"""The director against a real Mosquitto (ACLs on) and a real control plane: signed
assignments land retained on each device's `desired`, verify with the pinned keys,
are re-signed before they expire, survive a broker outage, and show in history."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import controlplane.director as director_module
import protocol as p
from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.db import make_engine, upgrade_to_head
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.director import next_sequence
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings, event, hello, wait_until
from tests.support.mqtt import RawClient, provision_device
from tests.support.postgres import PostgresCluster, server_bin
from tests.support.registry import TrustFiles, publish
from tests.support.signer import TrustSimulator

TTL_S = 3600.0

pytest_plugins = ["tests.support.trust_fixtures"]  # sim, trust


@pytest.fixture(scope="module")
def cp(
    tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, cp_credentials: Any,
    trust: TrustFiles, sim: TrustSimulator, database_backend: str,
) -> Iterator[ControlPlane]:
    settings = cp_settings(
        tmp_path_factory.mktemp("cp"), broker, cp_credentials,
        assignment_ttl_s=TTL_S, **trust.settings(),
    )  # fmt: skip
    plane = ControlPlane(settings).start()
    with httpx.Client(headers=ADMIN_HEADERS, base_url=plane.api_url) as client:
        publish(client, sim, "smollm2", "1.0.0", (p.Tier.MICRO, p.Tier.SMALL))
        publish(client, sim, "smollm2", "1.1.0", (p.Tier.MICRO,))
    yield plane
    plane.stop()


@pytest.fixture
def api(cp: ControlPlane) -> Iterator[httpx.Client]:
    with httpx.Client(headers=ADMIN_HEADERS, base_url=cp.api_url, timeout=10) as client:
        yield client


class Device:
    """A device as the broker sees it: its own credentials, its own topics only."""

    def __init__(self, broker: MosquittoBroker, device_id: str, password: str) -> None:
        self.id = device_id
        self.broker = broker
        self.password = password
        self.client = RawClient(broker.url, device_id, password)
        assert not self.client.connect().is_failure

    def say(self, message: Any, kind: p.TopicKind) -> None:
        rc = self.client.publish(p.device_topic(self.id, kind), p.encode(message), retain=False)
        assert not rc.is_failure

    def listen(self) -> RawClient:
        """A fresh session subscribed to this device's `desired`, as an agent would."""
        client = RawClient(self.broker.url, self.id, self.password)
        assert not client.connect().is_failure
        client.subscribe(p.device_topic(self.id, p.TopicKind.DESIRED))
        return client

    def close(self) -> None:
        self.client.close()


def _join(broker: MosquittoBroker, api: httpx.Client, tier: str = "micro", **hello_kw: Any
          ) -> Device:
    device_id = f"dir-{secrets.token_hex(4)}"
    device = Device(broker, device_id, provision_device(broker, device_id))
    device.say(hello(device_id, tier=tier, **hello_kw), p.TopicKind.HELLO)
    wait_until(lambda: api.get(f"/v1/devices/{device_id}").status_code == 200, what="hello")
    return device


def _verify(sim: TrustSimulator, payload: bytes, device_id: str, highest: int = 0
            ) -> p.VerifiedAssignment:
    return p.verify_assignment(
        payload,
        device_id=device_id,
        release_keys=sim.release_keys,
        director_keys=sim.director_keys,
        now=time.time(),
        highest_sequence=highest,
    )


def _assign(api: httpx.Client, device_id: str, version: str = "1.0.0") -> dict[str, Any]:
    r = api.post(f"/v1/devices/{device_id}/assignment",
                 json={"model": "smollm2", "version": version})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def _published(api: httpx.Client, device_id: str) -> dict[str, Any] | None:
    assignment = api.get(f"/v1/devices/{device_id}").json()["assignment"]
    return assignment if assignment and assignment["published"] else None


def test_assignment_lands_retained_and_verifies_with_pinned_keys(
    cp: ControlPlane, api: httpx.Client, broker: MosquittoBroker, sim: TrustSimulator
) -> None:
    device = _join(broker, api)
    result = _assign(api, device.id)
    assert result["status"] == "assigned" and result["tier"] == "micro"
    assert result["assignment_id"].startswith("a-")
    wait_until(lambda: _published(api, device.id), what="PUBACK recorded")

    # Subscribing afterwards, with the device's own credentials: the retained copy.
    listener = device.listen()
    try:
        (msg,) = listener.wait_messages(1)
        assert msg.retain
        verified = _verify(sim, msg.payload, device.id)
    finally:
        listener.close()
        device.close()
    a = verified.assignment
    assert (a.assignment_id, a.sequence, a.tier) == (result["assignment_id"], 1, p.Tier.MICRO)
    assert verified.manifest.ref == "smollm2@1.0.0"
    assert a.artifact_url_base == f"{cp.api_url}/v1/artifacts"
    assert a.expires_at - a.issued_at == pytest.approx(TTL_S)
    # The URL the agent will build serves the very bytes the manifest names.
    r = httpx.get(f"{a.artifact_url_base}/{verified.variant.artifact}")
    assert r.status_code == 200 and len(r.content) == verified.variant.size_bytes


def test_another_device_cannot_read_someone_elses_desired(
    api: httpx.Client, broker: MosquittoBroker
) -> None:
    victim, snoop = _join(broker, api), _join(broker, api)
    _assign(api, victim.id)
    wait_until(lambda: _published(api, victim.id), what="published")
    client = RawClient(broker.url, snoop.id, snoop.password)
    client.connect()
    try:
        client.subscribe(p.device_topic(victim.id, p.TopicKind.DESIRED))
        assert client.wait_messages(1, timeout=0.5) == []
    finally:
        client.close()
        victim.close()
        snoop.close()


def test_resign_keeps_the_assignment_and_raises_the_sequence(
    cp: ControlPlane, api: httpx.Client, broker: MosquittoBroker, sim: TrustSimulator
) -> None:
    device = _join(broker, api)
    first = _assign(api, device.id)
    listener = device.listen()
    try:
        listener.wait_messages(1)
        assert cp.director is not None
        # Everything live is "due" with a margin longer than the TTL.
        assert cp.director.resign_due(TTL_S + 1) >= 1
        msgs = listener.wait_messages(2)
        second = _verify(sim, msgs[-1].payload, device.id, highest=first["sequence"])
    finally:
        listener.close()
        device.close()
    assert second.assignment.assignment_id == first["assignment_id"]
    assert second.assignment.sequence > first["sequence"]
    assert second.assignment.tier is p.Tier.MICRO
    assert second.manifest.ref == "smollm2@1.0.0"
    assert second.assignment.expires_at > first["expires_at"]
    live = api.get(f"/v1/devices/{device.id}").json()["assignment"]
    assert live["sequence"] == second.assignment.sequence


def _run_at_once(worker: Callable[[str], None], args: list[str]) -> None:
    """Call ``worker`` with each of ``args``, all on threads of their own; wait for all."""
    threads = [threading.Thread(target=worker, args=(arg,)) for arg in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_sequences_strictly_increase_under_concurrent_assigns(
    cp: ControlPlane, api: httpx.Client, broker: MosquittoBroker
) -> None:
    device = _join(broker, api)
    director = cp.director
    assert director is not None
    got: list[int] = []
    lock = threading.Lock()

    def worker(version: str) -> None:
        for _ in range(5):
            (r,) = director.assign([device.id], "smollm2", version)
            with lock:
                got.append(r.sequence or 0)

    _run_at_once(worker, ["1.0.0", "1.1.0"] * 4)
    device.close()
    assert sorted(got) == list(range(1, 41))
    live = api.get(f"/v1/devices/{device.id}").json()["assignment"]
    assert live["sequence"] == 40  # the last issued is the live one
    wait_until(lambda: (_published(api, device.id) or {}).get("sequence") == 40, what="final")


def test_a_number_taken_while_a_batch_was_signed_is_signed_again(
    cp: ControlPlane, api: httpx.Client, broker: MosquittoBroker, sim: TrustSimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch is signed before its transaction with the numbers the counters say
    come next. Another writer taking a number in between (here: right after the
    guess is read) must not leave a stored envelope signed with a number other
    than the one its device got, nor reuse one."""
    steady, raced = _join(broker, api), _join(broker, api)
    director, engine = cp.director, cp.engine
    assert director is not None and engine is not None
    real_peek = director_module.peek_next_sequences

    def peek_then_race(conn: Any, device_ids: Any) -> dict[str, int]:
        guess = real_peek(conn, device_ids)
        with engine.begin() as other:
            next_sequence(other, raced.id)  # a concurrent writer's allocation
        return guess

    monkeypatch.setattr(director_module, "peek_next_sequences", peek_then_race)
    results = {r.device_id: r for r in director.assign([steady.id, raced.id], "smollm2", "1.0.0")}
    monkeypatch.undo()
    assert results[steady.id].sequence == 1
    assert results[raced.id].sequence == 2  # 1 went to the other writer
    for device in (steady, raced):
        wait_until(lambda d=device: _published(api, d.id), what="PUBACK recorded")
        listener = device.listen()
        try:
            (msg,) = listener.wait_messages(1)
            verified = _verify(sim, msg.payload, device.id)
        finally:
            listener.close()
            device.close()
        assert verified.assignment.sequence == results[device.id].sequence


def test_selector_picks_each_devices_tier_or_the_highest_below(
    api: httpx.Client, broker: MosquittoBroker
) -> None:
    micro = _join(broker, api, "micro", labels={"site": "sel"})
    small = _join(broker, api, "small", labels={"site": "sel"})
    medium = _join(broker, api, "medium", labels={"site": "sel"})
    body = {"model": "smollm2", "version": "1.0.0", "selector": {"labels": {"site": "sel"}}}
    r = api.post("/v1/devices/*/assignment", json=body)
    assert r.status_code == 200, r.text
    by_id = {x["device_id"]: x for x in r.json()["results"]}
    assert by_id[micro.id]["tier"] == "micro"
    assert by_id[small.id]["tier"] == "small"
    assert by_id[medium.id]["tier"] == "small"  # no medium variant: the highest below

    # 1.1.0 has only a micro variant: a small device still takes it (below its tier).
    body = {"model": "smollm2", "version": "1.1.0",
            "selector": {"tiers": ["small"], "device_ids": [small.id, "no-such-device"]}}
    r = api.post("/v1/devices/*/assignment", json=body).json()
    assert {(x["device_id"], x["status"]) for x in r["results"]} == {
        (small.id, "assigned"), ("no-such-device", "unknown_device")
    }
    assert r["unknown"] == 1
    for d in (micro, small, medium):
        d.close()


def test_single_device_errors(api: httpx.Client, broker: MosquittoBroker) -> None:
    assert api.post("/v1/devices/ghost/assignment",
                    json={"model": "smollm2", "version": "1.0.0"}).status_code == 404
    device = _join(broker, api)
    r = api.post(f"/v1/devices/{device.id}/assignment",
                 json={"model": "smollm2", "version": "9.9.9"})
    assert r.status_code == 404
    r = api.post("/v1/devices/*/assignment", json={"model": "smollm2", "version": "1.0.0"})
    assert r.status_code == 422
    device.close()


def test_device_too_small_for_every_variant_is_incompatible(
    api: httpx.Client, broker: MosquittoBroker
) -> None:
    # 64 MiB of RAM cannot hold even the micro variant's estimate.
    device = _join(broker, api, "micro", ram_bytes=64 << 20)
    r = api.post(f"/v1/devices/{device.id}/assignment",
                 json={"model": "smollm2", "version": "1.0.0"})
    assert r.status_code == 409
    assert r.json()["detail"]["status"] == "incompatible"
    assert "RAM" in r.json()["detail"]["reason"]
    device.close()


def test_unassign_clears_the_retained_desired(
    api: httpx.Client, broker: MosquittoBroker
) -> None:
    device = _join(broker, api)
    _assign(api, device.id)
    listener = device.listen()
    try:
        listener.wait_messages(1)
        assert api.delete(f"/v1/devices/{device.id}/assignment").status_code == 200
        msgs = listener.wait_messages(2)
        assert msgs[-1].payload == b""  # an empty retained message clears `desired`
    finally:
        listener.close()
    late = device.listen()
    try:
        assert late.wait_messages(1, timeout=0.5) == []
    finally:
        late.close()
        device.close()
    assert api.get(f"/v1/devices/{device.id}").json()["assignment"] is None
    assert api.delete(f"/v1/devices/{device.id}/assignment").status_code == 404


def test_history_merges_assignments_and_events_in_time_order(
    cp: ControlPlane, api: httpx.Client, broker: MosquittoBroker
) -> None:
    update = p.UpdateStatus(assignment_id="a-x", sequence=1, state=p.UpdateState.ACTIVATED,
                            ts=time.time())
    device = _join(broker, api)
    first = _assign(api, device.id)
    steps = ["received", "verified", "fit_checked", "downloading", "staged", "health_passed",
             "activated"]
    for seq, step in enumerate(steps, start=1):
        device.say(event(device.id, seq, step, assignment_id=first["assignment_id"]),
                   p.TopicKind.EVENTS)
        time.sleep(0.002)
    device.say(hello(device.id, update=update), p.TopicKind.HELLO)
    assert cp.director is not None
    wait_until(lambda: len(api.get(f"/v1/devices/{device.id}/history").json()["items"]) == 8,
               what="events ingested")
    cp.director.resign_due(TTL_S + 1)
    assert api.delete(f"/v1/devices/{device.id}/assignment").status_code == 200

    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.get(f"/v1/devices/{device.id}/history", params=params).json()
        items += page["items"]
        cursor = page["next"]
        if not cursor:
            break
    device.close()
    assert [i["type"] for i in items] == ["assigned", *steps, "refreshed", "unassigned"]
    assert [i["ts"] for i in items] == sorted(i["ts"] for i in items)
    assert {i["assignment_id"] for i in items} == {first["assignment_id"]}
    detail = api.get(f"/v1/devices/{device.id}").json()
    assert detail["update"]["state"] == "activated"
    assert api.get("/v1/devices/ghost/history").status_code == 404


def test_history_shows_each_event_code_the_old_form_included(
    api: httpx.Client, broker: MosquittoBroker
) -> None:
    device = _join(broker, api)
    assignment_id = _assign(api, device.id)["assignment_id"]
    device.say(event(device.id, 1, "rejected", assignment_id=assignment_id,
                     code=p.EventCode.HASH_MISMATCH, reason="hash_mismatch: sha256 differs"),
               p.TopicKind.EVENTS)
    # an agent from before events carried a code: the code is the reason's head
    old_form = {"schema": "slmfleet.event/1", "device_id": device.id, "ts": time.time(),
                "seq": 2, "type": "rejected", "assignment_id": assignment_id,
                "reason": "no_variant: the release has no variant for tier micro"}
    assert not device.client.publish(p.device_topic(device.id, p.TopicKind.EVENTS),
                                     json.dumps(old_form).encode()).is_failure

    def events() -> list[dict[str, Any]]:
        items = api.get(f"/v1/devices/{device.id}/history").json()["items"]
        return [i for i in items if i["kind"] == "event"]

    wait_until(lambda: len(events()) == 2, what="both events ingested")
    device.close()
    assert [(e["seq"], e["code"]) for e in events()] == [(1, "hash_mismatch"), (2, "no_variant")]


def test_resign_job_runs_on_the_scheduler(
    tmp_path: Path, broker: MosquittoBroker, cp_credentials: Any, trust: TrustFiles,
    sim: TrustSimulator,
) -> None:
    settings = cp_settings(
        tmp_path, broker, cp_credentials, assignment_ttl_s=60, resign_margin_s=59.8,
        resign_interval_s=0.1, **trust.settings(),
    )  # fmt: skip
    plane = ControlPlane(settings).start()
    try:
        with httpx.Client(headers=ADMIN_HEADERS, base_url=plane.api_url) as client:
            publish(client, sim)
            device = _join(broker, client)
            first = _assign(client, device.id)
            # Due 0.2 s after issue; the job (every 0.1 s) re-signs it, again and again.
            live = wait_until(
                lambda: (a := client.get(f"/v1/devices/{device.id}").json()["assignment"])
                and a["sequence"] >= first["sequence"] + 2 and a,
                what="two re-signs",
            )
            device.close()
        assert live["assignment_id"] == first["assignment_id"]
    finally:
        plane.stop()


def test_assignment_made_while_the_broker_is_down_is_delivered_when_it_returns(
    tmp_path: Path, trust: TrustFiles, sim: TrustSimulator
) -> None:
    """Also: the broker comes back with an empty retained store (no persistence), so
    an assignment published *before* the outage is published again."""
    before, during = "outage-before", "outage-during"
    users = {CONTROL_PLANE_USER: secrets.token_urlsafe(12)}
    users |= {d: secrets.token_urlsafe(12) for d in (before, during)}
    private = MosquittoBroker(tmp_path / "broker", users=dict(users)).start()
    plane = ControlPlane(
        cp_settings(tmp_path / "cp", private, (CONTROL_PLANE_USER, users[CONTROL_PLANE_USER]),
                    **trust.settings())
    ).start()
    try:
        with httpx.Client(headers=ADMIN_HEADERS, base_url=plane.api_url) as client:
            publish(client, sim)
            for device_id in (before, during):
                device = Device(private, device_id, users[device_id])
                device.say(hello(device_id), p.TopicKind.HELLO)
                wait_until(lambda d=device_id: client.get(f"/v1/devices/{d}").status_code == 200)
                device.close()
            early = _assign(client, before)
            wait_until(lambda: _published(client, before), what="published before the outage")

            private.stop()
            wait_until(lambda: not plane.publisher or not plane.publisher.connected,
                       what="publisher notices the outage")
            late = _assign(client, during)  # accepted and stored while down
            time.sleep(0.5)
            live = client.get(f"/v1/devices/{during}").json()["assignment"]
            assert live["published"] is False

            private.start()  # same port, empty retained store (persistence off)
            wait_until(lambda: _published(client, during), timeout=30, what="redelivery")
            received = {}
            for device_id in (before, during):
                listener = Device(private, device_id, users[device_id]).listen()
                try:
                    (msg,) = listener.wait_messages(1)
                finally:
                    listener.close()
                received[device_id] = _verify(sim, msg.payload, device_id).assignment
        assert received[during].assignment_id == late["assignment_id"]
        assert received[before].assignment_id == early["assignment_id"]
        assert received[before].sequence == early["sequence"]  # the same envelope again
    finally:
        plane.stop()
        private.stop()


# --- the counter itself, on both databases -------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    if server_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_counter_hands_out_each_number_once_under_contention(
    request: pytest.FixtureRequest, tmp_path: Path, dialect: str
) -> None:
    """Twelve threads, each its own transaction per number, two devices: every number
    1..N exactly once per device, which is what keeps re-signs, rollbacks and
    reassignments from ever reusing a sequence an agent already saw."""
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'seq.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"seq_{secrets.token_hex(3)}")
    engine = make_engine(url, **({"pool_size": 12} if dialect == "postgresql" else {}))
    upgrade_to_head(engine)
    got: dict[str, list[int]] = {"dev-a": [], "dev-b": []}
    lock = threading.Lock()

    def worker(device_id: str) -> None:
        for _ in range(25):
            with engine.begin() as conn:
                number = next_sequence(conn, device_id)
            with lock:
                got[device_id].append(number)

    _run_at_once(worker, ["dev-a", "dev-b"] * 6)
    engine.dispose()
    assert sorted(got["dev-a"]) == list(range(1, 151))
    assert sorted(got["dev-b"]) == list(range(1, 151))
