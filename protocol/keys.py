"""Pinned key lists and threshold-signed envelopes.

A :class:`KeyList` is one role's trusted Ed25519 public keys plus how many of
them must sign (DESIGN.md "Trust: two signatures"): ``release`` keys, held
offline by admins, sign release manifests; ``director`` keys, online in the
control plane, sign per-device assignments. The agent pins both lists and
replaces one only through :func:`verify_key_rotation`.

Every signed document travels as an envelope::

    {"signed": {...}, "signatures": [{"keyid": "...", "sig": "..."}, ...]}

Signatures cover the canonical JSON of the *raw parsed* ``signed`` object,
never a re-serialisation of a model, so nothing a model would drop, coerce or
default can ride along unsigned. Each signed object carries its own
``schema``, which keeps a signature over one kind of document from being
accepted as another (the release keys sign both release manifests and their
own key lists).

Pure: bytes and values in, values or :mod:`protocol.errors` out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from .canonical import canonical_json
from .errors import (
    BadVersionError,
    KeyListExpired,
    MalformedPayload,
    PayloadTooLarge,
    SchemaMismatch,
    SignatureError,
    ThresholdError,
    WrongRoleError,
)
from .messages import MAX_PAYLOAD_BYTES, Strict, Wire
from .signing import PublicKey, SigningKey, verify_value

KEY_LIST_SCHEMA = "slmfleet.keys/1"

#: a key list fits the ordinary payload cap with room to spare
MAX_KEY_LIST_BYTES = MAX_PAYLOAD_BYTES
#: keys in one role's list
MAX_KEYS = 32
#: signature entries in one envelope; bounds the Ed25519 work an attacker can cause
MAX_SIGNATURES = 32

Role = Literal["release", "director"]
KeyId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
#: seconds since the Unix epoch; strict so a bool or a string cannot pass as a time
Timestamp = Annotated[float, Field(strict=True, ge=0)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class SignedPart(Wire):
    """Base for anything inside an envelope's ``signed``: strict shape, immutable.

    ``schema`` is bound by alias only (no ``populate_by_name``), so the wire
    cannot spell it ``schema_``.
    """


class SignatureEntry(Strict):
    """One ``{"keyid", "sig"}`` entry of an envelope."""

    keyid: KeyId
    sig: Annotated[str, StringConstraints(max_length=128)]


Signatures = Annotated[list[SignatureEntry], Field(max_length=MAX_SIGNATURES)]


class KeyList(SignedPart):
    """A role's trusted public keys and the threshold of them that must sign."""

    schema_: Literal["slmfleet.keys/1"] = Field(KEY_LIST_SCHEMA, alias="schema")
    role: Role
    version: PositiveInt
    threshold: PositiveInt
    #: key id -> base64 raw Ed25519 public key; the id is checked, never trusted
    keys: Annotated[
        dict[KeyId, Annotated[str, StringConstraints(max_length=64)]],
        Field(max_length=MAX_KEYS),
    ]
    expires_at: Timestamp | None = None

    @model_validator(mode="after")
    def _check_keys(self) -> KeyList:
        for keyid, encoded in self.keys.items():
            try:
                public = PublicKey.from_b64(encoded)
            except SignatureError as exc:
                raise ValueError(f"key {keyid}: {exc}") from exc
            # A key id is derived from the key; one that does not match would let
            # a list claim a signer it does not actually trust.
            if public.key_id != keyid:
                raise ValueError(f"key id {keyid} does not match its key ({public.key_id})")
        if self.threshold > len(self.keys):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(self.keys)} key(s)")
        return self

    def is_expired(self, now: float) -> bool:
        """Return True if the list has an expiry and ``now`` is at or past it."""
        return self.expires_at is not None and now >= self.expires_at

    @classmethod
    def of(
        cls,
        role: Role,
        keys: Sequence[PublicKey],
        *,
        threshold: int = 1,
        version: int = 1,
        expires_at: float | None = None,
    ) -> KeyList:
        """Build a key list from public keys (ids derived); raise ``ValueError`` if invalid."""
        try:
            return cls(
                role=role,
                version=version,
                threshold=threshold,
                keys={key.key_id: key.to_b64() for key in keys},
                expires_at=expires_at,
            )
        except ValidationError as exc:
            raise ValueError(_first_error(exc)) from exc


class SignedKeyList(Strict):
    """Envelope of a key list, signed for rotation (see :func:`verify_key_rotation`)."""

    signed: KeyList
    signatures: Signatures


def trusted_keys(key_list: KeyList) -> dict[str, PublicKey]:
    """Map key id to :class:`PublicKey` for every key in ``key_list``."""
    return {keyid: PublicKey.from_b64(encoded) for keyid, encoded in key_list.keys.items()}


