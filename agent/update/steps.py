"""One update's steps, from a verified assignment to an active model.

:class:`UpdateRun` takes the current update from wherever its persisted
state says it stands::

    verified -> fit_checked -> downloading -> staged -> health_checked -> activated

- **verify again** after a restart (:meth:`UpdateRun._reverify`): the
  payload is checked against the clock and sequence it was accepted with,
  with today's pinned keys.
- **fit check**: RAM and disk (:func:`agent.update.staging.disk_fit`),
  cleaning up old versions first if that makes it fit.
- **download and stage**: skipped when the exact variant is already
  installed intact; otherwise :mod:`agent.update.download`, the tokenizer
  check, and install into the store's own versioned directory.
- **health check** in the worker that will serve the model.
- **activate**: the one pointer swap, then old versions are cleaned up.

Before each step the run checks that its update is still current
(:meth:`Ledger.current`): a newer assignment or a stop ends it there
(:class:`Stopped`), its persisted state unchanged. A step that cannot
succeed raises :class:`Failed`, which ends the update with its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import (
    EventCode,
    EventType,
    ProtocolError,
    UpdateState,
    VerifiedAssignment,
)

from ..config import AgentConfig
from ..errors import StoreError
from ..healthcheck import HealthAborted, HealthChecker, HealthRequest
from ..profiles import FirmwareProfile
from ..runtime_settings import effective_runtime
from .download import ArtifactRequest, download_with_retries
from .intake import DeviceFacts, verify
from .ledger import Ledger
from .outcome import Failed, Stopped
from .staging import StagingError, check_tokenizer, disk_fit, installed_copy, store_manifest
from .state import UpdateRecord
from .store import ModelStore

if TYPE_CHECKING:
    from ..trust import TrustRoots
    from .fetcher import Fetcher

log = logging.getLogger(__name__)

#: a downloading event at most every this many percent
PROGRESS_STEP_PCT = 10


@dataclass(frozen=True, slots=True)
class StepTools:
    """What every run needs of the agent: settings, the device, the store, the ledger."""

    config: AgentConfig
    device: DeviceFacts
    profile: FirmwareProfile
    store: ModelStore
    ledger: Ledger
    health: HealthChecker
    fetcher_factory: Callable[[], Fetcher] | None
    #: the pinned keys (loaded again if they were missing), or None and why
    trust: Callable[[], tuple[TrustRoots | None, str | None]]
    #: the active version's key, None when nothing (readable) is active
    active_key: Callable[[], str | None]
    #: called right after the pointer swap
    on_activated: Callable[[], None]


class UpdateRun:
    """One run of the current update's remaining steps; see the module docstring."""

    def __init__(
        self, tools: StepTools, update_id: str, verified: VerifiedAssignment | None
    ) -> None:
        self._tools = tools
        self.update_id = update_id
        #: the verified assignment (from intake, or verified again on the first step)
        self.verified = verified
        self._abort = asyncio.Event()
        self._cancel = threading.Event()
        self._progress_step = -1
        self._running = False

    def abort(self) -> None:
        """Stop at the next safe point: the download's next chunk, a back-off, a health check."""
        self._abort.set()
        self._cancel.set()

    async def run(self) -> None:
        """Run the steps; a failure ends the update (recorded and reported), a stop leaves it."""
        ledger = self._tools.ledger
        self._running = True
        try:
            await self._steps()
        except Stopped:
            log.info("update %s stopped at a safe point", self.update_id)
        except Failed as exc:
            with contextlib.suppress(Stopped):
                ledger.finish(self.update_id, exc.state, exc.reason, exc.code)
        except Exception as exc:
            # A bug or local trouble (disk full, permissions): end it rather
            # than retry forever; the previous model keeps serving.
            log.exception("update %s failed unexpectedly", self.update_id)
            with contextlib.suppress(Stopped):
                ledger.finish(self.update_id, UpdateState.FAILED, f"internal_error: {exc!r}",
                              EventCode.INTERNAL_ERROR)
        finally:
            self._running = False

    def _current(self) -> UpdateRecord:
        return self._tools.ledger.current(self.update_id)

    def _transition(self, state: UpdateState, event: EventType | None) -> None:
        self._tools.ledger.transition(self.update_id, state, event)

    async def _steps(self) -> None:
        record = self._current()
        verified = self.verified or self._reverify(record)
        state = record.state
        if state is UpdateState.VERIFIED:
            await self._fit_check(verified)
            state = UpdateState.FIT_CHECKED
        if state in (UpdateState.FIT_CHECKED, UpdateState.DOWNLOADING):
            await self._stage(verified)
            state = UpdateState.STAGED
        if state is UpdateState.STAGED:
            await self._health_check(verified)
            state = UpdateState.HEALTH_CHECKED
        if state is UpdateState.HEALTH_CHECKED:
            await self._activate()

    def _reverify(self, record: UpdateRecord) -> VerifiedAssignment:
        """Verify a persisted assignment again before resuming it (after a restart).

        Against the clock and sequence it was accepted with: expiring while
        the device was down does not undo an accepted update, but the pinned
        keys of today must still vouch for it.
        """
        trust, problem = self._tools.trust()
        if trust is None:
            raise Failed(UpdateState.FAILED, EventCode.KEYS_UNAVAILABLE, str(problem))
        try:
            verified = verify(record.payload.encode(), self._tools.device, trust,
                              now=record.accepted_at, highest_sequence=record.sequence - 1)
        except ProtocolError as exc:
            raise Failed.of(exc, detail=f"no longer verifies: {exc}") from exc
        self.verified = verified
        return verified

    # -- fit check ---------------------------------------------------------------

    async def _fit_check(self, verified: VerifiedAssignment) -> None:
        tools, record = self._tools, self._current()
        # Presence only: identity and hash of an installed copy are checked when staging.
        try:
            installed = tools.store.version(record.key) is not None
        except StoreError:
            installed = False
        fit = await asyncio.to_thread(
            disk_fit, tools.store, record.key, verified.variant,
            capabilities=tools.device.capabilities, profile=tools.profile, installed=installed,
        )
        self._current()
        if not fit.result.ok:
            raise Failed(UpdateState.REJECTED, EventCode(fit.result.reason), fit.result.detail)
        if fit.needs_gc:
            removed = await asyncio.to_thread(tools.store.gc, 0)
            log.info("deleted %s to make room for %s", removed, record.key)
        self._transition(UpdateState.FIT_CHECKED, EventType.FIT_CHECKED)

    # -- download and stage ---------------------------------------------------------

    def _installed(self, key: str, verified: VerifiedAssignment) -> bool:
        try:
            return installed_copy(self._tools.store, key, verified) is not None
        except StagingError as exc:
            raise Failed.of(exc) from exc

    async def _stage(self, verified: VerifiedAssignment) -> None:
        store, record = self._tools.store, self._current()
        if await asyncio.to_thread(self._installed, record.key, verified):
            # Already in the store (a rollback to the previous version): no download.
            log.info("%s is installed and intact; not downloading", record.key)
        else:
            await self._download(verified)
            partial = store.staging_path(record.key)
            try:
                await asyncio.to_thread(check_tokenizer, partial, verified.variant)
            except StagingError as exc:
                partial.unlink(missing_ok=True)
                raise Failed.of(exc) from exc
            self._current()
            await asyncio.to_thread(store.install, record.key, partial, store_manifest(verified))
        self._transition(UpdateState.STAGED, EventType.STAGED)

    def _artifact_url(self, verified: VerifiedAssignment) -> str:
        base = verified.assignment.artifact_url_base or self._tools.config.artifact_base_url
        if base is None:
            raise Failed(UpdateState.FAILED, EventCode.NO_ARTIFACT_URL,
                         "the assignment names no artifact_url_base "
                         "and artifact_base_url is not configured")
        return f"{base.rstrip('/')}/{verified.variant.artifact}"

    async def _download(self, verified: VerifiedAssignment) -> None:
        tools, record, variant = self._tools, self._current(), verified.variant
        request = ArtifactRequest(
            url=self._artifact_url(verified),
            partial=tools.store.staging_path(record.key),
            size=variant.size_bytes,
            sha256=variant.sha256,
        )
        # Leftovers of other updates go; this one's partial stays and resumes.
        await asyncio.to_thread(tools.store.clean_staging, [record.key])
        held = request.partial.stat().st_size if request.partial.is_file() else 0
        self._transition(UpdateState.DOWNLOADING, None)
        self._progress(held, variant.size_bytes)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(self._progress, done, total)

        await download_with_retries(
            request,
            config=tools.config,
            fetcher_factory=tools.fetcher_factory,
            progress=progress,
            cancel=self._cancel,
            abort=self._abort,
            still_current=self._current,
        )

    def _progress(self, done: int, total: int) -> None:
        """Report download progress, at most one event per PROGRESS_STEP_PCT."""
        current = self._tools.ledger.file.current
        if not self._running or current is None or current.update_id != self.update_id:
            return
        pct = 100.0 * done / total if total else 100.0
        step = int(pct // PROGRESS_STEP_PCT)
        if step <= self._progress_step:
            return
        self._progress_step = step
        self._tools.ledger.events.emit(EventType.DOWNLOADING, current.assignment_id,
                                       progress_pct=round(min(pct, 100.0), 1))

    # -- health check and activation ---------------------------------------------------

    async def _health_check(self, verified: VerifiedAssignment) -> None:
        tools, record = self._tools, self._current()
        if tools.active_key() == record.key:
            # Assigned what already serves (e.g. back to the active version):
            # it passed its check when it was activated.
            self._transition(UpdateState.HEALTH_CHECKED, None)
            return
        version = tools.store.version(record.key)
        if version is None:
            raise Failed(UpdateState.FAILED, EventCode.STORE_CORRUPT,
                         f"staged {record.key} is gone")
        request = HealthRequest(
            model=version.artifact,
            format=verified.variant.format,
            runtime=effective_runtime(tools.profile.runtime, verified.variant),
            spec=verified.variant.health_check,
            key=record.key,
            name=verified.manifest.name,
            version=verified.manifest.version,
            sha256=verified.variant.sha256,
        )
        try:
            result = await tools.health.check(request, self._abort)
        except HealthAborted as exc:
            raise Stopped() from exc
        record = self._current()
        if not result.passed:
            tools.ledger.events.emit(EventType.HEALTH_FAILED, record.assignment_id,
                                     reason=result.reason, code=EventCode.HEALTH_FAILED)
            raise Failed(UpdateState.FAILED, EventCode.HEALTH_FAILED, result.reason)
        log.info("health check of %s passed: %s", record.key, result.details)
        self._transition(UpdateState.HEALTH_CHECKED, EventType.HEALTH_PASSED)

    async def _activate(self) -> None:
        # One synchronous block: nothing can supersede the update between the
        # check that it is current and the pointer swap.
        tools, record = self._tools, self._current()
        tools.store.activate(record.key)
        # Traffic follows the pointer at once: the warm worker that passed the
        # health check takes new requests, in-flight ones finish on the old.
        tools.on_activated()
        tools.ledger.finish(self.update_id, UpdateState.ACTIVATED)
        removed = await asyncio.to_thread(tools.store.gc, tools.config.keep_versions)
        if removed:
            log.info("deleted old versions %s", removed)
