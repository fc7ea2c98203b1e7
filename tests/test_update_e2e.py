"""A signed release end to end, as an admin would do it: `slmfleet models publish` the real
SmolLM2 GGUF as smollm2@1.0.0, assign it to a real agent through the API, and
watch the device verify, download, health-check and activate it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from controlplane.devfleet.fleet import DevKeys, ensure_dev_keys
from controlplane.service import ControlPlane
from tests.support.agents import AgentProcess, write_agent_config
from tests.support.auth import ADMIN_HEADERS
from tests.support.controlplane import cp_settings, wait_until

#: what the device reports, in order, for an update that goes through
PIPELINE = ["received", "verified", "fit_checked", "downloading", "staged", "health_passed",
            "activated"]


@pytest.fixture
def keys(tmp_path: Path) -> DevKeys:
    return ensure_dev_keys(tmp_path / "keys")


@pytest.fixture
def controlplane(tmp_path: Path, broker, cp_credentials, keys: DevKeys) -> Iterator[ControlPlane]:
    cp = ControlPlane(cp_settings(
        tmp_path / "cp", broker, cp_credentials,
        release_keys_file=keys.release_keys_file,
        director_keys_file=keys.director_keys_file,
        director_key_files=[keys.director_key],
    ))
    cp.start()
    yield cp
    cp.stop()


def _spec(tmp_path: Path, model_path: Path) -> Path:
    spec = yaml.safe_load((Path(__file__).parents[1] / "examples/smollm2.release.yaml").read_text())
    spec["variants"]["micro"]["file"] = str(model_path)
    # The example's speed limits suit a device serving alone; this machine runs
    # the whole suite beside it. The golden answers are still checked.
    spec["variants"]["micro"]["health_check"].update(max_ttft_ms=30_000, min_tokens_per_s=0.5)
    path = tmp_path / "smollm2.release.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _device(api: str, device_id: str) -> dict:
    response = httpx.get(f"{api}/v1/devices/{device_id}", headers=ADMIN_HEADERS)
    return response.json() if response.status_code == 200 else {}


def test_publish_assign_and_serve_smollm2(
    tmp_path: Path, broker, new_device, controlplane: ControlPlane, keys: DevKeys, model_path
) -> None:
    api = controlplane.api_url
    published = subprocess.run(
        [sys.executable, "-m", "slmfleet", "models", "publish",
         "--spec", str(_spec(tmp_path, model_path)), "--key", str(keys.release_key),
         "--server", api],
        capture_output=True, text=True, timeout=120,
    )
    assert published.returncode == 0, published.stdout + published.stderr
    version = httpx.get(f"{api}/v1/models/smollm2/versions/1.0.0", headers=ADMIN_HEADERS).json()
    assert version["version"] == "1.0.0"

    device_id = "e2e-update-pi"
    config = write_agent_config(
        tmp_path / device_id, device_id, broker.url, new_device(device_id),
        simulate={"preset": "raspberry-pi-4-4gb"},
        release_keys_file=str(keys.release_keys_file),
        director_keys_file=str(keys.director_keys_file),
    )
    agent = AgentProcess(config)
    try:
        wait_until(lambda: _device(api, device_id), 15, "device in the API")
        assigned = httpx.post(f"{api}/v1/devices/{device_id}/assignment", headers=ADMIN_HEADERS,
                              json={"model": "smollm2", "version": "1.0.0"})
        assert assigned.status_code == 200, assigned.text
        result = assigned.json()["results"][0]
        assert result["status"] == "assigned" and result["tier"] == "micro"

        def serving() -> dict:
            detail = _device(api, device_id)
            active = detail.get("active_model") or {}
            update = detail.get("update") or {}
            return detail if active.get("version") == "1.0.0" and update.get(
                "state") == "activated" else {}

        try:
            detail = wait_until(serving, 120, "smollm2@1.0.0 active on the device")
        except AssertionError:
            history = httpx.get(
                f"{api}/v1/devices/{device_id}/history",
                headers=ADMIN_HEADERS
            ).json()["items"]
            raise AssertionError(
                f"{[(h['type'], h.get('reason')) for h in history]}\n{agent.log()[-3000:]}"
            ) from None
        assert detail["active_model"]["name"] == "smollm2"
        assert detail["update"]["assignment_id"] == result["assignment_id"]
        micro = version["variants"]["micro"] if isinstance(version["variants"], dict) else next(
            v for v in version["variants"] if v["tier"] == "micro")
        assert detail["active_model"]["sha256"] == micro["sha256"]

        history = httpx.get(
            f"{api}/v1/devices/{device_id}/history",
            headers=ADMIN_HEADERS
        ).json()["items"]
        mine = [h for h in history if h.get("assignment_id") == result["assignment_id"]]
        assert mine[0]["kind"] == "assignment"
        steps = [h["type"] for h in mine if h["kind"] == "event"]
        # every step, in order (downloading may repeat with progress)
        deduped = [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]
        assert deduped == PIPELINE, steps
    finally:
        agent.stop()
