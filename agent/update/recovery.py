"""Start-up checks that make a crash harmless: is the active model whole?

The store's own steps keep ``active`` pointing at a complete version across
any kill -9 (:mod:`agent.update.store`), but a power cut on a disk that lies about
fsync, or a failing disk, can still damage the bytes. So after an unclean
stop the agent re-hashes the active version before serving it, and goes back
to the previous version if it does not match. A clean stop leaves a marker
file so an ordinary restart skips the re-hash (minutes for a multi-GB model
on an SD card).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..atomic import fsync_dir, write_bytes_atomic
from ..errors import StoreError
from .store import ModelStore

log = logging.getLogger(__name__)

CLEAN_MARKER = "clean-shutdown"


def consume_clean_marker(state_dir: Path) -> bool:
    """True if the last run stopped cleanly; removes the marker (durably) either way."""
    marker = state_dir / CLEAN_MARKER
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    # Gone for good before anything else happens: a crash from here on is unclean.
    fsync_dir(state_dir)
    return True


def write_clean_marker(state_dir: Path) -> None:
    """Record a clean stop (call last, after the update pipeline has stopped)."""
    write_bytes_atomic(state_dir / CLEAN_MARKER, b"")


@dataclass(frozen=True, slots=True)
class ActiveCheck:
    """Outcome of :func:`check_active`."""

    #: the active version's key after the check (None: nothing usable is active)
    active_key: str | None
    #: the version rolled back from, when the active one was damaged
    rolled_back_from: str | None = None
    #: why the active version was not kept; None when it was fine
    problem: str | None = None


def check_active(store: ModelStore) -> ActiveCheck:
    """Re-hash the active version; roll back to an intact previous one if it fails.

    Blocking (reads whole artifacts): run it in a thread.
    """
    try:
        active = store.active()
    except StoreError as exc:
        key, problem = None, f"active pointer is broken: {exc}"
    else:
        if active is None:
            return ActiveCheck(None)
        if store.verify_hash(active.key):
            return ActiveCheck(active.key)
        key, problem = active.key, f"active model {active.key} fails its sha256 check"
    log.error("%s", problem)
    try:
        previous = store.previous()
    except StoreError:
        previous = None
    if previous is not None and store.verify_hash(previous.key):
        store.rollback()
        log.warning("rolled back to %s", previous.key)
        return ActiveCheck(previous.key, rolled_back_from=key, problem=problem)
    log.critical("no intact model to serve: %s, and no intact previous version", problem)
    return ActiveCheck(None, problem=problem)
