"""An adapter release rolled out canary-first to three real agents serving the real base.

The module's fleet (:mod:`tests.support.fleet_e2e`: a control plane,
the shared broker, three agents of micro, small and medium tier) with
``smollm2-135m@1.1.0`` active; ``support-formal@1.0.0`` (the real LoRA
adapter, one ``gguf-lora`` variant per tier bound to the base's sha256) is
published with ``slmfleet models publish``'s code path and rolled out in
two stages. Afterwards every agent answers ``smollm2-135m+support-formal``
with the adapter's word and ``smollm2-135m`` with the base's answer, while
chat traffic on the base failed no request; each device's own events say it
downloaded the adapter's bytes and not one of the base's. Taken off the
devices again, the adapter stops being served and the base goes on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from controlplane.db.models import DeviceEvent
from controlplane.devfleet.demo_specs import demo_release_spec
from tests.support.adapters import built_adapter, chat_answer
from tests.support.controlplane import wait_until
from tests.support.fleet_e2e import FLEET_LABEL, Fleet, adapter_spec
from tests.support.rollout_agents import LoadDriver
from tests.support.rollout_runs import run_rollout
from tests.support.updates import file_sha256

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
pytest_plugins = ["tests.support.fleet_e2e"]

BASE, ADAPTER = "smollm2-135m", "support-formal"


def _moved(fleet: Fleet, assignment_id: str) -> dict[str, int | None]:
    """Bytes each ``staged`` / ``activated`` event of the assignment says it downloaded."""
    assert fleet.cp.engine is not None
    with fleet.cp.engine.connect() as conn:
        rows = conn.execute(select(DeviceEvent.type, DeviceEvent.downloaded_bytes).where(
            DeviceEvent.assignment_id == assignment_id,
            DeviceEvent.type.in_(("staged", "activated")))).all()
    return {row.type: row.downloaded_bytes for row in rows}


def test_an_adapter_rolls_out_canary_first_and_serves_beside_its_base(
    three_agents: Fleet, model_path: Path,
) -> None:
    fleet, adapter = three_agents, built_adapter(model_path)
    fleet.publish(demo_release_spec(model_path, "1.1.0", name=BASE))
    fleet.publish(adapter_spec(adapter, name=ADAPTER, version="1.0.0", base=BASE,
                               base_sha256=file_sha256(model_path), versions=">=1.1.0,<2.0.0",
                               tiers=["micro", "small", "medium"]))
    fleet.assign(BASE, "1.1.0")
    wait_until(lambda: fleet.serving({BASE: "1.1.0"}), 300, "the base everywhere", poll=1.0)
    wait_until(lambda: all(a.api_url() for a in fleet.agents), 60, "every local API", poll=0.5)

    chats = LoadDriver(lambda: fleet.agents, BASE, max_requests=300, max_seconds=600,
                       max_tokens=8).start()
    try:
        detail = run_rollout(fleet.api, {
            "model": ADAPTER, "version": "1.0.0", "target": {"labels": FLEET_LABEL},
            "stages": [{"percent": 34, "bake_s": 2}, {"percent": 100, "bake_s": 2}],
            "gates": {"min_devices_reporting": 1, "max_failed": 0},
            "on_failure": "rollback", "max_concurrent_downloads": 1,
        }, 600)
        assert detail["state"] == "completed", [(t["kind"], t["reason"])
                                                for t in detail["timeline"]]
        wait_until(lambda: fleet.serving({ADAPTER: "1.0.0"}), 120,
                   "the adapter serving everywhere", poll=1.0)
    finally:
        chats.stop()

    # Canary first: the first stage took part of the fleet, the second the rest.
    by_stage = sorted(m["stage"] for m in detail["devices"])
    assert by_stage[0] == 1 and by_stage[-1] == 2, detail["devices"]
    assert {m["state"] for m in detail["devices"]} == {"succeeded"}, detail["devices"]
    assert chats.errors == [], chats.errors[:5]
    for member in detail["devices"]:
        # The device's own account: the adapter's bytes, not one of the base's.
        moved = _moved(fleet, member["assignment_id"])
        assert moved == {"staged": adapter.size_bytes, "activated": adapter.size_bytes}, moved
    for agent in fleet.agents:
        url = agent.api_url()
        status, adapted = chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)
        assert status == 200 and adapter.expected.lower() in adapted.lower(), adapted
        status, plain = chat_answer(url, BASE, adapter.prompt)
        assert status == 200 and adapter.expected.lower() not in plain.lower(), plain
        models = fleet.models(agent.device_id)
        assert models[BASE]["version"] == "1.1.0"  # the base was left alone
        assert models[ADAPTER]["update"]["downloaded_bytes"] == adapter.size_bytes

    # Rolled back by taking it off: the base keeps serving, the adapter's name is gone.
    fleet.unassign(ADAPTER)
    wait_until(lambda: all(ADAPTER not in fleet.models(d) for d in fleet.device_ids), 120,
               "the adapter off every device", poll=1.0)
    for agent in fleet.agents:
        url = agent.api_url()
        assert chat_answer(url, f"{BASE}+{ADAPTER}", adapter.prompt)[0] == 404
        assert chat_answer(url, BASE, adapter.prompt)[0] == 200
