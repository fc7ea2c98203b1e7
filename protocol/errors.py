"""Exceptions raised by the protocol layer.

Two roots, as in python-tuf: :class:`ProtocolError` means the *remote data* is
bad (a payload that does not parse, is too large, has the wrong schema, or a
signature that does not verify). Transport failures never originate here:
this package does no I/O. Caller misuse stays ``ValueError``.

    ProtocolError
    ├── PayloadTooLarge
    ├── MalformedPayload
    │   └── SchemaMismatch
    ├── TopicError
    ├── SignatureError
    │   └── ThresholdError      fewer than threshold trusted keys signed
    ├── ExpiredError            signed data (or a pinned key list) has expired
    │   └── KeyListExpired
    ├── NotYetValidError        issued further in the future than clock skew allows
    ├── ReplayError             assignment sequence not above the highest accepted
    ├── WrongDeviceError        assignment addressed to another device
    ├── WrongRoleError          key list for another role
    ├── BadVersionError         key list version is not exactly current + 1
    ├── VariantMismatch         the release has no variant for the assigned tier
    └── DoesNotFit              the variant does not fit this device's hardware

Every class carries a short machine ``reason`` (a metrics label and the
``rejected(reason)`` event), as python-tuf splits its repository errors.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Remote data violates the slmfleet protocol."""

    #: short machine-readable reason, used as a metrics label and in events
    reason: str = "protocol_error"


class PayloadTooLarge(ProtocolError):
    """The payload exceeds the size cap before any parsing is attempted."""

    reason = "too_large"


class MalformedPayload(ProtocolError):
    """The payload is not valid JSON or does not match its message model."""

    reason = "malformed"


class SchemaMismatch(MalformedPayload):
    """The payload declares a schema other than the one its topic carries."""

    reason = "wrong_schema"


class TopicError(ProtocolError):
    """The topic is not a well-formed slmfleet device topic."""

    reason = "bad_topic"


class SignatureError(ProtocolError):
    """A signature is missing, malformed, or does not verify."""

    reason = "bad_signature"


class ThresholdError(SignatureError):
    """Fewer than the threshold of distinct trusted keys signed the data.

    Covers no signatures at all, signatures by unknown keys, and too few of
    the right ones: to the verifier these are the same arbitrary-software
    risk. The message names the role whose threshold failed.
    """

    reason = "threshold_not_met"


class ExpiredError(ProtocolError):
    """Signed data is past its ``expires_at`` (a freeze attack, or a stale copy)."""

    reason = "expired"


class KeyListExpired(ExpiredError):
    """A pinned key list is past its ``expires_at``; rotate it before trusting it."""

    reason = "keys_expired"


class NotYetValidError(ProtocolError):
    """Signed data claims to be issued further in the future than clock skew allows."""

    reason = "not_yet_valid"


class ReplayError(ProtocolError):
    """An assignment's sequence is not above the highest one ever accepted."""

    reason = "replayed_sequence"


class WrongDeviceError(ProtocolError):
    """An assignment is addressed to a different device."""

    reason = "wrong_device"


class WrongRoleError(ProtocolError):
    """A key list names a different role than the one it would replace."""

    reason = "wrong_role"


class BadVersionError(ProtocolError):
    """A new key list's version is not exactly the trusted version + 1."""

    reason = "bad_version"


class VariantMismatch(ProtocolError):
    """The release has no variant for the tier the assignment chose."""

    reason = "no_variant"


class DoesNotFit(ProtocolError):
    """The chosen variant does not fit this device's tier or measured hardware."""

    reason = "does_not_fit"
