"""Downloading an update's artifact: attempts with back-off, each on a daemon thread.

:func:`agent.update.fetcher.download_artifact` makes one synchronous
attempt. :func:`download_with_retries` runs attempts until one succeeds or
``config.download_attempts`` have failed, waiting ``download_retry_s``
doubled after each failure. A transport failure keeps the partial file, so
the next attempt resumes with ``Range``; bad remote bytes
(:class:`ArtifactError`) end the update at once, since trying again will not
help.

Each attempt runs on a daemon thread rather than the default executor: a
download blocked on a silent server must not hold up the interpreter's exit
(the executor's threads would). ``cancel`` stops an attempt at its next
chunk; ``abort`` cuts a back-off wait short.

A folder variant (``files`` set) is fetched file by file into a partial
folder (:mod:`agent.update.folder`); a failed attempt keeps the files
already verified and the one in progress, so the next attempt resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from protocol import EventCode, UpdateState, VariantFile

from ..config import AgentConfig
from ..errors import ArtifactError, Cancelled, DownloadError
from .folder import download_folder, remove_partial
from .outcome import Failed, Stopped

if TYPE_CHECKING:
    from .fetcher import Fetcher

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ArtifactRequest:
    """What to download, from where, into which partial file, and what it must hash to.

    For a folder variant ``files`` lists its files, ``url`` is the folder's
    URL (each file is fetched from ``<url>/<path>``) and ``partial`` the
    partial folder; ``size`` and ``sha256`` are then the folder's.
    """

    url: str
    partial: Path
    size: int
    sha256: str
    files: tuple[VariantFile, ...] | None = None


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread and await its result from the event loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="artifact-download", daemon=True).start()
    return future


async def download_with_retries(
    request: ArtifactRequest,
    *,
    config: AgentConfig,
    fetcher_factory: Callable[[], Fetcher] | None,
    progress: Callable[[int, int], None],
    cancel: threading.Event,
    abort: asyncio.Event,
    still_current: Callable[[], object],
    pace: Callable[[int], None] | None = None,
) -> None:
    """Download ``request`` into its partial file, verified, in ``download_attempts`` tries.

    ``progress(done, total)`` is called from the download thread.
    ``still_current()`` raises :class:`Stopped` when the update was superseded
    or the agent is stopping; it is asked after every failed attempt and
    back-off. Raises :class:`Stopped` when ``cancel`` stopped an attempt, and
    :class:`Failed` when the download cannot succeed (the partial file is
    deleted then). ``fetcher_factory`` makes one fetcher per attempt
    (:class:`HttpFetcher` when None). ``pace(nbytes)`` is called on the
    download thread after every chunk received (see
    :func:`~agent.update.fetcher.download_artifact`).
    """
    # Imported here: the fetcher's ssl and httpx cost an idle agent memory it
    # needs only while downloading.
    from .fetcher import HttpFetcher, download_artifact

    partial, factory = request.partial, fetcher_factory or HttpFetcher
    limits = {
        "min_bytes_per_s": config.download_min_bytes_per_s,
        "stall_window_s": config.download_stall_window_s,
        "cancel": cancel,
        "pace": pace,
    }
    #: a folder's files verified by an earlier attempt: not hashed again
    verified: set[str] = set()

    def attempt() -> None:
        fetcher = factory()
        fetch = functools.partial(download_artifact, fetcher)
        try:
            if request.files is not None:
                download_folder(fetch, request.url, partial, request.files, progress=progress,
                                verified=verified, **limits)
            else:
                fetch(request.url, partial, expected_size=request.size,
                      expected_sha256=request.sha256, progress=progress, **limits)
        finally:
            fetcher.close()

    for number in range(1, config.download_attempts + 1):
        try:
            await _in_daemon_thread(attempt)
            return
        except Cancelled as exc:
            raise Stopped() from exc
        except DownloadError as exc:
            still_current()
            if number == config.download_attempts:
                remove_partial(partial)
                raise Failed.of(exc) from exc
            delay = config.download_retry_s * 2 ** (number - 1)
            log.warning("download attempt %d failed (%s); retrying in %.1f s", number, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(abort.wait(), delay)
            still_current()
        except ArtifactError as exc:
            # These bytes are no base to resume from (the fetcher deleted a
            # single file's; a folder's other files go with them).
            remove_partial(partial)
            raise Failed.of(exc) from exc
        except OSError as exc:
            remove_partial(partial)
            raise Failed(UpdateState.FAILED, EventCode.DISK_ERROR, str(exc)) from exc
