"""Why an update step ended as it did: the machine-readable ``code`` of an event.

An event's free-text ``reason`` is for people; its ``code`` is for programs
(the rollout engine, metrics, the CLI). Every code an agent can emit is one
member of :class:`EventCode`, and each is the ``reason`` attribute of the
exception that produces it (:mod:`protocol.errors`, the agent's download,
artifact, store and staging errors), so the agent fills ``code`` from the
exception it caught. Values are the labels agents have always written
before the colon of a ``"code: detail"`` reason, so
:func:`code_from_reason` recovers the code of an event in the old form
(``slmfleet.event/1``), which has no ``code`` field.
"""

from __future__ import annotations

from enum import StrEnum


class EventCode(StrEnum):
    """Every reason code an agent's update events can carry."""

    # the remote data is bad (protocol.errors)
    PROTOCOL_ERROR = "protocol_error"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    WRONG_SCHEMA = "wrong_schema"
    BAD_TOPIC = "bad_topic"
    BAD_SIGNATURE = "bad_signature"
    THRESHOLD_NOT_MET = "threshold_not_met"
    EXPIRED = "expired"
    KEYS_EXPIRED = "keys_expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAYED_SEQUENCE = "replayed_sequence"
    WRONG_DEVICE = "wrong_device"
    WRONG_ROLE = "wrong_role"
    BAD_VERSION = "bad_version"
    # the device cannot run this variant
    NO_VARIANT = "no_variant"
    DOES_NOT_FIT = "does_not_fit"
    #: an adapter whose base is not the one active here (protocol.adapter)
    BASE_MISMATCH = "base_mismatch"
    INSUFFICIENT_RAM = "insufficient_ram"
    INSUFFICIENT_DISK = "insufficient_disk"
    # the transport failed (a retry may work)
    TRANSPORT = "transport"
    HTTP_STATUS = "http_status"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    BAD_RESPONSE = "bad_response"
    INTERRUPTED = "interrupted"
    TOO_SLOW = "too_slow"
    CANCELLED = "cancelled"
    # the artifact is bad
    BAD_ARTIFACT = "bad_artifact"
    TOO_LONG = "too_long"
    SIZE_MISMATCH = "size_mismatch"
    HASH_MISMATCH = "hash_mismatch"
    TOKENIZER_MISMATCH = "tokenizer_mismatch"
    #: the release names no artifact location and the device has none configured
    NO_ARTIFACT_URL = "no_artifact_url"
    # the device's own state
    STORE_CORRUPT = "store_corrupt"
    #: the store holds another artifact under the same name@version
    STORE_CONFLICT = "store_conflict"
    #: writing the download to local disk failed
    DISK_ERROR = "disk_error"
    #: an agent bug or local trouble it did not foresee; the old model serves on
    INTERNAL_ERROR = "internal_error"
    STATE_CORRUPT = "state_corrupt"
    KEYS_UNAVAILABLE = "keys_unavailable"
    CRASH_LOOP = "crash_loop"
    # the model itself
    HEALTH_FAILED = "health_failed"
    ACTIVE_BROKEN = "active_broken"
    # the update was replaced before it finished
    SUPERSEDED = "superseded"
    # the update waits (never an end: they ride on waiting_window,
    # waiting_network, deferred and activated events)
    #: the download window is closed; the reason names the next opening
    DOWNLOAD_WINDOW = "download_window"
    #: the activation window is closed; the reason names the next opening
    ACTIVATION_WINDOW = "activation_window"
    #: the link is metered and the policy does not allow it
    METERED = "metered"
    #: an app on the device holds an update lock; the reason names its reason
    LOCKED = "locked"
    #: activated although locks were held: an operator's lock override (named) skipped them
    LOCK_OVERRIDDEN = "lock_overridden"


def code_from_reason(reason: str | None) -> EventCode | None:
    """The code of a ``"code: detail"`` reason (the old event form), if it names one."""
    if not reason:
        return None
    head = reason.split(":", 1)[0].strip()
    try:
        return EventCode(head)
    except ValueError:
        return None
