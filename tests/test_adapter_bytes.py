"""What an update cost the link, and an adapter that is installed but not served,
from the device's messages to the control plane's views.

The wire: ``staged`` / ``activated`` events, each model's update in ``hello``
and each heartbeat carry the bytes an update fetched (optional: an older
agent's messages, without them, still decode). The control plane keeps the
events' bytes and shows them in the device's history and in ``slmfleet
devices show``; a hello naming an active adapter ``inactive`` makes its
model view ``inactive`` with the reason, and the next hello without it makes
it ``serving`` again.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

import protocol as p
from controlplane.api.device_models import device_models
from controlplane.cli.devices import device_detail
from controlplane.db.history import LiveAssignment
from controlplane.db.models import Device
from controlplane.db.writes import hello_models
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import SHA, cp_settings, event, hello, telemetry, wait_until
from tests.support.mqtt import RawClient

pytestmark = pytest.mark.integration

BASE, ADAPTER = "smollm2-135m", "support-formal"
ADAPTER_BYTES = 2_310_336


def test_messages_carry_the_bytes_and_older_ones_decode_without() -> None:
    ev = event("dev-1", 7, "activated", assignment_id="a-1", downloaded_bytes=ADAPTER_BYTES)
    decoded = p.decode(p.TopicKind.EVENTS, p.encode(ev))
    assert isinstance(decoded, p.Event) and decoded.downloaded_bytes == ADAPTER_BYTES
    older = p.decode(p.TopicKind.EVENTS, p.encode(event("dev-1", 8, "activated")))
    assert isinstance(older, p.Event) and older.downloaded_bytes is None
    assert b"downloaded_bytes" not in p.encode(event("dev-1", 8, "staged"))

    beat = telemetry("dev-1", 1, schema=p.TELEMETRY_SCHEMA_SETS, active_model=None,
                     models=[f"{ADAPTER}@1.0.0"],
                     downloaded_bytes={f"{ADAPTER}@1.0.0": ADAPTER_BYTES})
    back = p.decode(p.TopicKind.TELEMETRY, p.encode(beat))
    assert isinstance(back, p.Telemetry)
    assert back.downloaded_bytes == {f"{ADAPTER}@1.0.0": ADAPTER_BYTES}

    with pytest.raises(p.MalformedPayload):
        p.decode(p.TopicKind.EVENTS, p.encode(ev).replace(
            str(ADAPTER_BYTES).encode(), b"-1"))


@pytest.fixture
def cp(tmp_path: Path, broker, cp_credentials) -> Iterator[ControlPlane]:
    plane = ControlPlane(cp_settings(tmp_path / "cp", broker, cp_credentials)).start()
    assert plane.ingest is not None and plane.ingest.wait_ready(0)
    yield plane
    plane.stop()


@pytest.fixture
def device(broker, new_device) -> Iterator[tuple[str, RawClient]]:
    device_id = f"bytes-{secrets.token_hex(3)}"
    client = RawClient(broker.url, device_id, new_device(device_id))
    assert not client.connect().is_failure
    yield device_id, client
    client.close()


def _send(client: RawClient, device_id: str, kind: p.TopicKind, message: p.Wire) -> None:
    rc = client.publish(p.device_topic(device_id, kind), p.encode(message))
    assert not rc.is_failure, rc


WHY = (f"base_mismatch: {ADAPTER}@1.0.0 was made for another build of {BASE}; "
       f"{BASE}@1.2.0 serves without it until a matching adapter arrives")


def _hello(device_id: str, inactive: str | None) -> p.Hello:
    """A set-form hello: the base and its adapter active, the adapter's update with its bytes."""
    models = [p.ActiveModel(name=BASE, version="1.2.0", tier=p.Tier.MICRO, sha256=SHA),
              p.ActiveModel(name=ADAPTER, version="1.0.0", tier=p.Tier.MICRO, sha256="cd" * 32,
                            inactive=inactive)]
    update = p.UpdateStatus(model=ADAPTER, assignment_id="a-1", sequence=2,
                            ref=f"{ADAPTER}@1.0.0", state=p.UpdateState.ACTIVATED,
                            ts=time.time(), downloaded_bytes=ADAPTER_BYTES)
    old_form = hello(device_id)
    return old_form.model_copy(update={"schema_": p.HELLO_SCHEMA_SETS, "active_model": None,
                                       "models": models, "updates": [update]})


