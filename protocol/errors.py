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
    └── SignatureError
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
