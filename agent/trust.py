"""The agent's pinned trust roots: release and director key lists on disk.

Each file holds one ``SignedKeyList`` envelope (DESIGN.md "Trust: two
signatures"), installed by the operator with the agent. A successor list is
dropped next to it as ``<stem>.v<N><suffix>`` (``release-keys.v2.json``);
at start-up the agent adopts successors in order, each checked by
:func:`protocol.verify_key_rotation` against the list it replaces (TUF's
root rotation), and writes the newest adopted list over the pinned file
atomically, so a later start begins from it. A successor that does not
verify is logged and skipped, and the pinned list stays what it was.

A missing or invalid pinned file does not stop the agent: it still joins
the fleet and reports, but every assignment is refused with a reason naming
the file (:class:`TrustUnavailable`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    MAX_KEY_LIST_BYTES,
    KeyList,
    ProtocolError,
    Role,
    verify_key_rotation,
    verify_pinned_key_list,
)

from .atomic import write_bytes_atomic
from .config import AgentConfig

log = logging.getLogger(__name__)

#: successors looked at beyond the pinned version in one start-up; bounds the
#: signature work a directory full of junk can cause
MAX_ROTATIONS = 64


class TrustUnavailable(Exception):
    """A pinned key list is missing or invalid; the agent refuses every assignment."""

    reason = "keys_unavailable"


@dataclass(frozen=True, slots=True)
class TrustRoots:
    """The key lists the agent verifies assignments with."""

    release: KeyList
    director: KeyList


def rotation_path(pinned: Path, version: int) -> Path:
    """Where the successor of ``pinned`` with ``version`` is looked for."""
    return pinned.with_name(f"{pinned.stem}.v{version}{pinned.suffix}")


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(MAX_KEY_LIST_BYTES + 1)
    if len(data) > MAX_KEY_LIST_BYTES:
        raise ProtocolError(f"larger than {MAX_KEY_LIST_BYTES} bytes")
    return data


def load_pinned(path: Path, role: Role) -> KeyList:
    """Read the pinned ``role`` list at ``path`` and adopt any successors next to it.

    Raises :class:`TrustUnavailable` naming ``path`` when it is missing or invalid.
    """
    try:
        current = verify_pinned_key_list(_read_bounded(path), role)
    except FileNotFoundError:
        raise TrustUnavailable(f"{role} key file {path} is missing") from None
    except (OSError, ProtocolError) as exc:
        raise TrustUnavailable(f"{role} key file {path} is invalid: {exc}") from exc

    adopted: bytes | None = None
    for _ in range(MAX_ROTATIONS):
        candidate = rotation_path(path, current.version + 1)
        try:
            data = _read_bounded(candidate)
            new = verify_key_rotation(current, data)
        except FileNotFoundError:
            break
        except (OSError, ProtocolError) as exc:
            # Skipped, not fatal: the chain stops here and the pinned list
            # stays trusted; an operator replaces the bad file.
            log.error("ignoring %s key rotation %s: %s", role, candidate, exc)
            break
        log.warning("adopted %s key list v%d from %s", role, new.version, candidate)
        current, adopted = new, data
    if adopted is not None:
        # The verified successor envelope becomes the pinned file: it carries a
        # threshold of its own keys' signatures, so it re-reads as pinned.
        try:
            write_bytes_atomic(path, adopted, mode=0o644)
        except OSError as exc:
            # Still trusted for this run; the next start adopts it again.
            log.error("could not persist %s key list v%d to %s: %s",
                      role, current.version, path, exc)
    return current


def load_trust(config: AgentConfig) -> TrustRoots:
    """Both pinned lists from the config's paths; raises :class:`TrustUnavailable`."""
    release = load_pinned(config.release_keys_path, "release")
    director = load_pinned(config.director_keys_path, "director")
    if set(release.keys) & set(director.keys):
        # Would let the online director sign releases (see protocol/assignment.py).
        raise TrustUnavailable(
            f"{config.release_keys_path} and {config.director_keys_path} share a key"
        )
    return TrustRoots(release=release, director=director)
