"""The update pipeline: from a signed assignment to an active model, crash-safe.

A persisted state machine (DESIGN.md "Agent")::

    received -> verified -> fit_checked -> downloading -> staged
             -> health_checked -> activated
    or ends rejected / failed / rolled_back

Each transition is one atomic replace of the update record
(:mod:`agent.update.state`) and one event (:mod:`agent.events`). The active
model changes in exactly one place, :meth:`ModelStore.activate`, after the
artifact was verified against the release-signed sha256, installed into its
own versioned directory and health-checked; a failure at any step leaves the
previous model active and serving.

Intake (:meth:`Updater.offer`, called for every ``desired`` message):

- An empty payload (a cleared retained message) is ignored.
- A payload identical to the accepted one is a redelivery (retained
  messages come again on every reconnect): ignored.
- Verification is :func:`protocol.verify_assignment` with the pinned keys,
  the wall clock, the highest sequence ever accepted, the measured hardware
  and the profile's tier. A refusal is a ``rejected(reason)`` event; a
  replayed sequence is reported but does not change what ``hello`` says.
- The same assignment id, release and tier with a higher sequence is the
  director's re-signing before expiry: the new sequence is persisted and
  nothing else happens (no download, no reinstall; an update in progress
  continues).
- Anything else is a new update. ``received`` is reported and not persisted:
  an assignment that was not yet verified when the agent died is verified
  again when the broker redelivers it. A newer assignment arriving while an
  update runs ends that one (``failed``, "superseded") at its next safe
  point; the newest is then taken. Updates run one at a time in
  :meth:`Updater.run`, a task of its own, so heartbeats never wait.

Start-up (:meth:`Updater.start`) makes any crash harmless: staging
leftovers are removed except the partial download of the pending update
(which resumes with ``Range``), the active model is re-hashed after an
unclean stop (and rolled back to the previous version if it fails), an
update that was activated but not yet recorded is recorded, and any other
pending update continues from its persisted state after its payload is
verified again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from protocol import (
    MAX_ASSIGNMENT_BYTES,
    ActiveModel,
    Capabilities,
    EventType,
    ProtocolError,
    ReplayError,
    Tier,
    UpdateState,
    UpdateStatus,
    VerifiedAssignment,
    verify_assignment,
)

from ..config import AgentConfig
from ..errors import ArtifactError, Cancelled, DownloadError, StoreError
from ..events import EventLog
from ..healthcheck import HealthAborted, HealthChecker, HealthRequest, SubprocessHealthChecker
from ..profiles import FirmwareProfile
from ..runtime_settings import effective_runtime
from ..trust import TrustRoots, TrustUnavailable, load_trust
from .recovery import check_active, consume_clean_marker, write_clean_marker
from .staging import StagingError, check_tokenizer, disk_fit, installed_copy, store_manifest
from .state import StateCorrupt, UpdateFile, UpdateRecord, UpdateStateStore
from .store import ModelStore, model_key

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .store import ModelVersion

log = logging.getLogger(__name__)

T = TypeVar("T")

#: start-ups that may find the same update unfinished before it is given up
MAX_RESUMES = 5
#: a downloading event at most every this many percent
PROGRESS_STEP_PCT = 10


class _Stopped(Exception):
    """The running update must stop here: superseded, or the agent is shutting down."""


class _Failed(Exception):
    """The update ends in ``state`` with ``reason``."""

    def __init__(self, state: UpdateState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


def _peek(payload: bytes) -> tuple[str | None, int]:
    """Unverified assignment id and sequence, only to label a rejection."""
    if len(payload) > MAX_ASSIGNMENT_BYTES:
        return None, 0
    try:
        signed = json.loads(payload)["signed"]
        claimed_id, sequence = signed.get("assignment_id"), signed.get("sequence")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, 0
    label = claimed_id[:128] if isinstance(claimed_id, str) and claimed_id else None
    ok_seq = isinstance(sequence, int) and not isinstance(sequence, bool) and sequence >= 0
    return label, sequence if ok_seq else 0


def _in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread; a download blocked on a silent server must
    not hold up interpreter exit (the default executor's threads would)."""
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


