"""Crash consistency: SIGKILL the agent at random points of the update pipeline.

Real agent processes, the real SmolLM2 GGUF (download, install, real health
check in a subprocess), real broker. Each trial publishes a new assignment
(a new release, or every fifth time a rollback to the previous one) and
kills the agent at a random moment inside one pipeline phase, taken in
turn: right after publishing, during verification, the download, the
install, the health check, the activation, or the clean-up after it. The
phase starts are read off the device's own events, so kills cover every
phase whatever the machine's speed. Each trial checks:

- right after the kill, on disk: the active version is the old or the new
  one and its bytes match its sha256 -- never neither;
- after a restart, with no further input: the agent finishes the update by
  itself (every assignment here is valid, so it must end activated),
  reports it in ``hello`` and ``events``, and leaves nothing in staging.

50 trials, on two devices side by side to keep the run short.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import protocol as p
from agent.update.state import UpdateStateStore
from protocol import GoldenPrompt, HealthCheck, RuntimeDefaults
from tests.support.http_artifacts import ArtifactServer
from tests.support.mqtt import provision_device
from tests.support.signer import TrustSimulator
from tests.support.updates import DeviceRig, link_or_copy, seed_active, variant_for, wait_for

pytestmark = pytest.mark.integration

E = p.EventType
GGUF = "smollm2.gguf"
DEVICES = 2
TRIALS_PER_DEVICE = 25
#: one short golden prompt ("The opposite of hot is cold."), not gated on speed:
#: this test is about crashes, and the machine runs two pipelines at once
QUICK_PROMPT = GoldenPrompt(prompt="What is the opposite of hot?", expected=["cold"],
                            max_tokens=8)
QUICK_CHECK = HealthCheck(golden_prompts=[QUICK_PROMPT], max_ttft_ms=120_000.0)
#: two devices check models at once on two cores: llama.cpp's spinning thread
#: pools slow each other down a hundredfold when they oversubscribe the CPUs
ONE_THREAD = RuntimeDefaults(threads=1, context=2048)

#: phase -> (the event that starts it, or None for the publish itself; the
#: longest random delay after that start, in seconds)
PHASES: dict[str, tuple[p.EventType | None, float]] = {
    "publish": (None, 0.05),
    "verify": (E.RECEIVED, 0.01),
    "download": (E.DOWNLOADING, 0.3),
    "install": (E.DOWNLOADING, 0.05),  # after the 100 % event
    "health check": (E.STAGED, 0.6),
    "activate": (E.HEALTH_PASSED, 0.01),
    "clean-up": (E.ACTIVATED, 0.05),
}
#: a rollback to the installed previous version downloads nothing
NO_DOWNLOAD = ("publish", "verify", "health check", "activate", "clean-up")


def _kill_point(rig: DeviceRig, sequence: int) -> str:
    """Where the pipeline stood when it died, from its persisted record."""
    record = UpdateStateStore(rig.state_dir / "update" / "state.json").load().current
    if record is None or record.sequence != sequence:
        return "before verified"
    return record.state.value


class _Trials:
    """One device's run of kill-and-restart trials."""

    def __init__(self, rig: DeviceRig, server: ArtifactServer, seed: int) -> None:
        self.rig, self.server, self.rng, self.seed = rig, server, random.Random(seed), seed
        self.releases: dict[str, dict] = {}
        self.kill_points: Counter[str] = Counter()
        self.phases: Counter[str] = Counter()

    def _assign_next(self, i: int) -> tuple[str, str, int, bool]:
        """Publish the next assignment; return (assignment id, new key, sequence, rollback)."""
        rig = self.rig
        previous = rig.store.previous()
        rollback = i % 5 == 4 and previous is not None and previous.key in self.releases
        if rollback and previous is not None:
            new_key = previous.key  # a new assignment of an installed release
        else:
            version = f"1.0.{i}"
            new_key = f"smollm2-135m@{version}-micro"
            variant = variant_for(self.server.directory / GGUF, GGUF, health_check=QUICK_CHECK,
                                  runtime_defaults=ONE_THREAD)
            self.releases[new_key] = rig.release(version, variant)
        sequence = rig.next_sequence()
        aid = f"crash-{rig.device_id}-{sequence}"
        rig.publish(rig.assign(self.releases[new_key], sequence=sequence, assignment_id=aid))
        return aid, new_key, sequence, rollback

    def _wait_phase(self, phase: str, aid: str) -> None:
        start, longest = PHASES[phase]
        if start is not None:
            def started() -> bool:
                return any(
                    e.type == start and (phase != "install" or e.progress_pct == 100.0)
                    for e in self.rig.events(aid)
                )

            wait_for(started, 60, f"{phase} of {aid}", poll=0.005)
        time.sleep(self.rng.uniform(0, longest))

    def _settled(self, aid: str, new_key: str, sequence: int, what: str) -> None:
        rig = self.rig
        final = rig.wait_final(aid, timeout=90)
        assert final.type == E.ACTIVATED, (what, final)
        assert rig.active()[0] == new_key, what  # re-hashes it
        hello = rig.wait_hello(
            lambda h: h.update is not None and h.update.sequence == sequence
            and h.update.state.is_final
        )
        assert hello.active_model is not None
        assert hello.active_model.sha256 == rig.store.active().manifest["sha256"]
        # gc of the oldest version runs right after the activation is recorded.
        rig.wait_clean()

    def run(self) -> Counter[str]:
        rig = self.rig
        rig.start()
        for i in range(TRIALS_PER_DEVICE):
            old_key = rig.store.active().key
            aid, new_key, sequence, rollback = self._assign_next(i)
            choices = NO_DOWNLOAD if rollback else tuple(PHASES)
            phase = choices[(i + self.seed) % len(choices)]
            self.phases[phase] += 1
            self._wait_phase(phase, aid)
            rig.kill()

            killed_at = _kill_point(rig, sequence)
            self.kill_points[killed_at] += 1
            on_disk = rig.active()  # re-hashes it
            what = f"trial {i}, killed in {phase} at {killed_at}"
            assert on_disk is not None, f"{what}: nothing active"
            assert on_disk[0] in (old_key, new_key), f"{what}: {on_disk} is active"

            rig.start()
            self._settled(aid, new_key, sequence, what)
        return self.kill_points


