"""End to end with real parts: Mosquitto (passwords and ACLs on), the control
plane on SQLite, and real agent processes. What a fleet admin sees in the API
is what the devices said, and nothing a device may not say."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import protocol as p
from controlplane.devfleet.fleet import DEMO_DEVICES, DevFleet
from controlplane.service import ControlPlane
from tests.support.agents import AgentProcess, write_agent_config
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import RawClient


@pytest.fixture
def controlplane(tmp_path: Path, broker, cp_credentials) -> Iterator[ControlPlane]:
    cp = ControlPlane(cp_settings(tmp_path / "cp", broker, cp_credentials,
                                  heartbeat_interval_s=0.5, liveness_check_interval_s=0.5))
    cp.start()
    yield cp
    cp.stop()


def _device(api: str, device_id: str) -> dict | None:
    r = httpx.get(f"{api}/v1/devices/{device_id}", headers=ADMIN_HEADERS)
    return r.json() if r.status_code == 200 else None


def _online(api: str, device_id: str) -> bool | None:
    d = _device(api, device_id)
    return None if d is None else d["online"]


def _start_agent(
    tmp_path: Path, broker, new_device, preset: str | None
) -> tuple[str, AgentProcess]:
    device_id = f"e2e-{secrets.token_hex(3)}"
    extra = {"simulate": {"preset": preset}} if preset else {}
    config = write_agent_config(tmp_path / device_id, device_id, broker.url,
                                new_device(device_id), labels={"suite": "e2e"}, **extra)
    return device_id, AgentProcess(config)


@pytest.mark.parametrize(
    ("preset", "tier", "profile"),
    [
        ("raspberry-pi-4-4gb", "micro", "raspberry-pi-4-4gb"),
        ("jetson-orin-nano-8gb", "small", "jetson-orin-nano-8gb"),
        ("x86_64-gpu-workstation", "medium", "x86_64-gpu-workstation"),
    ],
)
def test_agent_hello_reaches_api_with_tier_within_5s(
    tmp_path, broker, new_device, controlplane, preset, tier, profile
) -> None:
    device_id, agent = _start_agent(tmp_path, broker, new_device, preset)
    try:
        # The clock starts once the agent process exists; 5 s covers its
        # interpreter start-up, the probe, connect and the ingest batch.
        found = wait_until(lambda: _device(controlplane.api_url, device_id), 5.0, "device in API")
        assert found["tier"] == tier
        assert found["profile"] == profile
        assert found["online"] is True
        assert found["labels"] == {"suite": "e2e"}
        listed = httpx.get(f"{controlplane.api_url}/v1/devices", headers=ADMIN_HEADERS,
                           params={"tier": tier, "label": "suite=e2e"}).json()["items"]
        assert device_id in {d["id"] for d in listed}
        other = "micro" if tier != "micro" else "medium"
        listed = httpx.get(
            f"{controlplane.api_url}/v1/devices",
            headers=ADMIN_HEADERS,
            params={"tier": other}).json()
        assert device_id not in {d["id"] for d in listed["items"]}
    finally:
        agent.stop()


def test_sigkill_marks_device_offline_via_last_will(tmp_path, broker, new_device,
                                                    controlplane) -> None:
    device_id, agent = _start_agent(tmp_path, broker, new_device, "raspberry-pi-5-8gb")
    wait_until(lambda: _online(controlplane.api_url, device_id), 10, "online")
    agent.kill()
    wait_until(lambda: _online(controlplane.api_url, device_id) is False, 10, "offline")


def test_telemetry_lands_in_device_detail(tmp_path, broker, new_device, controlplane) -> None:
    device_id, agent = _start_agent(tmp_path, broker, new_device, None)
    try:
        def two_heartbeats() -> dict | None:
            d = _device(controlplane.api_url, device_id)
            return d if d and len(d["recent_telemetry"]) >= 2 else None

        detail = wait_until(two_heartbeats, 15, "two heartbeats in the API")
        assert detail["capabilities"]["cpu"]["cores"] >= 1
        newest, older = detail["recent_telemetry"][:2]
        assert newest["seq"] > older["seq"]  # newest first
    finally:
        agent.stop()


def test_device_cannot_speak_for_another(tmp_path, broker, new_device, controlplane) -> None:
    """The broker refuses a device publishing under another id; nothing is ingested."""
    victim, attacker = f"victim-{secrets.token_hex(3)}", f"attacker-{secrets.token_hex(3)}"
    new_device(victim)
    client = RawClient(broker.url, attacker, new_device(attacker))
    assert not client.connect().is_failure
    forged = p.encode(p.State(device_id=victim, state="online", ts=1.0))
    rc = client.publish(p.device_topic(victim, "state"), forged)
    assert rc.is_failure and rc.getName() == "Not authorized"
    # nor may a device write its own desired topic (only the control plane does)
    rc = client.publish(p.device_topic(attacker, "desired"), b"{}")
    assert rc.is_failure and rc.getName() == "Not authorized"
    # its own topic works, and is the only one that lands
    own = p.encode(p.State(device_id=attacker, state="online", ts=2.0))
    assert not client.publish(p.device_topic(attacker, "state"), own).is_failure
    client.close()
    api = controlplane.api_url
    wait_until(lambda: _device(api, attacker), 5, "attacker's own state")
    assert _device(api, victim) is None


def test_bad_payloads_are_counted_and_the_rest_still_lands(tmp_path, broker, new_device,
                                                           controlplane, cp_credentials) -> None:
    device_id = f"noisy-{secrets.token_hex(3)}"
    client = RawClient(broker.url, device_id, new_device(device_id))
    client.connect()
    api = controlplane.api_url
    before = httpx.get(f"{api}/v1/ingest/stats", headers=ADMIN_HEADERS).json()["rejected"]
    topic = p.device_topic(device_id, "telemetry")
    good = p.Telemetry(device_id=device_id, ts=time.time(), seq=1, uptime_s=1, cpu_percent=1,
                       ram_used_bytes=1)
    client.publish(topic, b"{not json")
    client.publish(topic, b"x" * (p.MAX_PAYLOAD_BYTES + 1))
    client.publish(p.device_topic(device_id, "hello"), p.encode(good))  # wrong schema
    data = json.loads(p.encode(good))
    data["extra_field"] = 1
    client.publish(topic, json.dumps(data).encode())
    # a payload naming another device, sent where the ACL allows (the
    # control plane's own user): the ingest re-checks the id itself
    cp = RawClient(broker.url, *cp_credentials)
    cp.connect()
    spoof = p.Telemetry(device_id="someone-else", ts=time.time(), seq=9, uptime_s=1,
                        cpu_percent=1,
                        ram_used_bytes=1)
    cp.publish(topic, p.encode(spoof))
    cp.close()
    client.publish(topic, p.encode(good))
    client.close()

    def delta() -> dict[str, int]:
        now = httpx.get(f"{api}/v1/ingest/stats", headers=ADMIN_HEADERS).json()["rejected"]
        return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}

    expected = {"malformed": 2, "too_large": 1, "wrong_schema": 1, "id_mismatch": 1}
    wait_until(lambda: delta() == expected, 5, f"rejections {expected}")
    detail = wait_until(lambda: (d := _device(api, device_id)) and d["recent_telemetry"] and d, 5,
                        "the good message")
    assert [t["seq"] for t in detail["recent_telemetry"]] == [1]
    assert httpx.get(f"{api}/healthz").json()["status"] == "ok"


def test_slmfleet_dev_enrolls_its_devices_through_the_api(tmp_path: Path) -> None:
    # DevFleet's own broker and control plane, without its agents: the control
    # plane manages the broker's files, so an enrollment through the API works
    # and the new password opens the broker at once.
    fleet = DevFleet(tmp_path / "dev", log=lambda _: None)
    try:
        fleet.start_services()
        assert fleet.broker is not None
        made = httpx.post(f"{fleet.api_url}/v1/devices/dev-pi-1/credentials",
                          headers=fleet.headers)
        assert made.status_code == 201, made.text
        assert made.json()["broker_reloaded"] is True
        device = RawClient(fleet.broker.url, "dev-pi-1", made.json()["password"])
        try:
            assert device.connect() == 0
        finally:
            device.close()
        stranger = RawClient(fleet.broker.url, "dev-pi-1", "not-its-password")
        try:
            assert stranger.connect() != 0
        finally:
            stranger.close()
        assert fleet.enroll("dev-pi-2")
    finally:
        fleet.stop()


def test_slmfleet_dev_agents_each_serve_their_local_api(tmp_path: Path) -> None:
    """`slmfleet dev`'s three agents share this machine's loopback: each gets a
    local API port of its own (the `AGENT` lines), and each answers there."""
    fleet = DevFleet(tmp_path / "dev", log=lambda _: None)
    try:
        fleet.start()  # returns once every agent is online and its API answers
        assert set(fleet.agent_urls) == {d for d, _, _ in DEMO_DEVICES}
        ports = {httpx.URL(url).port for url in fleet.agent_urls.values()}
        assert len(ports) == len(DEMO_DEVICES), fleet.agent_urls
        for device_id, url in fleet.agent_urls.items():
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
            models = httpx.get(f"{url}/models")
            assert models.status_code == 200, (device_id, models.text)
            assert models.json()["object"] == "list"
            log = (tmp_path / "dev" / "agents" / device_id / "agent.log").read_text()
            assert "cannot listen" not in log
    finally:
        fleet.stop()
