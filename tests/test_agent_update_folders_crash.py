"""kill -9 during a folder variant's install: old or new serves, never a half folder.

A real agent process serves the GGUF SmolLM2; each trial assigns a new
release of the real ONNX SmolLM2 folder (six files, 90 MB) and SIGKILLs
the agent at one point of its install:

- between files: the earlier files are in the partial folder, the next one
  is being refused by the server (503) and retried;
- mid-file: ``model.onnx.data`` arrives slowly and part of it is on disk;
- at the end of the download (its 100 % event: the folder is being checked
  and moved into the store);
- after staging (``staged``: the health check runs);
- mid-switch (a few milliseconds after the health check passed).

Right after each kill, on disk: the active version is the old or the new
one and verifies whole (every listed file, its hash, nothing else), and
every installed version does too: none is a half folder. After a restart
with the server healthy again, the agent finishes the update by itself (a
cut file resumes with ``Range``), serves the new folder and leaves nothing
in staging.
"""

from __future__ import annotations

import random
import secrets
import time
from pathlib import Path

import httpx
import pytest

import protocol as p
from tests.support.http_artifacts import ArtifactServer
from tests.support.inference import ready_url, serving_rig
from tests.support.updates import (
    DeviceRig,
    built_onnx_folder,
    folder_variant_for,
    link_or_copy,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

E = p.EventType
MODEL = "smollm2-135m"
FOLDER = "smollm2-onnx"
DATA = f"{FOLDER}/model.onnx.data"
POINTS = ("between files", "mid-file", "end of download", "after staging", "mid-switch")


@pytest.fixture()
def onnx_folder() -> Path:
    return built_onnx_folder()


def _partial(rig: DeviceRig, key: str) -> Path:
    return rig.store.staging_path(key)


def _kill_at(rig: DeviceRig, server: ArtifactServer, point: str, aid: str, key: str,
             rng: random.Random) -> None:
    """Wait for ``point`` of ``aid``'s install, then SIGKILL the agent."""
    def seen(kind: p.EventType, pct: float | None = None) -> bool:
        return any(e.type == kind and (pct is None or e.progress_pct == pct)
                   for e in rig.events(aid))

    if point == "between files":
        wait_for(lambda: any(r.status == 503 for r in server.requests(DATA)), 60,
                 "the refused file", poll=0.005)
        data = _partial(rig, key) / "model.onnx.data"
        assert not data.exists() or data.stat().st_size == 0
        assert (_partial(rig, key) / "model.onnx").is_file()
    elif point == "mid-file":
        data = _partial(rig, key) / "model.onnx.data"
        wait_for(lambda: data.is_file() and data.stat().st_size > 1 << 20, 60,
                 "part of model.onnx.data on disk", poll=0.005)
    elif point == "end of download":
        wait_for(lambda: seen(E.DOWNLOADING, 100.0), 60, "the download's end", poll=0.002)
    elif point == "after staging":
        wait_for(lambda: seen(E.STAGED), 60, "staged", poll=0.005)
    else:
        wait_for(lambda: seen(E.HEALTH_PASSED), 120, "the health check", poll=0.002)
        time.sleep(rng.uniform(0, 0.01))
    rig.kill()


def _whole_on_disk(rig: DeviceRig, old: str, new: str, what: str) -> str:
    """The active key, after checking it and every installed version verify whole."""
    store = rig.store
    active = rig.active(MODEL)  # re-hashes the active version (every file of a folder)
    assert active is not None and active[0] in (old, new), f"{what}: {active}"
    for key in store.installed():
        assert store.verify_hash(key), f"{what}: installed {key} is not whole"
    return active[0]


def test_sigkill_during_a_folder_install_leaves_old_or_new_and_finishes(
    tmp_path: Path, broker, cp_credentials, model_path: Path, onnx_folder: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    for f in onnx_folder.iterdir():
        link_or_copy(f, artifacts / FOLDER / f.name)
    rng = random.Random(17)
    device_id = f"fcrash-{secrets.token_hex(3)}"
    landed: dict[str, str] = {}
    olds: dict[str, str] = {}
    with (
        ArtifactServer(artifacts) as server,
        serving_rig(tmp_path / "device", broker, cp_credentials, device_id, server, model_path,
                    MODEL, download_attempts=20) as rig,
    ):
        variant = folder_variant_for(artifacts / FOLDER, FOLDER)
        for i, point in enumerate(POINTS):
            old = olds[point] = rig.store.active().key
            version = f"2.0.{i}"
            new = f"{MODEL}@{version}-micro"
            if point == "between files":
                server.set_fault(DATA, status=503)
            elif point == "mid-file":
                server.set_fault(DATA, trickle_bps=4_000_000, times=1)
            payload = rig.assign(rig.release(version, variant))
            aid = f"a-{rig.device_id}-{rig._sequence}"
            rig.publish(payload)
            _kill_at(rig, server, point, aid, new, rng)
            what = f"killed {point}"
            landed[point] = _whole_on_disk(rig, old, new, what)

            server.clear_faults()
            resumed_from = len(server.requests(DATA))
            rig.start()
            final = rig.wait_final(aid, timeout=300)
            assert final.type == E.ACTIVATED, (what, final)
            assert _whole_on_disk(rig, old, new, what) == new
            rig.wait_clean()
            if point == "mid-file":
                ranges = [r.range for r in server.requests(DATA)[resumed_from:]]
                assert ranges and ranges[0] and ranges[0].startswith("bytes="), (
                    f"{what}: the cut file resumes with Range, not from zero: {ranges}")
        url = ready_url(rig)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the chemical symbol for water?"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == f"{MODEL}@2.0.{len(POINTS) - 1}"
    print(f"\nactive right after each kill: {landed}")
    for point in POINTS[:-1]:
        assert landed[point] == olds[point], f"nothing switches before the health check: {point}"
    assert olds["between files"] == f"{MODEL}@1.0.0-micro", "the first trial starts on the GGUF"
