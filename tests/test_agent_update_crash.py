"""Crash consistency: SIGKILL the agent at random points of the update pipeline.

Real agent processes, the real SmolLM2 GGUF (download, install, real health
check in a subprocess), real broker. Each device runs two models (a chat
model and an "embedder", both SmolLM2 here). Each trial publishes a desired
set that changes both at once (new releases, or every fifth time a rollback
of both to their previous versions) and kills the agent at a random moment
inside one pipeline phase of one of the two entries, taken in turn: right
after publishing, during verification, the download, the install, the
health check, the activation, or the clean-up after it. The phase starts
are read off the device's own events, so kills cover every phase whatever
the machine's speed. Each trial checks:

- right after the kill, on disk: each name's active version is its old or
  its new one and its bytes match its sha256 -- never neither;
- after a restart, with no further input: the agent finishes both updates
  by itself (every entry here is valid, so each must end activated),
  reports them in ``hello`` and ``events``, and leaves nothing in staging.

30 trials (60 entry updates), on two devices side by side to keep the run short.
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

#: two models per trial: longer than the suite's default per-test limit on a busy machine
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

E = p.EventType
GGUF = "smollm2.gguf"
#: the two models each device runs; the set changes both every trial
NAMES = ("embedder", "smollm2-135m")
DEVICES = 2
TRIALS_PER_DEVICE = 15
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


def _kill_point(rig: DeviceRig, sequence: int, name: str) -> str:
    """Where ``name``'s update stood when the agent died, from its persisted record."""
    record = UpdateStateStore(rig.state_dir / "update" / "state.json").load().models.get(name)
    if record is None or record.sequence != sequence:
        return "before verified"
    return record.state.value


class _Trials:
    """One device's run of kill-and-restart trials."""

    def __init__(self, rig: DeviceRig, server: ArtifactServer, seed: int) -> None:
        self.rig, self.server, self.rng, self.seed = rig, server, random.Random(seed), seed
        self.releases: dict[str, dict] = {}
        # Every release here is the same GGUF: hash it once, not twice per trial.
        self.variant = variant_for(server.directory / GGUF, GGUF, health_check=QUICK_CHECK,
                                   runtime_defaults=ONE_THREAD)
        self.kill_points: Counter[str] = Counter()
        self.phases: Counter[str] = Counter()

    def _assign_next(self, i: int) -> tuple[dict[str, str], dict[str, str], int, bool]:
        """Publish the next set, changing both names.

        Returns (assignment id and new key by name, sequence, rollback).
        """
        rig = self.rig
        previous = {name: rig.stores.store(name).previous() for name in NAMES}
        rollback = i % 5 == 4 and all(v is not None and v.key in self.releases
                                      for v in previous.values())
        new_keys = {}
        for name in NAMES:
            if rollback:
                new_keys[name] = previous[name].key  # a new entry of an installed release
                continue
            version = f"1.0.{i}"
            new_keys[name] = f"{name}@{version}-micro"
            self.releases[new_keys[name]] = rig.release(version, self.variant, name=name)
        sequence = rig.next_sequence()
        aids = {name: f"crash-{rig.device_id}-{name}-{sequence}" for name in NAMES}
        rig.publish(rig.assign_set({name: self.releases[new_keys[name]] for name in NAMES},
                                   sequence=sequence, ids=aids))
        return aids, new_keys, sequence, rollback

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

    def _settled(self, aids: dict[str, str], new_keys: dict[str, str], sequence: int,
                 what: str) -> None:
        rig = self.rig
        for name in NAMES:
            final = rig.wait_final(aids[name], timeout=150)
            assert final.type == E.ACTIVATED, (what, name, final)
            assert rig.active(name)[0] == new_keys[name], (what, name)  # re-hashes it
        hello = rig.wait_hello(
            lambda h: h.update is not None and h.update.sequence == sequence
            and h.update.state.is_final
        )
        assert hello.update.state == p.UpdateState.ACTIVATED, what
        on_disk = {name: rig.stores.store(name).active().manifest["sha256"] for name in NAMES}
        assert {m.name: m.sha256 for m in hello.active_models()} == on_disk, what
        # gc of the oldest version runs right after the activation is recorded.
        rig.wait_clean()

    def run(self) -> Counter[str]:
        rig = self.rig
        rig.start()
        for i in range(TRIALS_PER_DEVICE):
            old_keys = {name: rig.stores.store(name).active().key for name in NAMES}
            aids, new_keys, sequence, rollback = self._assign_next(i)
            choices = NO_DOWNLOAD if rollback else tuple(PHASES)
            phase = choices[(i + self.seed) % len(choices)]
            # Each entry's phases in turn: the first to run, then the one after it.
            target = NAMES[(i // len(choices)) % len(NAMES)]
            self.phases[phase] += 1
            self._wait_phase(phase, aids[target])
            rig.kill()

            killed_at = _kill_point(rig, sequence, target)
            self.kill_points[killed_at] += 1
            what = f"trial {i}, killed in {phase} of {target} at {killed_at}"
            for name in NAMES:
                on_disk = rig.active(name)  # re-hashes it
                assert on_disk is not None, f"{what}: nothing active for {name}"
                assert on_disk[0] in (old_keys[name], new_keys[name]), (
                    f"{what}: {on_disk} is active for {name}")

            rig.start()
            self._settled(aids, new_keys, sequence, what)
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
            for name in NAMES:
                seed_active(rig.state_dir / "models", name, "0.0.1", model_path)
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
