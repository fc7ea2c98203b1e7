"""ModelStore: install, activate, rollback, gc, and crashes between any two syscalls;
ModelStores: one store per model name, and the move from the single-store layout."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.errors import StoreError
from agent.update.store import ModelStore, model_key
from agent.update.stores import ModelStores

V1, V2, V3, V4 = (model_key("smollm2-135m", f"1.{i}.0", "micro") for i in range(1, 5))


@pytest.fixture(autouse=True)
def cheap_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync only matters for power loss, which no test here simulates; on
    some VMs each call costs ~0.15 s. The fd is still checked."""
    monkeypatch.setattr(os, "fsync", os.fstat)


def stage(store: ModelStore, key: str, size: int = 64 * 1024) -> dict[str, Any]:
    """Put a verified artifact for ``key`` where a download would; return its manifest."""
    data = hashlib.sha256(key.encode()).digest() * (size // 32)
    store.staging_path(key).write_bytes(data)
    return {"name": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def install(store: ModelStore, key: str) -> Path:
    return store.install(key, store.staging_path(key), stage(store, key))


def test_install_activate_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.active() is None and store.previous() is None

    directory = install(store, V1)
    assert directory == tmp_path / "versions" / V1
    assert not store.staging_path(V1).exists()  # consumed
    assert store.active() is None  # installing does not activate

    store.activate(V1)
    install(store, V2)
    store.activate(V2)
    active = store.active()
    assert active is not None and active.key == V2
    assert active.artifact == tmp_path / "versions" / V2 / "model"
    assert active.manifest["name"] == V2
    assert os.readlink(tmp_path / "active") == f"versions/{V2}"  # relative: root can move
    assert store.previous().key == V1

    back = store.rollback()
    assert back.key == V1 and store.active().key == V1
    assert store.previous() is None  # the failed version is no rollback target
    with pytest.raises(RuntimeError):
        store.rollback()


def test_activating_the_active_version_keeps_previous(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for key in (V1, V2):
        install(store, key)
        store.activate(key)
    store.activate(V2)
    assert (store.active().key, store.previous().key) == (V2, V1)


def test_install_is_idempotent_and_refuses_other_content(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    manifest = stage(store, V1)
    store.install(V1, store.staging_path(V1), manifest)

    again = stage(store, V1)
    assert store.install(V1, store.staging_path(V1), again) == tmp_path / "versions" / V1
    assert not store.staging_path(V1).exists()

    other = stage(store, V1, size=1024)
    with pytest.raises(ValueError, match="different sha256"):
        store.install(V1, store.staging_path(V1), other)


def test_install_checks_the_manifest_and_size(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    manifest = stage(store, V1)
    with pytest.raises(ValueError, match="sha256"):
        store.install(V1, store.staging_path(V1), {**manifest, "sha256": "nope"})
    with pytest.raises(ValueError, match="bytes"):
        store.install(V1, store.staging_path(V1), {**manifest, "size": 1})
    assert store.installed() == []


def test_activate_unknown_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not installed"):
        ModelStore(tmp_path).activate(V1)


def test_gc_keeps_active_previous_and_the_newest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for i, key in enumerate((V1, V2, V3, V4)):
        install(store, key)
        os.utime(tmp_path / "versions" / key, ns=(i * 10**9, i * 10**9))  # install order
    store.activate(V1)
    store.activate(V2)  # active V2, previous V1; V3, V4 installed later

    assert store.gc(keep=3) == [V3]  # oldest unprotected first
    assert store.installed() == [V1, V2, V4]
    assert store.gc(keep=2) == [V4]
    assert store.gc(keep=0) == []  # active and previous always stay
    assert store.installed() == [V1, V2]
    assert store.verify_hash(V2) and store.active().key == V2
    assert list((tmp_path / "staging").iterdir()) == []
    with pytest.raises(ValueError):
        store.gc(keep=-1)


@pytest.mark.parametrize(
    "key", ["", "a/b", "..", "a..b", "../x", ".hidden", "a\\b", "a b", "a\x00b", "x" * 201]
)
def test_bad_keys_are_rejected(tmp_path: Path, key: str) -> None:
    store = ModelStore(tmp_path)
    for call in (
        lambda: store.staging_path(key),
        lambda: store.install(key, tmp_path / "f", {}),
        lambda: store.activate(key),
        lambda: store.verify_hash(key),
    ):
        with pytest.raises(ValueError, match="invalid model key"):
            call()
    with pytest.raises(ValueError):
        model_key("a/b", "1.0.0", "micro")


def test_verify_hash_detects_a_damaged_artifact(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    install(store, V1)
    store.activate(V1)
    artifact = store.active().artifact
    assert store.verify_hash(V1)

    data = bytearray(artifact.read_bytes())
    data[1234] ^= 0x01
    artifact.chmod(0o644)
    artifact.write_bytes(bytes(data))
    assert not store.verify_hash(V1)

    artifact.write_bytes(bytes(data[:-1]))
    assert not store.verify_hash(V1)
    artifact.unlink()
    assert not store.verify_hash(V1)
    assert not store.verify_hash(V2)  # not installed


def test_corrupt_manifest_is_a_store_error_naming_the_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    install(store, V1)
    store.activate(V1)
    manifest = tmp_path / "versions" / V1 / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text('{"sha256": ')

    with pytest.raises(StoreError, match=r"manifest\.json"):
        store.active()
    assert not store.verify_hash(V1)


def test_tampered_pointer_is_a_store_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    os.symlink("/etc", tmp_path / "active")
    with pytest.raises(StoreError):
        store.active()


# -- crashes -----------------------------------------------------------------

#: every os function the store and agent.atomic use to change or sync the disk
CRASH_POINTS = (
    "open", "mkdir", "rename", "replace", "symlink", "unlink", "rmdir",
    "chmod", "fchmod", "fsync", "utime",
)  # fmt: skip


class Crash(BaseException):
    """SIGKILL stand-in: BaseException so no ``except Exception`` swallows it."""


@contextmanager
def crash_after(n: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let ``n`` disk syscalls through, then fail that one and every one after.

    A process killed there makes no further syscalls; failing all later ones
    stands in for that, cleanup handlers included.
    """
    calls = 0

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def syscall(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > n:
                raise Crash
            return real(*args, **kwargs)

        return syscall

    with monkeypatch.context() as m:
        for name in CRASH_POINTS:
            m.setattr(os, name, wrap(getattr(os, name)))
        yield


def upgrade(store: ModelStore) -> None:
    install(store, V2)
    store.activate(V2)
    store.gc(keep=2)


def first_install(store: ModelStore) -> None:
    install(store, V1)
    store.activate(V1)


def rollback(store: ModelStore) -> None:
    store.rollback()
    store.gc(keep=1)


def three_versions(store: ModelStore) -> None:
    first_install(store)
    for key in (V2, V3):
        install(store, key)
        store.activate(key)


SCENARIOS = {
    # name: (setup on a fresh store, the operation that crashes, keys `active` may name after)
    "first install": (lambda s: None, first_install, {None, V1}),
    "upgrade": (first_install, upgrade, {V1, V2}),
    "gc": (three_versions, lambda s: s.gc(keep=2), {V3}),
    "rollback": (three_versions, rollback, {V2, V3}),
    # the name left the desired set: nothing active after, V3 kept as previous
    "deactivate": (three_versions, lambda s: s.deactivate(), {V3, None}),
}


def assert_consistent(root: Path, allowed: set[str | None]) -> None:
    """What a restarted agent must find: a whole active version or none."""
    store = ModelStore(root)
    active = store.active()
    assert (active.key if active else None) in allowed
    if active is not None:
        assert store.verify_hash(active.key)
    previous = store.previous()
    if previous is not None:
        assert store.verify_hash(previous.key)
    for key in store.installed():  # nothing half-built or half-deleted in versions/
        assert store.verify_hash(key), key
    store.clean_staging()
    assert list((root / "staging").iterdir()) == []
    assert {p.name for p in root.iterdir()} <= {"active", "previous", "staging", "versions"}


def at_every_crash_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare: Callable[[Path], Any],
    operation: Callable[[Path], Any], restarted: Callable[[Path], Any],
) -> int:
    """Crash ``operation`` after 0, 1, 2, ... syscalls, each on a fresh ``prepare``d
    root, and check it with ``restarted`` after each; returns how many points it had."""
    n = 0
    while True:
        root = tmp_path / f"crash-{n}"
        prepare(root)
        finished = False
        with crash_after(n, monkeypatch):
            try:
                operation(root)
                finished = True
            except Crash:
                pass
        restarted(root)
        if finished:
            return n
        n += 1


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crash_at_every_syscall_leaves_a_whole_active_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    setup, operation, allowed = SCENARIOS[scenario]
    points = at_every_crash_point(
        tmp_path, monkeypatch, lambda root: setup(ModelStore(root)),
        lambda root: operation(ModelStore(root)), lambda root: assert_consistent(root, allowed))
    assert points >= 5, "the operation should have had several crash points"


def test_upgrade_completes_after_a_crash_at_any_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def restart(root: Path) -> None:
        # Clean up, then redo the upgrade (re-staging if the partial was consumed).
        store = ModelStore(root)
        store.clean_staging()
        if store.version(V2) is None:
            install(store, V2)
        store.activate(V2)
        store.gc(keep=2)
        assert store.active().key == V2 and store.verify_hash(V2)
        assert store.previous().key == V1

    at_every_crash_point(tmp_path, monkeypatch, lambda root: first_install(ModelStore(root)),
                         lambda root: upgrade(ModelStore(root)), restart)


def test_half_built_staging_dir_is_invisible_and_cleaned(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first_install(store)
    # What a kill inside install() leaves: an artifact and no manifest, in staging.
    build = tmp_path / "staging" / f".build-{V2}-abc123"
    build.mkdir()
    (build / "model").write_bytes(b"half")
    (tmp_path / ".active.0123456789ab.tmp").symlink_to(f"versions/{V2}")

    restarted = ModelStore(tmp_path)
    assert restarted.active().key == V1 and restarted.installed() == [V1]
    removed = restarted.clean_staging()

    assert build in removed and not build.exists()
    assert not (tmp_path / ".active.0123456789ab.tmp").is_symlink()


def test_clean_staging_keeps_the_partial_being_resumed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.staging_path(V1).write_bytes(b"resume me")
    store.staging_path(V2).write_bytes(b"abandoned")

    store.clean_staging(keep_partials=[V1])

    assert store.staging_path(V1).read_bytes() == b"resume me"
    assert not store.staging_path(V2).exists()


def test_deactivate_keeps_the_version_for_a_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    three_versions(store)
    assert store.deactivate().key == V3
    assert store.active() is None and store.previous().key == V3
    assert store.deactivate() is None, "nothing active: nothing to do"
    assert store.gc(keep=0) == [V1, V2], "previous stays until it is replaced"
    assert store.rollback().key == V3, "assigned again, it comes back without a download"


def test_gc_never_deletes_what_a_pending_update_needs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    three_versions(store)
    install(store, V4)  # staged, health check pending
    assert store.gc(keep=2, protect=[V4]) == [V1]
    assert set(store.installed()) == {V2, V3, V4}


# --- one store per name --------------------------------------------------------

E1, E2 = model_key("embed", "1.0.0", "micro"), model_key("embed", "2.0.0", "micro")


def test_each_name_has_its_own_versions_and_pointers(tmp_path: Path) -> None:
    stores = ModelStores(tmp_path)
    chat, embed = stores.store("smollm2-135m"), stores.store("embed")
    first_install(chat)
    for key in (E1, E2):
        install(embed, key)
        embed.activate(key)
    assert stores.names() == ["embed", "smollm2-135m"]
    assert (chat.active().key, embed.active().key, embed.previous().key) == (V1, E2, E1)
    assert chat.root == tmp_path / "by-name" / "smollm2-135m"
    install(chat, V2)
    assert stores.gc(1, protect={"smollm2-135m": {V2}}) == {}, "pointers and pending stay"
    with pytest.raises(ValueError):
        stores.store("../x")


def legacy_layout(root: Path) -> None:
    """What an agent from before model sets left: one store, two names in it, a partial."""
    old = ModelStore(root)
    install(old, E1)
    old.activate(E1)
    for key in (V1, V2):
        install(old, key)
        old.activate(key)
    stage(old, V3)  # a download being resumed


def assert_migrated(root: Path) -> None:
    stores = ModelStores(root)
    assert not stores.legacy()
    assert {p.name for p in root.iterdir()} == {"by-name"}
    chat, embed = stores.store("smollm2-135m"), stores.store("embed")
    assert chat.active().key == V2 and chat.verify_hash(V2)
    assert chat.previous().key == V1
    assert embed.active() is None and embed.installed() == [E1], "another name's previous"
    assert chat.staging_path(V3).is_file(), "the partial moved, so it resumes"


def test_the_single_store_layout_moves_to_per_name_stores(tmp_path: Path) -> None:
    legacy_layout(tmp_path)
    assert ModelStores(tmp_path).legacy()
    assert sorted(ModelStores(tmp_path).migrate()) == sorted([E1, V1, V2])
    assert_migrated(tmp_path)
    assert ModelStores(tmp_path).migrate() == [], "done once"


def test_migration_finishes_after_a_crash_at_any_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def next_start(root: Path) -> None:
        ModelStores(root).migrate()
        assert_migrated(root)

    points = at_every_crash_point(tmp_path, monkeypatch, legacy_layout,
                                  lambda root: ModelStores(root).migrate(), next_start)
    assert points >= 8, "the migration should have had several crash points"
