"""A control plane SIGKILLed in the middle of a rollout, and started again.

The control plane is ``slmfleet controlplane serve`` in a process of its own
(real SQLite file, real Mosquitto with ACLs on, its default 5 s engine tick
and leader lease), driving honest simulated devices that verify every
signed assignment. It is killed with SIGKILL halfway through the second
stage's bake -- no shutdown code runs, the leader lease is left to run out
-- and started again on the same database. The rollout must pick up at the
stage it was in, advance each stage exactly once, and reach every device
exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from sqlalchemy import func, select

from controlplane.db import make_engine
from controlplane.db.models import AssignmentRecord
from controlplane.devfleet.mosquitto import MosquittoBroker
from tests.support.auth import ADMIN_HEADERS, ADMIN_TOKEN
from tests.support.registry import write_trust
from tests.support.rollout_fleet import (
    Behaviour,
    SimFleet,
    start_three_stage_rollout,
    wait_for,
)
from tests.support.serve import ServeProcess
from tests.support.signer import TrustSimulator

MODEL = "smollm2"
BEHAVIOURS = {"1.0.0": Behaviour(tokens_per_s=80.0), "1.1.0": Behaviour(tokens_per_s=81.0)}


@pytest.fixture
def config(tmp_path: Path, broker: MosquittoBroker, cp_credentials: tuple[str, str],
           trust_sim: TrustSimulator) -> Path:
    trust = write_trust(tmp_path / "keys", trust_sim)
    username, password = cp_credentials
    path = tmp_path / "controlplane.toml"
    path.write_text(tomli_w.dumps({
        "data_dir": str(tmp_path / "cp"), "mqtt_url": broker.url,
        "mqtt_username": username, "mqtt_password": password, "api_port": 0,
        "ingest_flush_ms": 10, "bootstrap_token": ADMIN_TOKEN,
        **{k: (str(v) if isinstance(v, Path) else [str(x) for x in v])
           for k, v in trust.settings().items()},
    }))
    return path


@pytest.fixture
def trust_sim() -> TrustSimulator:
    return TrustSimulator()


@pytest.fixture
def fleet(broker: MosquittoBroker, trust_sim: TrustSimulator) -> Iterator[SimFleet]:
    f = SimFleet(broker, trust_sim)
    yield f
    f.close()


def _assignments(db: Path, rollout_id: str) -> dict[str, int]:
    """New assignments (not re-signs) the rollout issued, per device, read from the file."""
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(AssignmentRecord.device_id, func.count())
                .where(AssignmentRecord.rollout_id == rollout_id,
                       AssignmentRecord.kind == "assign")
                .group_by(AssignmentRecord.device_id)
            ).all()
        return {d: n for d, n in rows}
    finally:
        engine.dispose()


def test_sigkill_mid_rollout_resumes_at_its_stage_without_double_advancing(
    tmp_path: Path, config: Path, fleet: SimFleet, trust_sim: TrustSimulator
) -> None:
    first = ServeProcess(config)
    second: ServeProcess | None = None
    try:
        api = httpx.Client(base_url=first.api_url, headers=ADMIN_HEADERS, timeout=10)
        # Stage 2 bakes long enough (several 5 s ticks) to be killed in the middle.
        devices, rollout_id = start_three_stage_rollout(api, fleet, trust_sim, MODEL,
                                                        BEHAVIOURS, "kill", middle_bake_s=20)

        def stage_two_updated() -> dict[str, Any] | None:
            detail = api.get(f"/v1/rollouts/{rollout_id}").json()
            done = detail["stage"] == 2 and detail["counts"].get("succeeded") == 4
            return detail if done else None

        before = wait_for(stage_two_updated, 40, "stage 2 assigned and installed")
        assert isinstance(before, dict)
        first.kill()
        api.close()
        db = tmp_path / "cp" / "controlplane.db"
        assigned_before = _assignments(db, rollout_id)
        assert len(assigned_before) == 4 and set(assigned_before.values()) == {1}
        stage_two_at = next(d["ts"] for d in before["timeline"] if d["kind"] == "stage_started")
        # Killed mid-bake: stage 3 must not have begun, before or after the kill.
        assert time.time() - stage_two_at < 20
        assert fleet.received("1.1.0") == set(assigned_before)

        second = ServeProcess(config)
        api = httpx.Client(base_url=second.api_url, headers=ADMIN_HEADERS, timeout=10)
        detail = api.get(f"/v1/rollouts/{rollout_id}").json()
        assert (detail["state"], detail["stage"]) == ("active", 2)

        def completed() -> dict[str, Any] | None:
            got = api.get(f"/v1/rollouts/{rollout_id}").json()
            return got if got["state"] == "completed" else None

        # The killed leader's lease (15 s) runs out first, then 5 s ticks.
        after = wait_for(completed, 60, "the rollout to complete after the restart", poll=0.2)
        assert isinstance(after, dict)
        api.close()
        assert after["counts"] == {"succeeded": 8}  # no device lost
        assert {m["device_id"] for m in after["devices"]} == {d.device_id for d in devices}
        assigned = _assignments(db, rollout_id)
        assert set(assigned) == {d.device_id for d in devices}
        assert set(assigned.values()) == {1}  # nobody assigned twice
        kinds = [d["kind"] for d in after["timeline"]]
        assert kinds.count("stage_started") == 2 and kinds.count("completed") == 1
        starts = [d for d in after["timeline"] if d["kind"] == "stage_started"]
        # Stage 3 started only after stage 2 had baked its full 20 s, kill or no kill.
        assert starts[1]["ts"] - stage_two_at >= 20
        for device in devices:
            assert device.active == (MODEL, "1.1.0"), device.device_id
            assert [v.manifest.version for v in device.received] == ["1.1.0"]
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