# --- envelopes: shared by key lists, release manifests and assignments -------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that keep different duplicates would see different documents
    # under one signature; refuse the ambiguity outright.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return result


def load_json(payload: bytes, *, max_bytes: int, what: str) -> Any:
    """Parse bounded, strict UTF-8 JSON.

    Raises :class:`PayloadTooLarge` above ``max_bytes`` (before any parsing)
    and :class:`MalformedPayload` for invalid UTF-8 or JSON, NaN/Infinity,
    out-of-range numbers, duplicate object keys or absurd nesting.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"{what} must be bytes, not {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"{what} is {len(payload)} bytes, limit {max_bytes}")
    try:
        return json.loads(
            bytes(payload).decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicate_keys,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise MalformedPayload(f"{what} is not valid JSON: {exc}") from exc


def open_envelope(
    envelope: bytes | Mapping[str, Any], *, max_bytes: int, what: str
) -> tuple[dict[str, Any], list[Any]]:
    """Split an envelope into its raw ``signed`` object and ``signatures`` list.

    ``envelope`` is wire bytes (bounded by ``max_bytes`` and parsed with
    :func:`load_json`) or an already parsed object, such as the release
    embedded in an assignment. Nothing inside ``signed`` is interpreted here.
    """
    value = (
        load_json(envelope, max_bytes=max_bytes, what=what)
        if isinstance(envelope, bytes | bytearray | memoryview)
        else envelope
    )
    if not isinstance(value, Mapping) or set(value) != {"signed", "signatures"}:
        raise MalformedPayload(f"{what} must be an object with exactly 'signed' and 'signatures'")
    signed, signatures = value["signed"], value["signatures"]
    if not isinstance(signed, dict):
        raise MalformedPayload(f"{what}: 'signed' must be an object")
    if not isinstance(signatures, list) or len(signatures) > MAX_SIGNATURES:
        raise MalformedPayload(f"{what}: 'signatures' must be a list of at most {MAX_SIGNATURES}")
    return signed, signatures


def check_signatures(
    signed: dict[str, Any], signatures: list[Any], keys: KeyList, *, what: str
) -> frozenset[str]:
    """Require a threshold of ``keys`` to have signed the raw ``signed`` object.

    Returns the ids of the keys whose signatures verified; raises
    :class:`ThresholdError` naming the role when there are too few.
    """
    try:
        good = verify_value(signed, signatures, trusted_keys(keys), keys.threshold)
    except SignatureError as exc:
        raise ThresholdError(
            f"{what}: {exc} by the {keys.role} keys (key list v{keys.version})"
        ) from exc
    return frozenset(good)


M = TypeVar("M", bound=BaseModel)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


def validate_envelope(
    model: type[M], signed: dict[str, Any], signatures: list[Any], *, what: str
) -> M:
    """Validate an envelope whose signatures already verified against ``model``.

    Raises :class:`SchemaMismatch` when ``signed.schema`` names another kind of
    document and :class:`MalformedPayload` for anything else that does not
    validate (unknown fields included).
    """
    try:
        return model.model_validate({"signed": signed, "signatures": signatures})
    except ValidationError as exc:
        if any(tuple(e["loc"]) == ("signed", "schema") for e in exc.errors()):
            raise SchemaMismatch(f"{what}: signed.schema is {signed.get('schema')!r}") from exc
        raise MalformedPayload(f"{what}: {_first_error(exc)}") from exc


def verify_envelope(
    envelope: bytes | Mapping[str, Any],
    model: type[M],
    keys: KeyList,
    *,
    max_bytes: int,
    what: str,
    now: float | None = None,
    also_pinned: Sequence[KeyList] = (),
    pick: Callable[[dict[str, Any]], type[M]] | None = None,
) -> tuple[dict[str, Any], M]:
    """Verify a signed document; return its raw ``signed`` object and ``model``.

    In this order, so that nothing inside ``signed`` is interpreted before it
    verifies: bound and split the envelope (:func:`open_envelope`); with
    ``now``, refuse ``keys`` and each of ``also_pinned`` once past its expiry
    (:class:`KeyListExpired`: a stale pinned list is a frozen trust root that
    must be rotated first); require a threshold of ``keys`` over the raw
    object (:func:`check_signatures`); only then validate it
    (:func:`validate_envelope`). ``pick``, for a document that comes in more
    than one form, chooses the model from the verified raw object (by its
    ``schema``), so the form is read only after the signatures verify.
    """
    signed, signatures = open_envelope(envelope, max_bytes=max_bytes, what=what)
    if now is not None:
        for pinned in (keys, *also_pinned):
            if pinned.is_expired(now):
                raise KeyListExpired(f"{pinned.role} key list v{pinned.version} has expired")
    check_signatures(signed, signatures, keys, what=what)
    chosen = pick(signed) if pick is not None else model
    return signed, validate_envelope(chosen, signed, signatures, what=what)


def make_envelope(signed: dict[str, Any], keys: Sequence[SigningKey]) -> dict[str, Any]:
    """Sign the canonical JSON of ``signed`` with each of ``keys``; return the envelope."""
    return make_envelope_bytes(signed, keys)[0]


def make_envelope_bytes(
    signed: dict[str, Any], keys: Sequence[SigningKey], *, body: bytes | None = None
) -> tuple[dict[str, Any], bytes]:
    """:func:`make_envelope`, and the envelope's canonical JSON with it.

    ``signed`` is encoded once: the envelope's bytes splice that encoding in
    rather than encoding it again (a director signs thousands of assignments,
    each embedding a whole release, in one rollout stage). ``body``, when the
    caller has it, is ``canonical_json(signed)`` already computed.
    """
    if not keys:
        raise ValueError("at least one signing key is required")
    ids = [key.key_id for key in keys]
    if len(set(ids)) != len(ids):
        raise ValueError("the same key was given twice; it would count once")
    if body is None:
        body = canonical_json(signed)
    signatures = [key.signature(body) for key in keys]
    # Canonical JSON sorts keys, and "signatures" < "signed".
    data = b'{"signatures":' + canonical_json(signatures) + b',"signed":' + body + b"}"
    return {"signed": signed, "signatures": signatures}, data


# --- rotation ---------------------------------------------------------------


def sign_key_list(key_list: KeyList, keys: Sequence[SigningKey]) -> dict[str, Any]:
    """Sign ``key_list`` for distribution; return the envelope as a plain dict.

    For a rotation, ``keys`` must include a threshold of the *current* list's
    keys and a threshold of the new list's own keys.
    """
    return make_envelope(key_list.model_dump(mode="json", by_alias=True), keys)


def verify_key_rotation(current: KeyList, new_envelope_bytes: bytes) -> KeyList:
    """Verify the successor of the pinned ``current`` key list and return it.

    Mirrors TUF's root rotation (spec 5.3.4-5.3.5): the new list must be
    signed by a threshold of the current keys *and* a threshold of its own
    keys, name the same role, and carry version ``current.version + 1``.
    Rotating over several versions is a chain of calls, one per version.
    Expiry of the result is not checked here: like an intermediate TUF root,
    an old link in the chain may have expired; whoever uses the final list
    checks it (``verify_release`` and ``verify_assignment`` with ``now``).
    """
    what = f"{current.role} key list"
    # Bound and parse; nothing in 'signed' is interpreted before it verifies.
    signed, signatures = open_envelope(new_envelope_bytes, max_bytes=MAX_KEY_LIST_BYTES, what=what)
    # TUF 5.3.4 (1): signed by a threshold of the keys we already trust, so a
    # single stolen key (or the party that stole it) cannot mint a new list.
    check_signatures(signed, signatures, current, what=f"new {what}")
    new = validate_envelope(SignedKeyList, signed, signatures, what=what).signed
    # A release list must never be swapped in as the director list or back:
    # that would let the online director key sign releases.
    if new.role != current.role:
        raise WrongRoleError(f"new key list is for role {new.role!r}, expected {current.role!r}")
    # TUF 5.3.4 (2): the new keys themselves sign, proving someone holds them
    # (a threshold nobody can meet would brick every device).
    check_signatures(signed, signatures, new, what=f"new {what} (own keys)")
    # TUF 5.3.5: exactly N+1, so an old list cannot be replayed and no link
    # in the chain of trust can be skipped.
    if new.version != current.version + 1:
        raise BadVersionError(
            f"new {what} is version {new.version}, expected {current.version + 1}"
        )
    return new


def verify_pinned_key_list(envelope_bytes: bytes, role: Role) -> KeyList:
    """Read the key list a device or control plane pins at install time.

    The first list of a role is trusted because the operator installed it
    (TUF's root v1 is trusted the same way); it must still be well formed,
    be for ``role``, and carry a threshold of signatures by its own keys,
    which proves the installer holds them. Later lists arrive only through
    :func:`verify_key_rotation`.
    """
    what = f"pinned {role} key list"
    signed, signatures = open_envelope(envelope_bytes, max_bytes=MAX_KEY_LIST_BYTES, what=what)
    key_list = validate_envelope(SignedKeyList, signed, signatures, what=what).signed
    if key_list.role != role:
        raise WrongRoleError(f"{what} is for role {key_list.role!r}")
    check_signatures(signed, signatures, key_list, what=what)
    return key_list