class Updater:
    """The device's update pipeline; see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        capabilities: Capabilities,
        profile: FirmwareProfile,
        events: EventLog,
        health: HealthChecker | None = None,
        fetcher_factory: Callable[[], Fetcher] | None = None,
        on_status: Callable[[], None] = lambda: None,
        on_activated: Callable[[ModelVersion], None] = lambda version: None,
    ) -> None:
        self._config = config
        self._caps = capabilities
        self._profile = profile
        self._events = events
        self._health = health or SubprocessHealthChecker(config.health_check_timeout_s)
        self._fetcher_factory = fetcher_factory
        self._on_status = on_status
        self._on_activated = on_activated
        self.store = ModelStore(config.models_path)
        self._state_store = UpdateStateStore(config.update_state_path)
        self._file = UpdateFile()
        #: why updates are refused wholesale (corrupt state); None when they are not
        self._disabled: str | None = None
        self._trust: TrustRoots | None = None
        self._trust_problem: str | None = None
        self._verified: dict[str, VerifiedAssignment] = {}
        self._last_rejected: str | None = None
        self._active: ActiveModel | None = None
        #: an active version that failed its hash with nothing intact to go back to
        self._damaged: str | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._running: str | None = None
        self._abort = asyncio.Event()
        self._cancel = threading.Event()
        self._progress_step = -1

    # -- what hello reports -------------------------------------------------

    def status(self) -> UpdateStatus | None:
        """The latest update's state, for ``hello``."""
        return self._file.status

    def active_model(self) -> ActiveModel | None:
        """The active model as the store records it (None before the first, or if damaged)."""
        return self._active

    def active_ref(self) -> str | None:
        """``name@version`` of the active model, for telemetry."""
        return f"{self._active.name}@{self._active.version}" if self._active else None

    @property
    def highest_sequence(self) -> int:
        """The highest assignment sequence ever accepted."""
        return self._file.highest_sequence

    # -- start-up and shutdown ----------------------------------------------------

    async def start(self) -> None:
        """Recover from whatever the last run left behind; call before :meth:`run`."""
        try:
            self._file = self._state_store.load()
        except StateCorrupt as exc:
            self._disabled = str(exc)
            log.error("updates disabled: %s", exc)
        self._load_trust()
        clean = consume_clean_marker(self._config.state_dir)
        pending = self._pending()
        keep = [pending.key] if pending is not None else []
        await asyncio.to_thread(self.store.clean_staging, keep)
        if not clean:
            await self._check_active()
        # Again: the check may have ended it (its model rolled back).
        pending = self._pending()
        if pending is not None:
            self._reconcile(pending)
        if self._pending() is None and not self._disabled:
            # A crash between an activation and its clean-up leaves an old version behind.
            await asyncio.to_thread(self.store.gc, self._config.keep_versions)
        self._refresh_active()

    def _pending(self) -> UpdateRecord | None:
        current = self._file.current
        if current is None or current.state.is_final or self._disabled:
            return None
        return current

    def _load_trust(self) -> TrustRoots | None:
        try:
            self._trust, self._trust_problem = load_trust(self._config), None
        except TrustUnavailable as exc:
            self._trust, self._trust_problem = None, str(exc)
            log.error("assignments will be refused: %s", exc)
        return self._trust

    async def _check_active(self) -> None:
        check = await asyncio.to_thread(check_active, self.store)
        if check.problem is None:
            return
        if check.active_key is None:
            # Never report (or later fall back to) a model that failed its hash.
            self._damaged = self._active_key()
        current = self._file.current
        affected = current is not None and current.key == check.rolled_back_from
        if check.rolled_back_from is not None:
            assignment_id = current.assignment_id if affected and current else None
            self._events.emit(EventType.ROLLED_BACK, assignment_id, reason=check.problem)
            if affected and current is not None:
                self._save_record(current, UpdateState.ROLLED_BACK, check.problem)
        self._on_status()

    def _reconcile(self, current: UpdateRecord) -> None:
        """Settle what a crash can leave half-recorded before the worker resumes."""
        active = self._active_key()
        if current.state is UpdateState.HEALTH_CHECKED and active == current.key:
            # Crashed between the pointer swap and the record: the swap is what counts.
            self._save_record(current, UpdateState.ACTIVATED, None)
            self._events.emit(EventType.ACTIVATED, current.assignment_id)
            return
        if current.resumes + 1 >= MAX_RESUMES:
            reason = f"crash_loop: interrupted by {current.resumes + 1} restarts"
            self._save_record(current, UpdateState.FAILED, reason)
            self._events.emit(EventType.FAILED, current.assignment_id, reason=reason)
            self.store.clean_staging()
            return
        log.info("resuming %s from %s", current.assignment_id, current.state.value)
        self._save(self._file.model_copy(
            update={"current": current.model_copy(update={"resumes": current.resumes + 1})}
        ))

    def stop(self) -> None:
        """Ask :meth:`run` to return; a running update stops at its next safe point.

        Its persisted state stays as it is, so the next start resumes it.
        """
        self._stopping = True
        self._request_abort()
        self._wake.set()

    def mark_clean_shutdown(self) -> None:
        """Record that this run stopped cleanly (after :meth:`run` returned)."""
        write_clean_marker(self._config.state_dir)

    # -- intake ---------------------------------------------------------------

    async def offer(self, payload: bytes) -> None:
        """Handle one ``desired`` message (module docstring, "Intake")."""
        if not payload:
            log.info("no assignment published (empty desired); keeping the current model")
            return
        digest = hashlib.sha256(payload).hexdigest()
        current = self._file.current
        if (current is not None and digest == current.payload_sha256) or (
            digest == self._last_rejected
        ):
            log.debug("desired redelivered; already handled")
            return
        claimed_id, claimed_seq = _peek(payload)
        if self._disabled:
            self._reject(digest, claimed_id, claimed_seq, f"state_corrupt: {self._disabled}")
            return
        trust = self._trust or self._load_trust()
        if trust is None:
            self._reject(digest, claimed_id, claimed_seq,
                         f"keys_unavailable: {self._trust_problem}")
            return
        try:
            verified = verify_assignment(
                payload,
                device_id=self._config.device_id,
                release_keys=trust.release,
                director_keys=trust.director,
                now=time.time(),
                highest_sequence=self._file.highest_sequence,
                hardware=self._caps,
                device_tier=self._profile.tier,
            )
        except ProtocolError as exc:
            self._reject(digest, claimed_id, claimed_seq, f"{exc.reason}: {exc}",
                         replay=isinstance(exc, ReplayError))
            return
        if current is not None and self._is_refresh(current, verified):
            self._refresh(current, payload, digest, verified)
        else:
            self._accept(payload, digest, verified)

    def _reject(
        self, digest: str, assignment_id: str | None, sequence: int, reason: str,
        *, replay: bool = False,
    ) -> None:
        self._last_rejected = digest
        self._events.emit(EventType.REJECTED, assignment_id, reason=reason)
        if replay:
            # An old assignment replayed says nothing about what this device is doing.
            return
        status = UpdateStatus(
            assignment_id=assignment_id or "unknown",
            sequence=sequence,
            state=UpdateState.REJECTED,
            reason=reason[:1024],
            ts=time.time(),
        )
        self._save(self._file.model_copy(update={"status": status}))
        self._on_status()

    @staticmethod
    def _is_refresh(current: UpdateRecord, verified: VerifiedAssignment) -> bool:
        return (
            current.assignment_id == verified.assignment.assignment_id
            and current.ref == verified.manifest.ref
            and current.tier == verified.tier
            and current.sha256 == verified.variant.sha256
        )

    def _refresh(
        self, current: UpdateRecord, payload: bytes, digest: str, verified: VerifiedAssignment
    ) -> None:
        sequence = verified.assignment.sequence
        record = current.model_copy(update={
            "sequence": sequence,
            "payload": payload.decode(),
            "payload_sha256": digest,
            # Re-verified against this time on resume: the refreshed payload's
            # issued_at may lie past the first acceptance.
            "accepted_at": time.time(),
        })
        status = self._file.status
        if status is not None and status.assignment_id == current.assignment_id:
            status = status.model_copy(update={"sequence": sequence})
        self._save(self._file.model_copy(
            update={"highest_sequence": sequence, "current": record, "status": status}
        ))
        log.info("assignment %s re-signed: sequence %d", current.assignment_id, sequence)
        self._on_status()

    def _accept(self, payload: bytes, digest: str, verified: VerifiedAssignment) -> None:
        assignment, manifest = verified.assignment, verified.manifest
        try:
            key = model_key(manifest.name, manifest.version, verified.tier.value)
        except ValueError as exc:
            self._reject(digest, assignment.assignment_id, assignment.sequence,
                         f"malformed: {exc}")
            return
        now = time.time()
        record = UpdateRecord(
            update_id=uuid.uuid4().hex,
            assignment_id=assignment.assignment_id,
            sequence=assignment.sequence,
            ref=manifest.ref,
            tier=verified.tier,
            key=key,
            sha256=verified.variant.sha256,
            state=UpdateState.VERIFIED,
            ts=now,
            accepted_at=now,
            payload=payload.decode(),
            payload_sha256=digest,
        )
        previous = self._file.current
        self._save(UpdateFile(
            highest_sequence=assignment.sequence, current=record, status=record.status()
        ))
        self._verified = {record.update_id: verified}
        if previous is not None and not previous.state.is_final:
            # It never activates now: its activation re-checks that it is current.
            self._events.emit(
                EventType.FAILED, previous.assignment_id,
                reason=f"superseded: by {assignment.assignment_id} "
                f"(sequence {assignment.sequence})",
            )
            self._request_abort()
        self._events.emit(EventType.RECEIVED, assignment.assignment_id)
        self._events.emit(EventType.VERIFIED, assignment.assignment_id)
        self._wake.set()

    # -- the worker ------------------------------------------------------------

    async def run(self) -> None:
        """Run pending updates one at a time until :meth:`stop`."""
        while not self._stopping:
            current = self._file.current
            if current is not None and not current.state.is_final and not self._disabled:
                await self._run_update(current.update_id)
                continue
            self._wake.clear()
            await self._wake.wait()

    async def _run_update(self, update_id: str) -> None:
        self._running = update_id
        self._abort = asyncio.Event()
        self._cancel = threading.Event()
        self._progress_step = -1
        try:
            await self._steps(update_id)
        except _Stopped:
            log.info("update %s stopped at a safe point", update_id)
        except _Failed as exc:
            with contextlib.suppress(_Stopped):
                self._finish(update_id, exc.state, exc.reason)
        except Exception as exc:
            # A bug or local trouble (disk full, permissions): end it rather
            # than retry forever; the previous model keeps serving.
            log.exception("update %s failed unexpectedly", update_id)
            with contextlib.suppress(_Stopped):
                self._finish(update_id, UpdateState.FAILED, f"internal_error: {exc!r}")
        finally:
            self._running = None
        current = self._file.current
        if (
            current is not None and current.update_id == update_id
            and not current.state.is_final and not self._stopping
        ):
            self._finish(update_id, UpdateState.FAILED, "internal_error: stopped unfinished")

    def _request_abort(self) -> None:
        self._abort.set()
        self._cancel.set()

    def _current(self, update_id: str) -> UpdateRecord:
        """The record of ``update_id``; raises :class:`_Stopped` if it is no longer current."""
        current = self._file.current
        if self._stopping or current is None or current.update_id != update_id:
            raise _Stopped()
        return current

    def _transition(self, update_id: str, state: UpdateState, event: EventType | None) -> None:
        record = self._current(update_id)
        self._save_record(record, state, None)
        if event is not None:
            self._events.emit(event, record.assignment_id)

    def _finish(self, update_id: str, state: UpdateState, reason: str | None) -> None:
        """End the update in a final state: record, report, clean staging, re-publish hello."""
        record = self._current(update_id)
        self._save_record(record, state, reason)
        if state is not UpdateState.ACTIVATED:
            # Nothing is in progress now: no partial or half-built version is worth
            # keeping. Before the event, so whoever sees it sees staging empty.
            self.store.clean_staging()
        event = {
            UpdateState.ACTIVATED: EventType.ACTIVATED,
            UpdateState.REJECTED: EventType.REJECTED,
            UpdateState.ROLLED_BACK: EventType.ROLLED_BACK,
        }.get(state, EventType.FAILED)
        self._events.emit(event, record.assignment_id, reason=reason)
        self._on_status()

    async def _steps(self, update_id: str) -> None:
        record = self._current(update_id)
        verified = self._verified.get(update_id) or self._reverify(record)
        state = record.state
        if state is UpdateState.VERIFIED:
            await self._fit_check(update_id, verified)
            state = UpdateState.FIT_CHECKED
        if state in (UpdateState.FIT_CHECKED, UpdateState.DOWNLOADING):
            await self._stage(update_id, verified)
            state = UpdateState.STAGED
        if state is UpdateState.STAGED:
            await self._health_check(update_id, verified)
            state = UpdateState.HEALTH_CHECKED
        if state is UpdateState.HEALTH_CHECKED:
            await self._activate(update_id)

    def _reverify(self, record: UpdateRecord) -> VerifiedAssignment:
        """Verify a persisted assignment again before resuming it (after a restart).

        Against the clock and sequence it was accepted with: expiring while
        the device was down does not undo an accepted update, but the pinned
        keys of today must still vouch for it.
        """
        trust = self._trust or self._load_trust()
        if trust is None:
            raise _Failed(UpdateState.FAILED, f"keys_unavailable: {self._trust_problem}")
        try:
            verified = verify_assignment(
                record.payload.encode(),
                device_id=self._config.device_id,
                release_keys=trust.release,
                director_keys=trust.director,
                now=record.accepted_at,
                highest_sequence=record.sequence - 1,
                hardware=self._caps,
                device_tier=self._profile.tier,
            )
        except ProtocolError as exc:
            raise _Failed(UpdateState.FAILED, f"{exc.reason}: no longer verifies: {exc}") from exc
        self._verified = {record.update_id: verified}
        return verified

    # -- steps ----------------------------------------------------------------------

    async def _fit_check(self, update_id: str, verified: VerifiedAssignment) -> None:
        record = self._current(update_id)
        # Presence only: identity and hash of an installed copy are checked when staging.
        try:
            installed = self.store.version(record.key) is not None
        except StoreError:
            installed = False
        fit = await asyncio.to_thread(
            disk_fit, self.store, record.key, verified.variant,
            capabilities=self._caps, profile=self._profile, installed=installed,
        )
        self._current(update_id)
        if not fit.result.ok:
            raise _Failed(UpdateState.REJECTED, f"{fit.result.reason}: {fit.result.detail}")
        if fit.needs_gc:
            removed = await asyncio.to_thread(self.store.gc, 0)
            log.info("deleted %s to make room for %s", removed, record.key)
        self._transition(update_id, UpdateState.FIT_CHECKED, EventType.FIT_CHECKED)

    def _installed(self, key: str, verified: VerifiedAssignment) -> bool:
        try:
            return installed_copy(self.store, key, verified) is not None
        except StagingError as exc:
            raise _Failed(UpdateState.FAILED, str(exc)) from exc

    async def _stage(self, update_id: str, verified: VerifiedAssignment) -> None:
        record = self._current(update_id)
        if await asyncio.to_thread(self._installed, record.key, verified):
            # Already in the store (a rollback to the previous version): no download.
            log.info("%s is installed and intact; not downloading", record.key)
        else:
            await self._download(update_id, verified)
            partial = self.store.staging_path(record.key)
            try:
                await asyncio.to_thread(check_tokenizer, partial, verified.variant)
            except StagingError as exc:
                partial.unlink(missing_ok=True)
                raise _Failed(UpdateState.FAILED, str(exc)) from exc
            self._current(update_id)
            await asyncio.to_thread(
                self.store.install, record.key, partial, store_manifest(verified)
            )
        self._transition(update_id, UpdateState.STAGED, EventType.STAGED)

    def _artifact_url(self, verified: VerifiedAssignment) -> str:
        base = verified.assignment.artifact_url_base or self._config.artifact_base_url
        if base is None:
            raise _Failed(UpdateState.FAILED,
                          "no_artifact_url: the assignment names no artifact_url_base "
                          "and artifact_base_url is not configured")
        return f"{base.rstrip('/')}/{verified.variant.artifact}"

    async def _download(self, update_id: str, verified: VerifiedAssignment) -> None:
        record = self._current(update_id)
        variant, config = verified.variant, self._config
        url = self._artifact_url(verified)
        partial = self.store.staging_path(record.key)
        # Leftovers of other updates go; this one's partial stays and resumes.
        await asyncio.to_thread(self.store.clean_staging, [record.key])
        held = partial.stat().st_size if partial.is_file() else 0
        self._transition(update_id, UpdateState.DOWNLOADING, None)
        self._progress(update_id, held, variant.size_bytes)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(self._progress, update_id, done, total)

        # Imported here: httpx costs an idle agent memory it needs only while downloading.
        from .fetcher import HttpFetcher, download_artifact

        factory = self._fetcher_factory or HttpFetcher

        def fetch() -> None:
            fetcher = factory()
            try:
                download_artifact(
                    fetcher, url, partial,
                    expected_size=variant.size_bytes,
                    expected_sha256=variant.sha256,
                    min_bytes_per_s=config.download_min_bytes_per_s,
                    stall_window_s=config.download_stall_window_s,
                    progress=progress,
                    cancel=self._cancel,
                )
            finally:
                close = getattr(fetcher, "close", None)
                if close is not None:
                    close()

        for attempt in range(1, config.download_attempts + 1):
            try:
                await _in_daemon_thread(fetch)
                return
            except Cancelled as exc:
                raise _Stopped() from exc
            except DownloadError as exc:
                self._current(update_id)
                if attempt == config.download_attempts:
                    partial.unlink(missing_ok=True)
                    raise _Failed(UpdateState.FAILED, f"{exc.reason}: {exc}") from exc
                delay = config.download_retry_s * 2 ** (attempt - 1)
                log.warning("download attempt %d failed (%s); retrying in %.1f s",
                            attempt, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._abort.wait(), delay)
                self._current(update_id)
            except ArtifactError as exc:
                # The fetcher deleted the partial: these bytes are no base to resume from.
                raise _Failed(UpdateState.FAILED, f"{exc.reason}: {exc}") from exc
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise _Failed(UpdateState.FAILED, f"disk_error: {exc}") from exc

    def _progress(self, update_id: str, done: int, total: int) -> None:
        """Report download progress, at most one event per PROGRESS_STEP_PCT."""
        current = self._file.current
        if self._running != update_id or current is None or current.update_id != update_id:
            return
        pct = 100.0 * done / total if total else 100.0
        step = int(pct // PROGRESS_STEP_PCT)
        if step <= self._progress_step:
            return
        self._progress_step = step
        self._events.emit(EventType.DOWNLOADING, current.assignment_id,
                          progress_pct=round(min(pct, 100.0), 1))

    async def _health_check(self, update_id: str, verified: VerifiedAssignment) -> None:
        record = self._current(update_id)
        if self._active_key() == record.key:
            # Assigned what already serves (e.g. back to the active version):
            # it passed its check when it was activated.
            self._transition(update_id, UpdateState.HEALTH_CHECKED, None)
            return
        version = self.store.version(record.key)
        if version is None:
            raise _Failed(UpdateState.FAILED, f"store_corrupt: staged {record.key} is gone")
        request = HealthRequest(
            model=version.artifact,
            format=verified.variant.format,
            runtime=effective_runtime(self._profile.runtime, verified.variant),
            spec=verified.variant.health_check,
            key=record.key,
            name=verified.manifest.name,
            version=verified.manifest.version,
            sha256=verified.variant.sha256,
        )
        try:
            result = await self._health.check(request, self._abort)
        except HealthAborted as exc:
            raise _Stopped() from exc
        record = self._current(update_id)
        if not result.passed:
            self._events.emit(EventType.HEALTH_FAILED, record.assignment_id, reason=result.reason)
            raise _Failed(UpdateState.FAILED, f"health_failed: {result.reason}")
        log.info("health check of %s passed: %s", record.key, result.details)
        self._transition(update_id, UpdateState.HEALTH_CHECKED, EventType.HEALTH_PASSED)

    async def _activate(self, update_id: str) -> None:
        # One synchronous block: nothing can supersede the update between the
        # check that it is current and the pointer swap.
        record = self._current(update_id)
        self.store.activate(record.key)
        self._refresh_active()
        # Traffic follows the pointer at once: the warm worker that passed the
        # health check takes new requests, in-flight ones finish on the old.
        self._notify_activated()
        self._finish(update_id, UpdateState.ACTIVATED, None)
        removed = await asyncio.to_thread(self.store.gc, self._config.keep_versions)
        if removed:
            log.info("deleted old versions %s", removed)

    # -- persistence and the active model -------------------------------------------

    def _save(self, state: UpdateFile) -> None:
        if self._disabled:
            return  # never overwrite a record we could not read: it holds the replay floor
        self._state_store.save(state)
        self._file = state

    def _save_record(self, record: UpdateRecord, state: UpdateState, reason: str | None) -> None:
        record = record.model_copy(update={"state": state, "reason": reason, "ts": time.time()})
        self._save(self._file.model_copy(update={"current": record, "status": record.status()}))

    def _notify_activated(self) -> None:
        try:
            version = self.store.active()
        except StoreError as exc:
            log.error("active model unreadable after activation: %s", exc)
            return
        if version is not None:
            self._on_activated(version)

    def _active_key(self) -> str | None:
        try:
            active = self.store.active()
        except StoreError:
            return None
        return active.key if active is not None else None

    def _refresh_active(self) -> None:
        try:
            active = self.store.active()
        except StoreError as exc:
            log.error("active model unreadable: %s", exc)
            active = None
        self._active = None
        if active is None or active.key == self._damaged:
            return
        manifest = active.manifest
        try:
            self._active = ActiveModel(
                name=manifest["name"],
                version=manifest["version"],
                tier=Tier(manifest["tier"]),
                sha256=manifest["sha256"],
            )
        except (KeyError, ValueError) as exc:
            log.error("active model %s has an unusable manifest: %s", active.key, exc)
