"""Key files on disk: private keys, public keys and signed key lists.

Formats (docs/models.md, "Keys"):

* ``<keyid>.key`` -- a private key, mode 0600::

      {"schema": "slmfleet.private-key/1", "role": "release", "keyid": "...",
       "private": "<base64 raw Ed25519 seed>"}

* ``<keyid>.pub`` -- its public half, safe to hand around when collecting
  the keys of a list::

      {"schema": "slmfleet.public-key/1", "role": "release", "keyid": "...",
       "public": "<base64 raw Ed25519 public key>"}

* a key list -- a :class:`protocol.SignedKeyList` envelope, canonical JSON,
  exactly what agents pin as ``release-keys.json`` / ``director-keys.json``
  and read with :func:`protocol.verify_pinned_key_list`.

Reading a file checks that the key id is derived from the key it stands
beside, so a renamed or edited file is refused, not trusted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from protocol import (
    MAX_KEY_LIST_BYTES,
    KeyList,
    ProtocolError,
    PublicKey,
    Role,
    SignatureError,
    SigningKey,
    canonical_json,
    sign_key_list,
    verify_key_rotation,
    verify_pinned_key_list,
)

PRIVATE_KEY_SCHEMA = "slmfleet.private-key/1"
PUBLIC_KEY_SCHEMA = "slmfleet.public-key/1"
ROLES: tuple[str, ...] = get_args(Role)
#: a key file is a few hundred bytes; refuse anything absurd before parsing
MAX_KEY_FILE_BYTES = 4096
SECONDS_PER_DAY = 86_400


class KeyFileError(ValueError):
    """A key or key-list file is missing, unreadable or not what it claims to be."""


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc}") from exc
    if len(data) > limit:
        raise KeyFileError(f"{what} {path} is larger than {limit} bytes")
    return data


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a file that must not exist yet, durably, with ``mode``."""
    # O_EXCL: never overwrite a key; the mode is set at creation, so the
    # secret is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_fd(fd, data)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        _write_fd(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_role(role: str) -> Role:
    """``role`` if it is ``release`` or ``director``; ``KeyFileError`` otherwise."""
    if role not in ROLES:
        raise KeyFileError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role  # type: ignore[return-value]


def save_key(directory: Path, role: str, key: SigningKey) -> tuple[Path, Path]:
    """Write ``key`` as ``<keyid>.key`` (0600) and ``<keyid>.pub``; refuse to overwrite."""
    role = check_role(role)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = directory / f"{key.key_id}.key"
    public_path = directory / f"{key.key_id}.pub"
    private = {
        "schema": PRIVATE_KEY_SCHEMA,
        "role": role,
        "keyid": key.key_id,
        "private": key.to_b64(),
    }
    public = {
        "schema": PUBLIC_KEY_SCHEMA,
        "role": role,
        "keyid": key.key_id,
        "public": key.public.to_b64(),
    }
    _write_new(private_path, json.dumps(private, indent=2).encode() + b"\n", 0o600)
    _write_new(public_path, json.dumps(public, indent=2).encode() + b"\n", 0o644)
    return private_path, public_path


def generate_key(directory: Path, role: str) -> tuple[SigningKey, Path, Path]:
    """Create a key for ``role`` in ``directory``; return it and its .key and .pub paths."""
    key = SigningKey.generate()
    private_path, public_path = save_key(directory, role, key)
    return key, private_path, public_path


def _load_key_doc(path: Path) -> dict[str, Any]:
    data = _read_bounded(path, MAX_KEY_FILE_BYTES, "key file")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {path} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise KeyFileError(f"key file {path} is not a JSON object")
    return doc


def _check_identity(
    doc: dict[str, Any], path: Path, kind: str, key_id: str, role: str | None
) -> None:
    """The file's ``keyid`` is its key's, and with ``role``, it was made for that role."""
    if doc.get("keyid") != key_id:
        raise KeyFileError(f"{kind} file {path}: keyid does not match the key")
    if role is not None and doc.get("role") != role:
        raise KeyFileError(f"{path} holds a {doc.get('role')} key, not a {role} key")


