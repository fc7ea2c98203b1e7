"""Exceptions raised by the agent's update pipeline.

Two roots for downloads, as in python-tuf: :class:`DownloadError` means the
*transport* failed and trying again later may work (the partial file is kept
so the next attempt resumes with ``Range``); :class:`ArtifactError` means the
*remote data* is bad and trying again will not help (the partial file has
been deleted). A third root, :class:`StoreError`, means the local model store
is inconsistent in a way its own crash-safe steps cannot produce (files
tampered with, a failing disk). Caller misuse stays ``ValueError`` /
``RuntimeError``.

    DownloadError               transport failed; partial kept, resumable
    ├── HttpStatusError         unexpected HTTP status (``status`` attribute)
    │   └── RangeNotSatisfiable 416: the remote is shorter than the partial
    ├── BadResponse             malformed response (e.g. a 206 for the wrong range)
    ├── Interrupted             connection closed or reset before the end
    ├── TooSlow                 below the minimum throughput (or silent)
    └── Cancelled               the caller asked the download to stop
    ArtifactError               remote data is bad; partial deleted
    ├── TooLong                 more bytes than the signed size
    ├── SizeMismatch            fewer bytes than the signed size
    └── HashMismatch            sha256 differs from the signed digest
    StoreError                  the local model store is inconsistent

Every class carries a short machine ``reason`` (a metrics label, and the
``code`` of the event that reports it: a :class:`protocol.EventCode` value,
checked by ``tests/test_event_codes_agent.py``), as in :mod:`protocol.errors`.
"""

from __future__ import annotations


class DownloadError(Exception):
    """The transport failed; the partial file is kept and a retry resumes."""

    #: short machine-readable reason, used as a metrics label and in events
    reason: str = "transport"


class HttpStatusError(DownloadError):
    """The server answered with a status the downloader cannot use."""

    reason = "http_status"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RangeNotSatisfiable(HttpStatusError):
    """416: the server holds fewer bytes than the offset we asked for."""

    reason = "range_not_satisfiable"

    def __init__(self, message: str, *, size: int | None) -> None:
        super().__init__(message, status=416)
        #: the full size of the remote file, when the server said (``Content-Range: bytes */N``)
        self.size = size


class BadResponse(DownloadError):
    """The response is malformed, e.g. a 206 for a range we did not ask for."""

    reason = "bad_response"


class Interrupted(DownloadError):
    """The connection closed or failed before the whole body arrived."""

    reason = "interrupted"


class TooSlow(DownloadError):
    """Fewer bytes than the minimum throughput arrived within the stall window."""

    reason = "too_slow"


class Cancelled(DownloadError):
    """The caller asked the download to stop (e.g. the agent is shutting down)."""

    reason = "cancelled"


class ArtifactError(Exception):
    """The remote artifact does not match its signed manifest; partial deleted."""

    reason: str = "bad_artifact"


class TooLong(ArtifactError):
    """The server sent or declared more bytes than the signed size."""

    reason = "too_long"


class SizeMismatch(ArtifactError):
    """The remote artifact is shorter than the signed size."""

    reason = "size_mismatch"


class HashMismatch(ArtifactError):
    """The sha256 of the downloaded bytes differs from the signed digest."""

    reason = "hash_mismatch"


class StoreError(Exception):
    """The model store on disk is inconsistent (tampered with or a failing disk)."""

    reason: str = "store_corrupt"
