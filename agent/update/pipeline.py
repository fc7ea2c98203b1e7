"""The update pipeline: from a signed assignment to an active model, crash-safe.

A persisted state machine (DESIGN.md "Agent")::

    received -> verified -> fit_checked -> downloading -> staged
             -> health_checked -> activated
    or ends rejected / failed / rolled_back

Each transition is one atomic replace of the update record and one event
(:mod:`agent.update.ledger`). The active model changes in exactly one place,
:meth:`ModelStore.activate`, after the artifact was verified against the
release-signed sha256, installed into its own versioned directory and
health-checked; a failure at any step leaves the previous model active and
serving.

:class:`Updater` does the I/O around pure decisions and runs the steps:

- Intake (:meth:`Updater.offer`, called for every ``desired`` message):
  :func:`agent.update.intake.decide` says ignore, reject, refresh or accept
  (its docstring tables the rules); the updater loads the pinned keys,
  persists the outcome and reports it. ``received`` is reported and not
  persisted: an assignment that was not yet verified when the agent died is
  verified again when the broker redelivers it. A newer assignment arriving
  while an update runs ends that one (``failed``, "superseded") at its next
  safe point; the newest is then taken.
- The steps (:mod:`agent.update.steps`) run one update at a time in
  :meth:`Updater.run`, a task of its own, so heartbeats never wait; the
  download with its retries is :mod:`agent.update.download`.
- Start-up (:meth:`Updater.start`) makes any crash harmless: staging
  leftovers are removed except the partial download of the pending update
  (which resumes with ``Range``), the active model is re-hashed after an
  unclean stop (:mod:`agent.update.recovery`; rolled back to the previous
  version if it fails), an update that was activated but not yet recorded
  is recorded, and any other pending update continues from its persisted
  state after its payload is verified again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol import (
    ActiveModel,
    Capabilities,
    EventCode,
    EventType,
    Tier,
    UpdateState,
    UpdateStatus,
    VerifiedAssignment,
)

from ..config import AgentConfig
from ..errors import StoreError
from ..events import EventLog
from ..healthcheck import HealthChecker, SubprocessHealthChecker
from ..profiles import FirmwareProfile
from ..trust import TrustRoots, TrustUnavailable, load_trust
from .intake import Action, Decision, DeviceFacts, accepted, decide, refreshed
from .ledger import Ledger
from .recovery import check_active, consume_clean_marker, write_clean_marker
from .state import UpdateRecord, UpdateStateStore
from .steps import StepTools, UpdateRun
from .store import ModelStore

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .store import ModelVersion

log = logging.getLogger(__name__)

#: start-ups that may find the same update unfinished before it is given up
MAX_RESUMES = 5


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
        self._device = DeviceFacts(config.device_id, capabilities, profile.tier)
        self._events = events
        self._on_activated = on_activated
        self.store = ModelStore(config.models_path)
        self._ledger = Ledger(UpdateStateStore(config.update_state_path), events, self.store,
                              on_status)
        self._tools = StepTools(
            config=config,
            device=self._device,
            profile=profile,
            store=self.store,
            ledger=self._ledger,
            health=health or SubprocessHealthChecker(config.health_check_timeout_s),
            fetcher_factory=fetcher_factory,
            trust=self._trust_roots,
            active_key=self._active_key,
            on_activated=self._activated,
        )
        self._trust: TrustRoots | None = None
        self._trust_problem: str | None = None
        self._verified: dict[str, VerifiedAssignment] = {}
        self._last_rejected: str | None = None
        self._active: ActiveModel | None = None
        #: an active version that failed its hash with nothing intact to go back to
        self._damaged: str | None = None
        self._wake = asyncio.Event()
        self._run: UpdateRun | None = None

    # -- what hello reports -------------------------------------------------

    def status(self) -> UpdateStatus | None:
        """The latest update's state, for ``hello``."""
        return self._ledger.file.status

    def active_model(self) -> ActiveModel | None:
        """The active model as the store records it (None before the first, or if damaged)."""
        return self._active

    def active_ref(self) -> str | None:
        """``name@version`` of the active model, for telemetry."""
        return f"{self._active.name}@{self._active.version}" if self._active else None

    @property
    def highest_sequence(self) -> int:
        """The highest assignment sequence ever accepted."""
        return self._ledger.file.highest_sequence

    # -- start-up and shutdown ----------------------------------------------------

    async def start(self) -> None:
        """Recover from whatever the last run left behind; call before :meth:`run`."""
        ledger = self._ledger
        ledger.load()
        self._load_trust()
        clean = consume_clean_marker(self._config.state_dir)
        pending = ledger.pending()
        keep = [pending.key] if pending is not None else []
        await asyncio.to_thread(self.store.clean_staging, keep)
        if not clean:
            await self._check_active()
        # Again: the check may have ended it (its model rolled back).
        pending = ledger.pending()
        if pending is not None:
            self._reconcile(pending)
        if ledger.pending() is None and not ledger.disabled:
            # A crash between an activation and its clean-up leaves an old version behind.
            await asyncio.to_thread(self.store.gc, self._config.keep_versions)
        self._refresh_active()

    def _load_trust(self) -> TrustRoots | None:
        try:
            self._trust, self._trust_problem = load_trust(self._config), None
        except TrustUnavailable as exc:
            self._trust, self._trust_problem = None, str(exc)
            log.error("assignments will be refused: %s", exc)
        return self._trust

    def _trust_roots(self) -> tuple[TrustRoots | None, str | None]:
        """The pinned keys, loaded again if they were missing (an operator may have fixed them)."""
        trust = self._trust or self._load_trust()
        return trust, self._trust_problem

    async def _check_active(self) -> None:
        check = await asyncio.to_thread(check_active, self.store)
        if check.problem is None:
            return
        if check.active_key is None:
            # Never report (or later fall back to) a model that failed its hash.
            self._damaged = self._active_key()
        current = self._ledger.file.current
        affected = current is not None and current.key == check.rolled_back_from
        if check.rolled_back_from is not None:
            assignment_id = current.assignment_id if affected and current else None
            self._events.emit(EventType.ROLLED_BACK, assignment_id, reason=check.problem,
                              code=EventCode.ACTIVE_BROKEN)
            if affected and current is not None:
                self._ledger.save_record(current, UpdateState.ROLLED_BACK, check.problem)
        self._ledger.status_changed()

    def _reconcile(self, current: UpdateRecord) -> None:
        """Settle what a crash can leave half-recorded before the worker resumes."""
        ledger, active = self._ledger, self._active_key()
        if current.state is UpdateState.HEALTH_CHECKED and active == current.key:
            # Crashed between the pointer swap and the record: the swap is what counts.
            ledger.save_record(current, UpdateState.ACTIVATED, None)
            self._events.emit(EventType.ACTIVATED, current.assignment_id)
            return
        if current.resumes + 1 >= MAX_RESUMES:
            reason = f"crash_loop: interrupted by {current.resumes + 1} restarts"
            ledger.save_record(current, UpdateState.FAILED, reason)
            self._events.emit(EventType.FAILED, current.assignment_id, reason=reason,
                              code=EventCode.CRASH_LOOP)
            self.store.clean_staging()
            return
        log.info("resuming %s from %s", current.assignment_id, current.state.value)
        ledger.save(ledger.file.model_copy(
            update={"current": current.model_copy(update={"resumes": current.resumes + 1})}
        ))

    def stop(self) -> None:
        """Ask :meth:`run` to return; a running update stops at its next safe point.

        Its persisted state stays as it is, so the next start resumes it.
        """
        self._ledger.stopping = True
        self._request_abort()
        self._wake.set()

    def mark_clean_shutdown(self) -> None:
        """Record that this run stopped cleanly (after :meth:`run` returned)."""
        write_clean_marker(self._config.state_dir)

    # -- intake ---------------------------------------------------------------

    async def offer(self, payload: bytes) -> None:
        """Handle one ``desired`` message (:mod:`agent.update.intake` decides what to do)."""
        if not payload:
            log.info("no assignment published (empty desired); keeping the current model")
            return
        ledger = self._ledger
        trust, trust_problem = (None, None) if ledger.disabled else self._trust_roots()
        decision = decide(
            payload,
            hashlib.sha256(payload).hexdigest(),
            device=self._device,
            trust=trust,
            trust_problem=trust_problem,
            record=ledger.file,
            last_rejected=self._last_rejected,
            disabled=ledger.disabled,
            now=time.time(),
        )
        if decision.action is Action.IGNORE:
            log.debug("desired redelivered; already handled")
        elif decision.action is Action.REJECT:
            self._reject(decision)
        elif decision.action is Action.REFRESH:
            ledger.save(refreshed(ledger.file, payload, decision, now=time.time()))
            log.info("assignment %s re-signed: sequence %d", decision.assignment_id,
                     decision.sequence)
            ledger.status_changed()
        else:
            self._accept(payload, decision)

    def _reject(self, decision: Decision) -> None:
        self._last_rejected = decision.digest
        reason = decision.reason or ""
        self._events.emit(EventType.REJECTED, decision.assignment_id, reason=reason,
                          code=decision.code)
        if decision.replay:
            # An old assignment replayed says nothing about what this device is doing.
            return
        status = UpdateStatus(
            assignment_id=decision.assignment_id or "unknown",
            sequence=decision.sequence,
            state=UpdateState.REJECTED,
            reason=reason[:1024],
            ts=time.time(),
        )
        self._ledger.save(self._ledger.file.model_copy(update={"status": status}))
        self._ledger.status_changed()

    def _accept(self, payload: bytes, decision: Decision) -> None:
        ledger, previous = self._ledger, self._ledger.file.current
        update_id = uuid.uuid4().hex
        ledger.save(accepted(payload, decision, update_id=update_id, now=time.time()))
        if decision.verified is not None:
            self._verified = {update_id: decision.verified}
        if previous is not None and not previous.state.is_final:
            # It never activates now: its activation re-checks that it is current.
            self._events.emit(
                EventType.FAILED, previous.assignment_id,
                reason=f"superseded: by {decision.assignment_id} "
                f"(sequence {decision.sequence})",
                code=EventCode.SUPERSEDED,
            )
            self._request_abort()
        self._events.emit(EventType.RECEIVED, decision.assignment_id)
        self._events.emit(EventType.VERIFIED, decision.assignment_id)
        self._wake.set()

    # -- the worker ------------------------------------------------------------

    async def run(self) -> None:
        """Run pending updates one at a time until :meth:`stop`."""
        while not self._ledger.stopping:
            pending = self._ledger.pending()
            if pending is not None:
                await self._run_update(pending.update_id)
                continue
            self._wake.clear()
            await self._wake.wait()

    async def _run_update(self, update_id: str) -> None:
        ledger = self._ledger
        self._run = UpdateRun(self._tools, update_id, self._verified.get(update_id))
        try:
            await self._run.run()
        finally:
            if self._run.verified is not None:
                self._verified = {update_id: self._run.verified}
            self._run = None
        current = ledger.file.current
        if (
            current is not None and current.update_id == update_id
            and not current.state.is_final and not ledger.stopping
        ):
            ledger.finish(update_id, UpdateState.FAILED, "internal_error: stopped unfinished",
                          EventCode.INTERNAL_ERROR)

    def _request_abort(self) -> None:
        if self._run is not None:
            self._run.abort()

    # -- the active model -------------------------------------------------------------

    def _activated(self) -> None:
        """The pointer was just swapped: refresh what hello reports and switch traffic."""
        self._refresh_active()
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
