"""One model store per model name, and the move from the single-store layout.

A device runs a set of models, each rolled out on its own, so each model
name has its own :class:`~agent.update.store.ModelStore` (versions,
staging, ``active`` and ``previous`` pointers) under ``root``::

    by-name/<name>/versions/<key>/   as in agent.update.store, per name
    by-name/<name>/staging/
    by-name/<name>/active -> versions/<key>
    by-name/<name>/previous -> versions/<key>

The stores live under ``by-name/`` rather than straight under ``root``
because a model may be called ``versions`` or ``staging``: the names of
the single-store layout this one replaces.

Moving from the single-store layout
-----------------------------------

An agent from before sets kept one store straight under ``root``
(``versions/``, ``staging/``, ``active``, ``previous``). :meth:`ModelStores.migrate`
moves it at start-up, before anything is served; every step is one rename
or one link, and the whole is run again from the start if it is killed
halfway (the old ``versions/`` directory is what says it is unfinished, so
it is removed last):

1. each installed version moves to its name's ``versions/`` (one rename;
   its key ``<name>@<version>-<tier>`` names it);
2. partial downloads move to their name's ``staging/`` (so they resume);
3. the name's ``active`` and ``previous`` pointers are made from the old
   ones, unless the name has them already (a run killed after this step);
   an old ``previous`` of another name stays installed, unpointed;
4. the old pointers, the rest of the old staging and the empty old
   ``versions/`` are removed.

A killed run leaves the old ``active`` link in place until step 4, so the
next run knows which version to point at even though it has moved.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..atomic import ensure_dir, fsync_dir, replace_symlink_atomic
from .store import ModelStore, _check_key

__all__ = ["ModelStores", "name_of_key"]

BY_NAME = "by-name"
_OLD_VERSIONS, _OLD_STAGING = "versions", "staging"
_OLD_POINTERS = ("active", "previous")
_PARTIAL = ".partial"


def name_of_key(key: str) -> str:
    """The model name of a store key ``<name>@<version>-<tier>``."""
    _check_key(key)
    name, at, _ = key.partition("@")
    if not at or not name:
        raise ValueError(f"store key {key!r} names no model")
    return name


def _check_name(name: str) -> str:
    # The name becomes a directory: the store-key rules (no separators, no
    # leading dot) apply, and "@" would make it look like a key.
    _check_key(name)
    if "@" in name:
        raise ValueError(f"invalid model name {name!r}")
    return name


class ModelStores:
    """The per-name model stores under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._by_name = self.root / BY_NAME
        self._stores: dict[str, ModelStore] = {}

    def store(self, name: str) -> ModelStore:
        """The store of model ``name`` (created on first use)."""
        store = self._stores.get(name)
        if store is None:
            ensure_dir(self._by_name)
            store = self._stores[name] = ModelStore(self._by_name / _check_name(name))
        return store

    def names(self) -> list[str]:
        """Every model name with a store on disk, sorted."""
        if not self._by_name.is_dir():
            return []
        return sorted(entry.name for entry in self._by_name.iterdir()
                      if entry.is_dir() and not entry.name.startswith("."))

    def all(self) -> list[tuple[str, ModelStore]]:
        """``(name, store)`` for every name on disk."""
        return [(name, self.store(name)) for name in self.names()]

    def clean_staging(self, keep_partials: Mapping[str, Iterable[str]] = {}) -> list[Path]:
        """Clean every name's staging, keeping the partials ``keep_partials[name]``."""
        removed: list[Path] = []
        for name, store in self.all():
            removed += store.clean_staging(keep_partials.get(name, ()))
        return removed

    def gc(self, keep: int, protect: Mapping[str, Iterable[str]] = {}) -> dict[str, list[str]]:
        """Run each name's gc (``keep`` versions per name; ``protect[name]`` never deleted).

        A name no longer assigned keeps its ``previous`` version for a
        rollback; only older ones go.
        """
        removed = {}
        for name, store in self.all():
            gone = store.gc(keep, protect.get(name, ()))
            if gone:
                removed[name] = gone
        return removed

    # -- the single-store layout ---------------------------------------------------

    def legacy(self) -> bool:
        """Does ``root`` still hold (part of) the single-store layout?"""
        return (self.root / _OLD_VERSIONS).is_dir() or any(
            (self.root / link).is_symlink() for link in _OLD_POINTERS)

    def migrate(self) -> list[str]:
        """Move the single-store layout into per-name stores; returns the keys moved.

        Idempotent: a run killed at any point is finished by the next one.
        Blocking; call at start-up before anything is served.
        """
        if not self.legacy():
            return []
        old_versions = self.root / _OLD_VERSIONS
        moved = []
        if old_versions.is_dir():
            for entry in sorted(old_versions.iterdir()):
                try:
                    name = name_of_key(entry.name)
                except ValueError:
                    continue  # not a version: removed with the directory below
                store = self.store(name)
                target = store.root / "versions" / entry.name
                if target.exists():
                    continue
                os.rename(entry, target)
                fsync_dir(target.parent)
                fsync_dir(old_versions)
                moved.append(entry.name)
        self._move_partials()
        self._move_pointers()
        for link in _OLD_POINTERS:
            (self.root / link).unlink(missing_ok=True)
        fsync_dir(self.root)
        shutil.rmtree(self.root / _OLD_STAGING, ignore_errors=True)
        # Last: while it exists the migration is unfinished.
        shutil.rmtree(old_versions, ignore_errors=True)
        fsync_dir(self.root)
        return moved

    def _move_partials(self) -> None:
        old_staging = self.root / _OLD_STAGING
        if not old_staging.is_dir():
            return
        for entry in old_staging.iterdir():
            if not entry.name.endswith(_PARTIAL) or not entry.is_file():
                continue
            try:
                store = self.store(name_of_key(entry.name[: -len(_PARTIAL)]))
            except ValueError:
                continue
            os.rename(entry, store.root / "staging" / entry.name)
            fsync_dir(store.root / "staging")
        fsync_dir(old_staging)

    def _move_pointers(self) -> None:
        old = {link: _old_target(self.root / link) for link in _OLD_POINTERS}
        active = old["active"]
        if active is None:
            return
        name = name_of_key(active)
        store = self.store(name)
        if store.root.joinpath("active").is_symlink():
            return  # made by a run that was killed before it removed the old links
        previous = old["previous"]
        if previous is not None and previous != active and name_of_key(previous) == name:
            replace_symlink_atomic(store.root / "previous", f"versions/{previous}")
        replace_symlink_atomic(store.root / "active", f"versions/{active}")


def _old_target(link: Path) -> str | None:
    """The key an old-layout pointer names (it may dangle: its version has moved)."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    head, _, key = target.partition("/")
    try:
        name_of_key(key)
    except ValueError:
        return None
    return key if head == _OLD_VERSIONS else None
