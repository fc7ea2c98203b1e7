"""What the console tests feed a control plane: tokens of every role, a device that
reports hostile text, a rollout that stays put."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import httpx

import protocol as p
from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import event, hello, wait_until
from tests.support.mqtt import RawClient, provision_device

#: what a hostile device reports, in every field a person reads
SCRIPT = "<script>window.__xss = 1</script>"
IMG = '"><img src=x onerror="window.__xss = 2">'


@dataclass
class Tokens:
    """One token per role, issued through the API."""

    viewer: str
    operator: str
    admin: str


def issue_tokens(api: httpx.Client, tag: str) -> Tokens:
    """A viewer, an operator and an admin token named after ``tag``."""
    made = {}
    for role in ("viewer", "operator", "admin"):
        answer = api.post("/v1/tokens", json={"name": f"{tag}-{role}", "role": role})
        assert answer.status_code == 201, answer.text
        made[role] = answer.json()["token"]
    return Tokens(**made)


def report_hostile_device(broker: MosquittoBroker, cp: ControlPlane, device_id: str) -> None:
    """A device whose labels, profile, CPU model and event reason carry markup, over MQTT."""
    client = RawClient(broker.url, device_id, provision_device(broker, device_id))
    try:
        client.connect()
        message = hello(device_id, labels={SCRIPT: IMG, "site": SCRIPT}, profile=IMG)
        caps = message.capabilities
        cpu = caps.cpu.model_copy(update={"model": IMG})
        message = message.model_copy(update={"capabilities": caps.model_copy(update={"cpu": cpu})})
        for kind, msg in ((p.TopicKind.HELLO, message),
                          (p.TopicKind.EVENTS, event(device_id, 1, "rejected", reason=SCRIPT))):
            assert not client.publish(p.device_topic(device_id, kind), p.encode(msg)).is_failure
    finally:
        client.close()
    with httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS) as api:
        wait_until(lambda: api.get(f"/v1/devices/{device_id}/history").json().get("items"),
                   10, f"{device_id}'s hello and event")


def rollout_spec(version: str, labels: dict[str, str]) -> dict[str, object]:
    """A one-stage rollout that waits for an operator's approval (it stays put for a test)."""
    return {"model": "smollm2", "version": version, "target": {"labels": labels},
            "stages": [{"percent": 100, "bake_s": 3600, "approval": True}]}


def new_tag() -> str:
    """A short unique name for this test's devices and tokens."""
    return "ui" + secrets.token_hex(3)