def test_the_control_plane_keeps_and_shows_what_each_update_downloaded(
    cp: ControlPlane, device: tuple[str, RawClient],
) -> None:
    did, client = device
    api = httpx.Client(base_url=cp.api_url, headers=ADMIN_HEADERS, timeout=30)
    try:
        _send(client, did, p.TopicKind.HELLO, _hello(did, None))
        for seq, kind, moved in ((1, "downloading", None), (2, "staged", ADAPTER_BYTES),
                                 (3, "activated", ADAPTER_BYTES)):
            _send(client, did, p.TopicKind.EVENTS,
                  event(did, seq, kind, assignment_id="a-1", downloaded_bytes=moved))

        def history() -> list[dict[str, Any]]:
            r = api.get(f"/v1/devices/{did}/history", params={"limit": 50})
            items = r.json()["items"] if r.status_code == 200 else []
            return items if sum(i["kind"] == "event" for i in items) == 3 else []

        events = {i["type"]: i for i in wait_until(history, 10, "three events stored")
                  if i["kind"] == "event"}
        assert events["downloading"]["downloaded_bytes"] is None
        assert events["staged"]["downloaded_bytes"] == ADAPTER_BYTES
        assert events["activated"]["downloaded_bytes"] == ADAPTER_BYTES

        detail = wait_until(lambda: (d := api.get(f"/v1/devices/{did}").json()).get("models")
                            and d, 10, "the hello's models")
        assert detail["models"][ADAPTER]["update"]["downloaded_bytes"] == ADAPTER_BYTES
        console = Console(width=240, record=True)
        console.print(device_detail(detail))
        shown = console.export_text()
        assert "downloaded 2.2 MiB" in shown, shown
    finally:
        api.close()


def _live(name: str, ref: str) -> LiveAssignment:
    return LiveAssignment(model_name=name, assignment_id=f"{name}-a", ref=ref, tier="micro",
                          sequence=2, issued_at=0.0, expires_at=time.time() + 3600,
                          rollout_id=None, published=True)


def test_an_adapter_the_device_does_not_serve_is_shown_inactive_with_its_reason() -> None:
    live = {BASE: _live(BASE, f"{BASE}@1.2.0"), ADAPTER: _live(ADAPTER, f"{ADAPTER}@1.0.0")}
    stored = hello_models(_hello("dev-1", WHY))
    device = Device(id="dev-1", assignment_form="set", models=stored["b_models"],
                    model_updates=stored["b_model_updates"])
    views = device_models(device, live)
    assert views[ADAPTER].state == "inactive" and views[ADAPTER].reason == WHY
    assert views[BASE].state == "serving" and views[BASE].reason is None
    console = Console(width=240, record=True)
    console.print(device_detail({"id": "dev-1", "models": {
        name: view.model_dump(mode="json") for name, view in views.items()}}))
    shown = console.export_text()
    assert f"1.0.0 (inactive), assigned {ADAPTER}@1.0.0" in shown, shown
    assert f"downloaded 2.2 MiB: base_mismatch: {ADAPTER}@1.0.0" in shown, shown

    # A matching adapter arrived (or the base is back on its build): served again.
    stored = hello_models(_hello("dev-1", None))
    device.models = stored["b_models"]
    views = device_models(device, live)
    assert views[ADAPTER].state == "serving" and views[ADAPTER].reason is None
    assert "inactive" not in stored["b_models"][ADAPTER]  # nothing said while it serves
