"""The control plane's trust material, loaded once at start-up from the settings.

The control plane holds the *public* release keys (to refuse manifests no
release threshold signed) and the director's *private* keys (to sign
assignments). Anything missing or inconsistent stops the start with a
message that names the fix, because a director that signs with a key the
agents do not pin would publish assignments every device rejects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol import KeyList, SigningKey

from .config import ControlPlaneSettings
from .keyfiles import KeyFileError, read_key_list, read_private_key


class TrustConfigError(RuntimeError):
    """The configured key files are missing or do not fit together."""


@dataclass(frozen=True)
class DirectorKeys:
    """The director key list agents pin and enough private keys to meet its threshold."""

    key_list: KeyList
    signers: tuple[SigningKey, ...]


@dataclass(frozen=True)
class Trust:
    """Release keys for the registry; director keys when assignments are enabled."""

    release_keys: KeyList | None
    director: DirectorKeys | None


def _hint(role: str) -> str:
    return (
        f"create one with `slmfleet keys generate --role {role} --out DIR`, then "
        f"`slmfleet keys list --role {role} --threshold 1 --key DIR/<keyid>.key --out FILE`"
    )


def _key_list(path: Path, role: str) -> KeyList:
    if not path.is_file():
        raise TrustConfigError(f"{role} key list {path} does not exist; {_hint(role)}")
    try:
        return read_key_list(path, role)
    except KeyFileError as exc:
        raise TrustConfigError(str(exc)) from exc


def _director_keys(settings: ControlPlaneSettings, release: KeyList) -> DirectorKeys:
    assert settings.director_keys_file is not None
    key_list = _key_list(settings.director_keys_file, "director")
    signers: dict[str, SigningKey] = {}
    for path in settings.director_key_files:
        if not path.is_file():
            raise TrustConfigError(
                f"director key {path} does not exist; create one with "
                "`slmfleet keys generate --role director --out DIR`"
            )
        try:
            key = read_private_key(path, "director")
        except KeyFileError as exc:
            raise TrustConfigError(str(exc)) from exc
        if key.key_id not in key_list.keys:
            raise TrustConfigError(
                f"director key {path} ({key.key_id}) is not in the director key list "
                f"{settings.director_keys_file}; agents would reject what it signs"
            )
        signers[key.key_id] = key
    if len(signers) < key_list.threshold:
        raise TrustConfigError(
            f"the director key list needs {key_list.threshold} signing key(s); "
            f"director_key_files gives {len(signers)}"
        )
    # The split between offline release keys and the online director key is
    # the whole point of two signatures (DESIGN.md); agents refuse it too.
    shared = set(key_list.keys) & set(release.keys)
    if shared:
        raise TrustConfigError(
            f"key(s) {', '.join(sorted(shared))} are in both the release and the director list"
        )
    # Signing with exactly the threshold keeps envelopes small and predictable.
    chosen = tuple(signers.values())[: key_list.threshold]
    return DirectorKeys(key_list=key_list, signers=chosen)


def load_trust(settings: ControlPlaneSettings) -> Trust:
    """Read and cross-check the key files named in ``settings``.

    Without ``release_keys_file`` the registry and director stay off (the
    API answers 503 naming the setting); raises :class:`TrustConfigError`.
    """
    if settings.release_keys_file is None:
        return Trust(release_keys=None, director=None)
    release = _key_list(settings.release_keys_file, "release")
    director = _director_keys(settings, release) if settings.director_keys_file else None
    return Trust(release_keys=release, director=director)
