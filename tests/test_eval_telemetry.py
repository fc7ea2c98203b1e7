"""A device's latest evaluation score per model version rides in its heartbeat and the
control plane keeps it: the agent's telemetry entry (scores from its cache) over the
real broker, through the control plane's ingest, read back from the device API."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

import protocol as p
from agent.healthcheck.eval_cache import EvalCache, with_scores
from controlplane.service import ControlPlane
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings, wait_until
from tests.support.mqtt import RawClient

pytestmark = pytest.mark.integration

SHA, SET_SHA = "a" * 64, "e" * 64


def test_heartbeats_carry_each_versions_latest_score_and_the_control_plane_keeps_it(
    tmp_path: Path, broker, cp_credentials, new_device,
) -> None:
    cache = EvalCache(tmp_path / "eval-scores.json")
    cache.put(SHA, SET_SHA, {"score": 0.86, "passed": 43, "run": 50, "total": 50,
                             "by_category": {"facts": {"passed": 20, "run": 20},
                                             "json": {"passed": 2, "run": 4}},
                             "items": [{"id": "fact-01", "passed": True}]})
    active = [p.ActiveModel(name="smollm2", version="1.0.0", tier=p.Tier.MICRO, sha256=SHA)]
    inference = with_scores([p.InferenceStats(model="smollm2", version="1.0.0", requests=4),
                             p.InferenceStats(model="smollm2", version="0.9.0", requests=1)],
                            cache, active)
    device_id = f"evaltele-{secrets.token_hex(3)}"
    cp = ControlPlane(cp_settings(tmp_path / "cp", broker, cp_credentials)).start()
    client = RawClient(broker.url, device_id, new_device(device_id))
    try:
        assert not client.connect().is_failure
        beat = p.Telemetry(device_id=device_id, ts=time.time(), seq=1, uptime_s=5.0,
                           cpu_percent=10.0, ram_used_bytes=1 << 30,
                           active_model="smollm2@1.0.0", inference=inference)
        rc = client.publish(p.device_topic(device_id, p.TopicKind.TELEMETRY), p.encode(beat))
        assert not rc.is_failure, rc

        def stored() -> list[dict] | None:
            r = httpx.get(f"{cp.api_url}/v1/devices/{device_id}", headers=ADMIN_HEADERS)
            return r.json()["recent_telemetry"] if r.status_code == 200 else None

        telemetry = wait_until(stored, 15, "the heartbeat stored", 0.2)
    finally:
        client.close()
        cp.stop()
    scored, unscored = telemetry[0]["inference"]
    assert scored["version"] == "1.0.0" and scored["eval_score"] == 0.86
    assert scored["eval_by_category"] == {"facts": {"passed": 20, "run": 20},
                                          "json": {"passed": 2, "run": 4}}
    # a version the device never scored carries no score
    assert unscored["version"] == "0.9.0" and "eval_score" not in unscored
