"""`slmfleet dev`'s demo with a chat model and an embedder, on its own broker and
control plane, with honest simulated devices in place of its agents: two that
run sets of models (hello/2) and one that reads one model (hello/1).

The simulated devices send telemetry at the dev fleet's heartbeat interval,
as its agents do: the control plane marks a device silent for three
heartbeats offline, and a rollout never assigns an offline device, so a
device that only spoke when it got an update would drop out of the demo
whenever one rollout step took longer than that on a busy machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

import protocol as p
from controlplane.devfleet.demo_specs import (
    BAD_VERSION,
    CHAT_MODEL,
    DEMO_DEVICES,
    EMBED_MODEL,
    EMBED_VERSION,
    GOOD_VERSION,
    NEXT_VERSION,
)
from controlplane.devfleet.fleet import DevFleet
from controlplane.keyfiles import read_key_list
from tests.support.rollout_fleet import Behaviour, SimDevice, SimFleet, wait_for

#: the demo's devices, as simulated here: (tier, reads sets)
SIMULATED = {"pi4-kitchen": ("micro", True), "npu-laptop": ("small", True),
             "ws-render": ("medium", False)}


@dataclass(frozen=True)
class _PinnedKeys:
    """What a simulated device pins: the dev fleet's key lists."""

    release_keys: p.KeyList
    director_keys: p.KeyList


def test_dev_demo_rolls_the_chat_model_out_while_the_embedder_keeps_its_entry(
    tmp_path: Path,
) -> None:
    assert set(SIMULATED) == {d for d, _, _ in DEMO_DEVICES}
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(4092))  # the sims never load it
    fleet = DevFleet(tmp_path / "dev", log=lambda _: None)
    devices: list[SimDevice] = []
    sims: SimFleet | None = None
    try:
        fleet.start_services()
        assert fleet.broker is not None and fleet.keys is not None
        pinned = _PinnedKeys(read_key_list(fleet.keys.release_keys_file, "release"),
                             read_key_list(fleet.keys.director_keys_file, "director"))
        # Heartbeats at the agents' interval keep every device online between its updates.
        sims = SimFleet(fleet.broker, pinned, heartbeat_s=fleet.heartbeat_s)  # type: ignore[arg-type]
        behaviours = {BAD_VERSION: Behaviour(healthy=False)}
        for device_id, _preset, labels in DEMO_DEVICES:
            tier, sets = SIMULATED[device_id]
            devices.append(SimDevice(
                fleet.broker, device_id, tier, pinned, behaviours,  # type: ignore[arg-type]
                labels=labels, sets=sets, password=fleet.enroll(device_id)).connect())
            sims.devices[device_id] = devices[-1]
        fleet.wait_for_devices([d.device_id for d in devices])

        done = fleet.demo(model=model, timeout=120)
        assert [(d["version"], d["state"]) for d in done] == [
            (GOOD_VERSION, "completed"), (NEXT_VERSION, "completed"),
            (BAD_VERSION, "rolled_back")]
        sets, (old,) = devices[:2], devices[2:]
        for device in sets:
            wait_for(lambda d=device: d.models == {CHAT_MODEL: NEXT_VERSION,
                                                   EMBED_MODEL: EMBED_VERSION}, 10,
                     f"{device.device_id} back on {NEXT_VERSION} beside the embedder")
            # One embedder assignment, carried unchanged through both chat rollouts.
            embeds = {doc.entries[EMBED_MODEL].assignment_id for doc in device.documents
                      if EMBED_MODEL in doc.entries}
            assert len(embeds) == 1
            assert [e.manifest.ref for e in device.received].count(
                f"{EMBED_MODEL}@{EMBED_VERSION}") == 1
        # The old-form agent kept serving the chat model; the embedder waits for its upgrade.
        assert old.active == (CHAT_MODEL, NEXT_VERSION)
        assert not any(e.manifest.name == EMBED_MODEL for e in old.received)
        listed = {d["id"]: d for d in httpx.get(f"{fleet.api_url}/v1/devices",
                                               headers=fleet.headers).json()["items"]}
        assert listed["ws-render"]["assignment_form"] == "single"
        assert set(listed["npu-laptop"]["models"]) == {CHAT_MODEL, EMBED_MODEL}
    finally:
        if sims is not None:
            sims.close()
        for device in devices:
            device.disconnect()  # does nothing for a device already gone
        fleet.stop()