def read_private_key(path: Path, role: str | None = None) -> SigningKey:
    """Read a ``.key`` file; with ``role``, refuse a key made for the other role."""
    doc = _load_key_doc(path)
    if doc.get("schema") != PRIVATE_KEY_SCHEMA:
        raise KeyFileError(f"{path} is not a private key file (schema {doc.get('schema')!r})")
    try:
        key = SigningKey.from_b64(str(doc.get("private", "")))
    except (ValueError, SignatureError) as exc:
        raise KeyFileError(f"private key file {path}: {exc}") from exc
    _check_identity(doc, path, "private key", key.key_id, role)
    return key


def is_private_key_file(path: Path) -> bool:
    """True if ``path`` is a readable private key file (of either role)."""
    if not path.is_file():
        return False
    try:
        read_private_key(path)
    except KeyFileError:
        return False
    return True


def read_public_key(spec: str, role: str | None = None) -> PublicKey:
    """A public key from a ``.pub`` or ``.key`` file, or a base64 public key itself."""
    path = Path(spec)
    if not path.is_file():
        try:
            return PublicKey.from_b64(spec)
        except SignatureError:
            raise KeyFileError(
                f"{spec!r} is neither a key file nor a base64 Ed25519 public key"
            ) from None
    doc = _load_key_doc(path)
    if doc.get("schema") == PRIVATE_KEY_SCHEMA:
        return read_private_key(path, role).public
    if doc.get("schema") != PUBLIC_KEY_SCHEMA:
        raise KeyFileError(f"{path} is not a key file (schema {doc.get('schema')!r})")
    try:
        public = PublicKey.from_b64(str(doc.get("public", "")))
    except SignatureError as exc:
        raise KeyFileError(f"public key file {path}: {exc}") from exc
    _check_identity(doc, path, "public key", public.key_id, role)
    return public


def read_key_list(path: Path, role: str) -> KeyList:
    """Read a pinned key-list envelope for ``role`` (checked like an agent does)."""
    data = _read_bounded(path, MAX_KEY_LIST_BYTES, f"{role} key list")
    try:
        return verify_pinned_key_list(data, check_role(role))
    except ProtocolError as exc:
        raise KeyFileError(f"{role} key list {path}: {exc}") from exc


def _expiry(now: float, expires_days: float | None) -> float | None:
    return None if expires_days is None else now + expires_days * SECONDS_PER_DAY


def build_key_list(
    role: str,
    keys: Sequence[PublicKey],
    signers: Sequence[SigningKey],
    *,
    threshold: int,
    version: int = 1,
    now: float,
    expires_days: float | None = None,
) -> bytes:
    """A signed key list, checked the way an agent pinning it would, as canonical JSON.

    ``signers`` must include a threshold of the list's own keys.
    """
    try:
        key_list = KeyList.of(
            check_role(role),
            list({k.key_id: k for k in keys}.values()),
            threshold=threshold,
            version=version,
            expires_at=_expiry(now, expires_days),
        )
        envelope = canonical_json(sign_key_list(key_list, signers))
        verify_pinned_key_list(envelope, key_list.role)
    except (ValueError, ProtocolError) as exc:
        raise KeyFileError(f"cannot build the {role} key list: {exc}") from exc
    return envelope


def rotate_key_list(
    current: KeyList,
    keys: Sequence[PublicKey],
    signers: Sequence[SigningKey],
    *,
    threshold: int,
    now: float,
    expires_days: float | None = None,
) -> bytes:
    """The successor of ``current`` (version + 1), verified as a device would verify it.

    ``signers`` must include a threshold of the current keys and a threshold
    of the new ones (TUF root rotation).
    """
    try:
        key_list = KeyList.of(
            current.role,
            list({k.key_id: k for k in keys}.values()),
            threshold=threshold,
            version=current.version + 1,
            expires_at=_expiry(now, expires_days),
        )
        # A key in both old and new lists signs once; make_envelope refuses twice.
        unique = list({k.key_id: k for k in signers}.values())
        envelope = canonical_json(sign_key_list(key_list, unique))
        verify_key_rotation(current, envelope)
    except (ValueError, ProtocolError) as exc:
        raise KeyFileError(f"cannot rotate the {current.role} key list: {exc}") from exc
    return envelope