def test_sigkill_anywhere_leaves_old_or_new_model_and_the_update_finishes(
    tmp_path: Path, broker, cp_credentials, model_path: Path
) -> None:
    link_or_copy(model_path, tmp_path / "artifacts" / GGUF)
    with ArtifactServer(tmp_path / "artifacts") as server:
        sim = TrustSimulator()
        trials = []
        for seed in range(DEVICES):
            device_id = f"crash-{secrets.token_hex(3)}"
            rig = DeviceRig(tmp_path / device_id, broker, cp_credentials, device_id,
                            provision_device(broker, device_id), server, sim)
            seed_active(rig.state_dir / "models", "smollm2-135m", "0.0.1", model_path)
            trials.append(_Trials(rig, server, seed))
        try:
            with ThreadPoolExecutor(DEVICES) as pool:
                kill_points = sum(pool.map(_Trials.run, trials), Counter())
        finally:
            for t in trials:
                t.rig.close()
        for t in trials:
            seqs = [e.seq for e in t.rig.events()]
            assert seqs == sorted(seqs), "event seq is monotonic across restarts"
    phases = sum((t.phases for t in trials), Counter())
    print(f"\n{DEVICES * TRIALS_PER_DEVICE} kills by phase {dict(phases)}, "
          f"by persisted state {dict(kill_points)}")
    assert sum(kill_points.values()) == DEVICES * TRIALS_PER_DEVICE
    # Kills landed before, inside and after the pipeline's long steps.
    assert kill_points["downloading"] and kill_points["staged"] and kill_points["activated"]
