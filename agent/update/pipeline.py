"""The update pipeline: from a signed desired set to the active models, crash-safe.

A device runs a set of models; the director signs one document naming all
of them (``slmfleet.assignment/2``; the single-model form reads as a set
of one). Each model name has its own store (:mod:`agent.update.stores`)
and its own persisted state machine (DESIGN.md "Agent")::

    verified -> fit_checked -> downloading -> staged
             -> health_checked -> activated
    or ends rejected / failed / rolled_back / removed

Each transition is one atomic replace of the update file and one event
carrying that entry's assignment id (:mod:`agent.update.ledger`). A name's
active model changes in exactly one place, :meth:`ModelStore.activate`,
after its artifact was verified against the release-signed sha256,
installed into its own versioned directory and health-checked; a failure
at any step leaves that name's previous model active and serving, and the
other names' updates go on.

:class:`Updater` does the I/O around pure decisions and runs the steps:

- Intake (:meth:`Updater.offer`, called for every ``desired`` message):
  :func:`agent.update.intake.decide` says ignore, reject, refresh or
  accept, and what the document means per name (its docstring tables the
  rules). Before an accepted document is saved, the whole set's fit check
  runs (:mod:`agent.update.setfit`): a set that does not fit is refused as
  a whole and nothing changes. A name whose entry changes ends its
  running update (``failed``, "superseded") at its next safe point.
- The worker (:meth:`Updater.run`, a task of its own, so heartbeats never
  wait) runs one entry's steps at a time (:mod:`agent.update.steps`):
  downloads are sequential, but each entry goes from download to
  activation on its own, so one name's bad artifact or failed check does
  not hold up another's activation. Entries that share a ``unit`` are
  activated together once every one passed its health check, or failed
  together. A name that left the set is taken out of service
  (``removed``); its versions stay for a rollback until garbage collection.
- Start-up (:meth:`Updater.start`, :mod:`agent.update.startup`) makes any
  crash harmless, per name.
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
    ActiveBase,
    ActiveModel,
    Capabilities,
    EventCode,
    EventType,
    ProtocolError,
    UpdateState,
    UpdateStatus,
    VerifiedDesired,
    VerifiedEntry,
)

from ..config import AgentConfig
from ..errors import StoreError
from ..events import EventLog
from ..healthcheck import HealthChecker, SubprocessHealthChecker
from ..profiles import FirmwareProfile
from ..trust import TrustRoots, TrustUnavailable, load_trust
from .clock import Clock, SystemClock
from .intake import Action, Change, Decision, DeviceFacts, accepted, decide, refreshed, verify
from .ledger import Ledger, document_status
from .locks import UpdateLocks
from .outcome import Failed, Stopped
from .policy_gate import Hold, PolicyGate
from .recovery import write_clean_marker
from .setfit import PlannedEntry, set_fit
from .startup import recover
from .state import EntryRecord, UpdateStateStore
from .steps import StepTools, UpdateRun, settle_units
from .stores import ModelStores

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .store import ModelVersion

log = logging.getLogger(__name__)

#: model names whose latest updates ``hello`` reports at most
MAX_REPORTED_UPDATES = 8


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
        on_removed: Callable[[str], None] = lambda name: None,
        clock: Clock | None = None,
    ) -> None:
        self._config = config
        self._device = DeviceFacts(config.device_id, capabilities, profile.tier)
        self._profile = profile
        self._events = events
        self._on_activated = on_activated
        self._on_removed = on_removed
        self.stores = ModelStores(config.models_path)
        self._ledger = Ledger(UpdateStateStore(config.update_state_path), events, self.stores,
                              on_status)
        clock = clock or SystemClock()
        #: update locks apps hold through the local API (they defer activations)
        self.locks = UpdateLocks(config.update_locks_path, clock)
        self._tools = StepTools(
            config=config,
            device=self._device,
            profile=profile,
            stores=self.stores,
            ledger=self._ledger,
            health=health or SubprocessHealthChecker(config.health_check_timeout_s),
            fetcher_factory=fetcher_factory,
            active_key=self.active_key,
            on_activated=self._activated,
            protected=self._protected,
            gate=PolicyGate(config, clock, self.locks),
        )
        self._trust: TrustRoots | None = None
        self._trust_problem: str | None = None
        #: the accepted document, verified: (payload sha256, document)
        self._verified: tuple[str, VerifiedDesired] | None = None
        self._last_rejected: str | None = None
        self._active: dict[str, ActiveModel] = {}
        #: active versions that failed their hash with nothing intact to go back to
        self.damaged: set[str] = set()
        self._wake = asyncio.Event()
        self._run: UpdateRun | None = None

    # -- what hello and telemetry report ---------------------------------------

    def status(self) -> UpdateStatus | None:
        """The latest desired-state document's state, for ``hello``'s ``update``."""
        return document_status(self._ledger.file)

    def updates(self) -> list[UpdateStatus]:
        """Each model name's latest update (``model`` set), newest first, for ``hello``."""
        records = sorted(self._ledger.file.models.values(), key=lambda r: r.ts, reverse=True)
        return [r.status() for r in records[:MAX_REPORTED_UPDATES]]

    def active_models(self) -> list[ActiveModel]:
        """Every active model as the stores record them, by name (damaged ones left out)."""
        return [self._active[name] for name in sorted(self._active)]

    def active_model(self) -> ActiveModel | None:
        """The first active model by name (None before the first, or if damaged)."""
        models = self.active_models()
        return models[0] if models else None

    def active_refs(self) -> list[str]:
        """``name@version`` of every active model, for telemetry."""
        return [f"{m.name}@{m.version}" for m in self.active_models()]

    def active_ref(self) -> str | None:
        """``name@version`` of every active model, comma-separated (None when none)."""
        return ", ".join(self.active_refs()) or None

    def active_versions(self) -> list[ModelVersion]:
        """The installed version behind each active model, for serving."""
        versions = []
        for model in self.active_models():
            try:
                version = self.stores.store(model.name).active()
            except StoreError:
                continue
            if version is not None:
                versions.append(version)
        return versions

    @property
    def highest_sequence(self) -> int:
        """The highest desired-state sequence ever accepted."""
        return self._ledger.file.highest_sequence

    # -- start-up and shutdown ----------------------------------------------------

    async def start(self) -> None:
        """Recover from whatever the last run left behind; call before :meth:`run`."""
        self._load_trust()
        await recover(self._config, self.stores, self._ledger, self)
        self.refresh_active()

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

    def stop(self) -> None:
        """Ask :meth:`run` to return; a running update stops at its next safe point.

        Its persisted state stays as it is, so the next start resumes it.
        """
        self._ledger.stopping = True
        if self._run is not None:
            self._run.abort()
        self._wake.set()

    def mark_clean_shutdown(self) -> None:
        """Record that this run stopped cleanly (after :meth:`run` returned)."""
        write_clean_marker(self._config.state_dir)

    # -- intake ---------------------------------------------------------------

    async def offer(self, payload: bytes) -> None:
        """Handle one ``desired`` message (:mod:`agent.update.intake` decides what to do)."""
        if not payload:
            log.info("no assignment published (empty desired); keeping the current models")
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
            active=self.active_bases(),
        )
        if decision.action is Action.IGNORE:
            log.debug("desired redelivered; already handled")
        elif decision.action is Action.REJECT:
            self._reject(decision)
        elif decision.action is Action.REFRESH:
            ledger.save(refreshed(ledger.file, payload, decision, now=time.time()))
            self._keep_verified(decision)
            if self._run is not None and decision.verified is not None:
                fresh = decision.verified.entries.get(self._run.name)
                if fresh is not None:
                    self._run.refresh(fresh)
            log.info("desired set re-signed: sequence %d", decision.sequence)
            ledger.status_changed()
        else:
            await self._accept(payload, decision)

    def _keep_verified(self, decision: Decision) -> None:
        if decision.verified is not None:
            self._verified = (decision.digest, decision.verified)

    def _reject(self, decision: Decision) -> None:
        """Refuse a document as a whole: one event per entry it claims, nothing changes."""
        self._last_rejected = decision.digest
        reason = decision.reason or ""
        for assignment_id in decision.assignment_ids or (None,):
            self._events.emit(EventType.REJECTED, assignment_id, reason=reason,
                              code=decision.code)
        if decision.replay:
            # An old document replayed says nothing about what this device is doing.
            return
        ids = decision.assignment_ids
        status = UpdateStatus(
            assignment_id=ids[0] if len(ids) == 1 else f"desired-{decision.sequence}",
            sequence=decision.sequence,
            state=UpdateState.REJECTED,
            reason=reason[:1024],
            ts=time.time(),
        )
        self._ledger.save(self._ledger.file.model_copy(update={"status": status}))
        self._ledger.status_changed()

    async def _accept(self, payload: bytes, decision: Decision) -> None:
        ledger, previous = self._ledger, self._ledger.file
        planned = [PlannedEntry(plan.name, plan.key, plan.entry) for plan in decision.plans
                   if plan.entry is not None and plan.key is not None]
        needs_gc = False
        if any(plan.change is Change.NEW for plan in decision.plans):
            fit = set_fit(self.stores, planned, capabilities=self._device.capabilities,
                          profile=self._profile, max_loaded=self._max_loaded(),
                          protect=self._protected())
            if not fit.result.ok:
                code = EventCode(fit.result.reason)
                self._reject(Decision(Action.REJECT, decision.digest, decision.assignment_ids,
                                      decision.sequence, code,
                                      f"{code.value}: {fit.result.detail}"))
                return
            needs_gc = fit.needs_gc
        ledger.save(accepted(previous, payload, decision, update_ids=lambda: uuid.uuid4().hex,
                             now=time.time()))
        self._keep_verified(decision)
        for plan in decision.changed():
            old = previous.models.get(plan.name)
            if old is not None and not old.state.is_final:
                # It never activates now: each step re-checks that it is current.
                self._events.emit(
                    EventType.FAILED, old.assignment_id,
                    reason=f"superseded: by {plan.assignment_id} "
                    f"(sequence {decision.sequence})",
                    code=EventCode.SUPERSEDED,
                )
                if self._run is not None and self._run.name == plan.name:
                    self._run.abort()
        for plan in decision.plans:
            if plan.change is Change.NEW:
                for step in (EventType.RECEIVED, EventType.VERIFIED, EventType.FIT_CHECKED):
                    self._events.emit(step, plan.assignment_id)
            elif plan.change is Change.REJECTED:
                self._events.emit(EventType.REJECTED, plan.assignment_id, reason=plan.reason,
                                  code=plan.code)
        if needs_gc:
            removed = await asyncio.to_thread(self.stores.gc, 0, self._protected())
            log.info("deleted %s to make room for the set", removed)
        if any(plan.change is Change.REJECTED for plan in decision.plans):
            ledger.status_changed()
        self._wake.set()

    def _max_loaded(self) -> int | None:
        return getattr(self._config, "max_loaded_models", 0) or None

    def _protected(self) -> dict[str, set[str]]:
        """Versions pending updates still need, by name (kept from garbage collection)."""
        keep: dict[str, set[str]] = {}
        for record in self._ledger.pending():
            if record.key is not None:
                keep.setdefault(record.name, set()).add(record.key)
        return keep

    # -- the worker ------------------------------------------------------------

    async def run(self) -> None:
        """Run pending updates one step sequence at a time until :meth:`stop`."""
        while not self._ledger.stopping:
            try:
                record = self._next()
                if record is not None:
                    await self._run_entry(record)
                    continue
                if settled := await settle_units(self._tools, self._entry):
                    if isinstance(settled, Hold):  # a unit waits for its window or a lock
                        self._wake.clear()
                        await self._tools.gate.wait(settled, self._wake)
                    continue
            except Stopped:
                continue  # superseded or stopping: the loop's condition decides
            self._wake.clear()
            await self._wake.wait()

    def _next(self) -> EntryRecord | None:
        """The first pending update (by name) that can move on by itself."""
        for record in self._ledger.pending():
            if record.remove or record.state is not UpdateState.HEALTH_CHECKED or (
                record.unit is None
            ):
                return record
        return None

    async def _run_entry(self, record: EntryRecord) -> None:
        ledger = self._ledger
        if record.remove:
            await self._remove(record)
            return
        try:
            entry, base = self._entry(record)
        except Failed as exc:
            ledger.finish(record.name, record.update_id, exc.state, exc.reason, exc.code)
            return
        self._run = UpdateRun(self._tools, record, entry, base)
        try:
            await self._run.run()
        finally:
            self._run = None
        current = ledger.file.models.get(record.name)
        waits_for_unit = (current is not None and current.unit is not None
                          and current.state is UpdateState.HEALTH_CHECKED)
        if (
            current is not None and current.update_id == record.update_id
            and not current.state.is_final and not waits_for_unit and not ledger.stopping
        ):
            ledger.finish(record.name, record.update_id, UpdateState.FAILED,
                          "internal_error: stopped unfinished", EventCode.INTERNAL_ERROR)

    def _entry(self, record: EntryRecord) -> tuple[VerifiedEntry, str | None]:
        """The verified entry of ``record``'s name, verifying the document again if needed.

        After a restart the payload is checked against the clock and
        sequence it was accepted with: expiring while the device was down
        does not undo an accepted update, but the pinned keys of today must
        still vouch for it.
        """
        document = self._ledger.file.document
        if document is None:
            raise Failed(UpdateState.FAILED, EventCode.STATE_CORRUPT, "no accepted document")
        if self._verified is None or self._verified[0] != document.payload_sha256:
            trust, problem = self._trust_roots()
            if trust is None:
                raise Failed(UpdateState.FAILED, EventCode.KEYS_UNAVAILABLE, str(problem))
            try:
                verified = verify(document.payload.encode(), self._device, trust,
                                  now=document.accepted_at,
                                  highest_sequence=document.sequence - 1)
            except ProtocolError as exc:
                raise Failed.of(exc, detail=f"no longer verifies: {exc}") from exc
            self._verified = (document.payload_sha256, verified)
        verified = self._verified[1]
        entry = verified.entries.get(record.name)
        if entry is None:
            refused = verified.refused.get(record.name)
            if refused is not None:
                raise Failed.of(refused.error, detail=f"no longer verifies: {refused.error}")
            raise Failed(UpdateState.FAILED, EventCode.MALFORMED,
                         f"the accepted document has no entry {record.name}")
        return entry, verified.artifact_url_base

    async def _remove(self, record: EntryRecord) -> None:
        """Take ``record``'s name out of service; its versions stay until garbage collection."""
        store = self.stores.store(record.name)
        try:
            await asyncio.to_thread(store.deactivate)
        except (StoreError, OSError) as exc:
            log.error("cannot take %s out of service cleanly: %s", record.name, exc)
        self.refresh_active()
        self._on_removed(record.name)
        self._ledger.finish(record.name, record.update_id, UpdateState.REMOVED)

    # -- the active models -------------------------------------------------------------

    def _activated(self, name: str) -> None:
        """``name``'s pointer was just swapped: refresh what hello reports, switch traffic."""
        self.refresh_active()
        try:
            version = self.stores.store(name).active()
        except StoreError as exc:
            log.error("active model %s unreadable after activation: %s", name, exc)
            return
        if version is not None:
            self._on_activated(version)

    def adapter_inactive(self, name: str, reason: str) -> None:
        """Say that adapter ``name`` is installed and active but not served, and why."""
        record = self._ledger.file.models.get(name)
        self._events.emit(EventType.REMOVED, record.assignment_id if record else None,
                          reason=reason, code=EventCode.BASE_MISMATCH)

    def active_bases(self) -> dict[str, ActiveBase]:
        """What each name has active, as an adapter's base is checked against it."""
        return {name: ActiveBase(m.name, m.version, m.sha256) for name, m in self._active.items()}

    def active_key(self, name: str) -> str | None:
        """The key of ``name``'s active version, None when nothing (readable) is active."""
        try:
            active = self.stores.store(name).active()
        except StoreError:
            return None
        return active.key if active is not None else None

    def refresh_active(self) -> None:
        """Read every name's active version again (after a swap, a removal, a rollback)."""
        self._active = {}
        for name, store in self.stores.all():
            try:
                active = store.active()
            except StoreError as exc:
                log.error("active model of %s unreadable: %s", name, exc)
                continue
            if active is None or active.key in self.damaged:
                continue
            model = active_model_of(active)
            if model is not None:
                self._active[name] = model


def active_model_of(version: ModelVersion) -> ActiveModel | None:
    """What ``hello`` says about an installed version (None if its manifest is unusable)."""
    manifest = version.manifest
    try:
        return ActiveModel(name=manifest["name"], version=manifest["version"],
                           tier=manifest["tier"], sha256=manifest["sha256"])
    except (KeyError, ValueError) as exc:
        log.error("active model %s has an unusable manifest: %s", version.key, exc)
        return None
