"""The updater with a desired *set*: entries independent of each other, units that
stand or fall together, names that leave the set, and the fit check over the
whole set before anything downloads.

In-process like tests/test_agent_updater.py (real trust files, HTTP artifact
server, per-name stores, event spool, persisted file); the health check is
the gated stand-in, so the test decides which model passes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import protocol as p
from agent.disk import disk_free_bytes
from agent.update.staging import ram_budget
from agent.update.state import UpdateStateStore
from tests.support.http_artifacts import ArtifactServer
from tests.support.updates import sign_set, variant_for
from tests.test_agent_updater import Device, E, run


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    root = tmp_path / "artifacts"
    root.mkdir()
    for name in ("a.bin", "b.bin"):
        (root / name).write_bytes(secrets.token_bytes(32 * 1024))
    with ArtifactServer(root) as server:
        yield Device(tmp_path, server)


def offer_set(device: Device, models: dict[str, tuple[str, str]], *,
              ids: dict[str, str] | None = None, units: dict[str, str] | None = None,
              **variant: Any) -> bytes:
    """A set document: name -> (artifact, version); each entry ``a-<name>-<sequence>``."""
    device.sequence += 1
    releases = {
        name: device.sim.release(name, version, variants={
            p.Tier.MICRO: variant_for(device.server.directory / artifact, artifact, **variant)})
        for name, (artifact, version) in models.items()
    }
    ids = {name: f"a-{name}-{device.sequence}" for name in models} | (ids or {})
    device.sim.now = time.time()
    return sign_set(device.sim, "dev-1", releases, sequence=device.sequence,
                    artifact_url_base=device.server.base_url, ids=ids, units=units)


async def _check(device: Device, passed: bool) -> str:
    """Let the next health check end as told; returns the name of the model it checked."""
    nth = device.checked = getattr(device, "checked", 0) + 1
    # Checks run one after another: once the nth has begun, it is the one running.
    await device.until(lambda: len(device.health.calls) >= nth and device.health.running.is_set(),
                       f"health check {nth}")
    device.health.finish(passed)
    return device.health.calls[nth - 1].parent.name.partition("@")[0]


def test_entries_are_independent_and_a_name_that_leaves_is_removed(device: Device) -> None:
    async def go() -> None:
        removed: list[str] = []
        updater = await device.boot()
        updater._on_removed = removed.append
        await updater.offer(offer_set(device, {"m": ("a.bin", "1.0.0"),
                                               "e": ("b.bin", "1.0.0")}))
        # One at a time, by name: e's check fails, m's passes regardless.
        assert await _check(device, False) == "e"
        assert await _check(device, True) == "m"
        await device.until(lambda: device.final("a-m-1") and device.final("a-e-1"), "both ends")

        assert device.types("a-m-1") == [E.RECEIVED, E.VERIFIED, E.FIT_CHECKED, E.DOWNLOADING,
                                          E.STAGED, E.HEALTH_PASSED, E.ACTIVATED]
        assert device.final("a-e-1").code == p.EventCode.HEALTH_FAILED
        assert updater.stores.store("m").active().key == "m@1.0.0-micro"
        assert updater.stores.store("e").active() is None
        assert [m.name for m in updater.active_models()] == ["m"]
        document = updater.status()
        assert (document.state, document.assignment_id) == (p.UpdateState.FAILED, "desired-1")
        assert document.reason.startswith("e: health_failed")
        assert {(u.model, u.state) for u in updater.updates()} == {
            ("m", p.UpdateState.ACTIVATED), ("e", p.UpdateState.FAILED)}

        # m leaves the set: it stops being served, its files stay for a rollback.
        await updater.offer(offer_set(device, {"e": ("b.bin", "1.0.0")}))
        assert await _check(device, True) == "e"
        await device.until(lambda: device.final("a-e-2") and device.final("a-m-1") and
                           device.types("a-m-1")[-1] == E.REMOVED, "e active, m removed")
        assert device.final("a-e-2").type == E.ACTIVATED
        assert removed == ["m"]
        store = updater.stores.store("m")
        assert store.active() is None and store.previous().key == "m@1.0.0-micro"
        assert [m.name for m in updater.active_models()] == ["e"]
        assert updater.status().state == p.UpdateState.ACTIVATED
        persisted = UpdateStateStore(device.config.update_state_path).load()
        assert persisted.models["m"].state == p.UpdateState.REMOVED
        assert persisted.models["m"].assignment_id == "a-m-1", "the removal names its entry"

    run(go)


def test_a_unit_activates_together_or_not_at_all(device: Device) -> None:
    async def go() -> None:
        updater = await device.boot()
        unit = {"base": "u", "adapter": "u"}
        await updater.offer(offer_set(device, {"base": ("a.bin", "1.0.0"),
                                               "adapter": ("b.bin", "1.0.0")}, units=unit))
        assert await _check(device, True) == "adapter"
        assert updater.stores.store("adapter").active() is None, "it waits for its unit"
        assert await _check(device, False) == "base"
        await device.until(lambda: device.final("a-adapter-1"), "the adapter to end")
        adapter = device.final("a-adapter-1")
        assert adapter.type == E.FAILED and adapter.reason.startswith("unit 'u': base failed")
        assert adapter.code == p.EventCode.HEALTH_FAILED
        assert updater.active_models() == []

        await updater.offer(offer_set(device, {"base": ("a.bin", "1.0.0"),
                                               "adapter": ("b.bin", "1.0.0")}, units=unit))
        assert await _check(device, True) == "adapter"
        assert updater.stores.store("adapter").active() is None
        assert await _check(device, True) == "base"
        await device.until(lambda: device.final("a-adapter-2") and device.final("a-base-2"),
                           "the unit to activate")
        assert [m.name for m in updater.active_models()] == ["adapter", "base"]

    run(go)


@pytest.mark.parametrize("resource", ["ram", "disk"])
def test_a_set_that_does_not_fit_is_refused_whole_though_each_model_would(
    device: Device, resource: str
) -> None:
    async def go() -> None:
        updater = await device.boot()
        # Each model alone fits with room to spare; the two together do not.
        if resource == "ram":
            ram, reserved = ram_budget(updater._device.capabilities, updater._profile)
            need = {"min_ram_bytes": int((ram - reserved) * 0.6)}
            code, figures = p.EventCode.INSUFFICIENT_RAM, ("MiB of RAM", "MiB usable")
        else:
            free = disk_free_bytes(device.config.state_dir)
            need = {"min_disk_bytes": int(free * 0.6)}
            code, figures = p.EventCode.INSUFFICIENT_DISK, ("MiB of disk", "MiB free")
        both = {"m": ("a.bin", "1.0.0"), "e": ("b.bin", "1.0.0")}
        await updater.offer(offer_set(device, both, **need))
        for aid in ("a-m-1", "a-e-1"):
            event = device.final(aid)
            assert event is not None and event.type == E.REJECTED, aid
            assert event.code == code
            assert event.reason.startswith(f"{code.value}: the set of 2 models needs ")
            assert all(figure in event.reason for figure in figures), event.reason
            if resource == "ram":
                assert "m " in event.reason and "e " in event.reason, "each model's figure"
        assert device.server.requests("a.bin") == [] and device.server.requests("b.bin") == []
        assert updater.status().state == p.UpdateState.REJECTED
        persisted = UpdateStateStore(device.config.update_state_path).load()
        assert persisted.models == {} and persisted.highest_sequence == 0, "no entry changes"

        for name, artifact in (("m", "a.bin"), ("e", "b.bin")):
            await updater.offer(offer_set(device, {name: (artifact, "1.0.0")}, **need))
            assert await _check(device, True) == name
            aid = f"a-{name}-{device.sequence}"
            await device.until(lambda aid=aid: device.final(aid), f"{name} alone")
            assert device.final(aid).type == E.ACTIVATED, "alone, it fits"

    run(go)
