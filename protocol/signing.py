"""Ed25519 keys, key ids, signatures over canonical JSON.

Pure: keys come in and out as bytes/strings; nothing here reads files or the
clock. A key id is the first 16 hex digits of the SHA-256 of the raw public
key, so it is derived, never trusted from the wire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

from .canonical import canonical_json
from .errors import SignatureError


def _ed25519() -> Any:
    """The cryptography Ed25519 module, imported on first use.

    Importing cryptography costs an idle agent several MB of RSS; a device
    pays it only once an assignment or key list actually needs verifying.
    """
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def _raw(key: Any, private: bool = False) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    if private:
        return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    return key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc


def key_id_for(public_raw: bytes) -> str:
    """Derive the key id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key with its derived id."""

    raw: bytes

    @property
    def key_id(self) -> str:
        """The key id: 16 hex digits of SHA-256(raw)."""
        return key_id_for(self.raw)

    def to_b64(self) -> str:
        """Base64 of the raw public key, as stored in key lists."""
        return _b64(self.raw)

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        """Parse a base64 raw public key; raise :class:`SignatureError`."""
        raw = _unb64(text, "public key")
        if len(raw) != 32:
            raise SignatureError("an Ed25519 public key is 32 bytes")
        return cls(raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Return True if ``signature`` is this key's signature over ``data``."""
        from cryptography.exceptions import InvalidSignature

        try:
            _ed25519().Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An Ed25519 private key. Keep it offline for release keys."""

    raw: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        """Create a fresh random key."""
        return cls(_raw(_ed25519().Ed25519PrivateKey.generate(), private=True))

    @classmethod
    def from_b64(cls, text: str) -> SigningKey:
        """Parse a base64 raw private key."""
        raw = _unb64(text.strip(), "private key")
        if len(raw) != 32:
            raise ValueError("an Ed25519 private key is 32 bytes")
        return cls(raw)

    def to_b64(self) -> str:
        """Base64 of the raw private key."""
        return _b64(self.raw)

    @property
    def public(self) -> PublicKey:
        """The matching public key."""
        key = _ed25519().Ed25519PrivateKey.from_private_bytes(self.raw)
        return PublicKey(_raw(key.public_key()))

    @property
    def key_id(self) -> str:
        """The key id of the public half."""
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        """Sign raw bytes."""
        return _ed25519().Ed25519PrivateKey.from_private_bytes(self.raw).sign(data)

    def sign_value(self, value: Any) -> dict[str, str]:
        """Sign the canonical JSON of ``value``; return ``{"keyid", "sig"}``."""
        return self.signature(canonical_json(value))

    def signature(self, data: bytes) -> dict[str, str]:
        """Sign ``data`` (canonical JSON already); return ``{"keyid", "sig"}``."""
        return {"keyid": self.key_id, "sig": _b64(self.sign(data))}


def verify_value(
    value: Any,
    signatures: list[dict[str, str]],
    trusted: dict[str, PublicKey],
    threshold: int,
) -> set[str]:
    """Check that at least ``threshold`` distinct trusted keys signed ``value``.

    ``signatures`` is a list of ``{"keyid", "sig"}``; ``trusted`` maps key id
    to key. Signatures by unknown keys are ignored (a key list may be newer
    than the signer set), duplicates by one key count once. Returns the set of
    key ids whose signatures verified; raises :class:`SignatureError` when the
    threshold is not met.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    data = canonical_json(value)
    good: set[str] = set()
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        keyid, sig = entry.get("keyid"), entry.get("sig")
        if not isinstance(keyid, str) or not isinstance(sig, str) or keyid not in trusted:
            continue
        try:
            raw_sig = _unb64(sig, "signature")
        except SignatureError:
            continue
        if trusted[keyid].verify(raw_sig, data):
            good.add(keyid)
    if len(good) < threshold:
        raise SignatureError(
            f"{len(good)} valid signature(s) from trusted keys, {threshold} required"
        )
    return good
