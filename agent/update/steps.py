"""One model name's update steps, from a verified entry to an active version.

:class:`UpdateRun` takes one entry's update from wherever its persisted
state says it stands::

    fit_checked -> downloading -> staged -> health_checked -> activated

(the fit check of the whole set ran before the document was accepted:
:mod:`agent.update.setfit`).

- **download and stage**: skipped when the exact variant is already
  installed intact; otherwise :mod:`agent.update.download`, the tokenizer
  check, and install into the name's own store, in its own versioned
  directory. The entry's update policy may hold the download first, or
  pause it, for its window or a metered link, and caps its rate
  (:mod:`agent.update.policy_gate`).
- **health check** in the worker that will serve the model.
- **activate**: once the policy's activation window is open and no update
  lock holds it off, the one pointer swap of this name, then old versions are
  cleaned up (every name's, keeping what pending updates need). An entry
  that belongs to a ``unit`` stops after its health check: its unit
  activates once every member passed (:func:`activate_unit`).

Before each step the run checks that its update is still its name's
current one (:meth:`Ledger.record`): a newer document that changes this
name, or a stop, ends it there (:class:`Stopped`), its persisted state
unchanged. A step that cannot succeed raises :class:`Failed`, which ends
this entry's update with its code; the other names' updates go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import (
    EventCode,
    EventType,
    UpdatePolicy,
    UpdateState,
    VerifiedEntry,
    code_from_reason,
)

from ..config import AgentConfig
from ..errors import StoreError
from ..healthcheck import HealthAborted, HealthChecker, HealthRequest
from ..profiles import FirmwareProfile
from ..runtime_settings import effective_runtime
from .adapters import adapter_base
from .download import ArtifactRequest, download_with_retries
from .eval_fetch import FetchedEvalSet, eval_fields, fetch_eval_set, report_evaluation
from .folder import held_bytes, remove_partial
from .intake import DeviceFacts
from .ledger import Ledger
from .outcome import Failed, Stopped
from .policy_gate import Hold, PolicyGate, record_hold
from .staging import StagingError, check_tokenizer, installed_copy, store_manifest
from .state import EntryRecord
from .stores import ModelStores
from .throttle import DownloadHeld

if TYPE_CHECKING:
    from .fetcher import Fetcher

log = logging.getLogger(__name__)

#: a downloading event at most every this many percent
PROGRESS_STEP_PCT = 10


@dataclass(frozen=True, slots=True)
class StepTools:
    """What every run needs of the agent: settings, the device, the stores, the ledger."""

    config: AgentConfig
    device: DeviceFacts
    profile: FirmwareProfile
    stores: ModelStores
    ledger: Ledger
    health: HealthChecker
    fetcher_factory: Callable[[], Fetcher] | None
    #: the name's active version's key, None when nothing (readable) is active
    active_key: Callable[[str], str | None]
    #: called right after a name's pointer swap
    on_activated: Callable[[str], None]
    #: keys each name's pending updates still need (never garbage-collected)
    protected: Callable[[], dict[str, set[str]]]
    #: windows, locks, caps and metered links (:mod:`agent.update.policy_gate`)
    gate: PolicyGate
    #: called with each chunk's size as it arrives, on the download thread
    pace: Callable[[int], None] | None = None


async def activate(tools: StepTools, record: EntryRecord,
                   note: tuple[str, EventCode] | None = None) -> None:
    """Swap ``record``'s name to its version, report it, clean up old versions.

    ``note``: the activated event's reason and code (a lock override).

    One synchronous block up to the event: nothing can supersede the update
    between the caller's check that it is current and the pointer swap.
    """
    assert record.key is not None
    tools.stores.store(record.name).activate(record.key)
    # Traffic follows the pointer at once: the warm worker that passed the
    # health check takes new requests, in-flight ones finish on the old.
    tools.on_activated(record.name)
    tools.ledger.finish(record.name, record.update_id, UpdateState.ACTIVATED,
                        *(note or ()))
    # Every name's, not only this one's: a crash between another name's
    # activation and its clean-up left its old version behind, and start-up
    # collects only once nothing is pending.
    removed = await asyncio.to_thread(tools.stores.gc, tools.config.keep_versions,
                                      tools.protected())
    if removed:
        log.info("deleted old versions %s", removed)


async def activate_unit(tools: StepTools, members: list[EntryRecord]) -> None:
    """Activate every member of a unit, each of which passed its health check.

    The swaps are one per name; a crash between two leaves the rest
    ``health_checked``, and the next start activates them (no member is
    ever given up once one of its unit is active).
    """
    for member in members:
        await activate(tools, tools.ledger.record(member.name, member.update_id))


def _is_adapter(entry_of: Callable[[EntryRecord], tuple[VerifiedEntry, str | None]] | None,
                record: EntryRecord) -> bool:
    if entry_of is None:
        return False
    try:
        return entry_of(record)[0].manifest.adapter_of is not None
    except Failed:
        return False


def _policy(entry_of: Callable[[EntryRecord], tuple[VerifiedEntry, str | None]] | None,
            record: EntryRecord) -> UpdatePolicy | None:
    if entry_of is None:
        return None
    try:
        return entry_of(record)[0].entry.policy
    except Failed:
        return None  # the entry no longer verifies: its own run fails it, not the hold


async def settle_units(
    tools: StepTools,
    entry_of: Callable[[EntryRecord], tuple[VerifiedEntry, str | None]] | None = None,
) -> bool | Hold:
    """Activate or fail each unit whose pending members have all gone as far as alone.

    Members are the records of one document sharing a ``unit``. Once any
    member ended other than activated, the pending ones fail with it; once
    every pending member passed its health check, they are all activated,
    unless a member's policy (its entry, ``entry_of``) holds the activation: then the
    unit waits whole, each member told why, and that hold is returned.
    Otherwise returns whether anything changed.
    """
    ledger = tools.ledger
    units: dict[tuple[str, int], list[EntryRecord]] = {}
    for record in ledger.file.models.values():
        if record.unit is not None and not record.remove:
            units.setdefault((record.unit, record.sequence), []).append(record)
    for (unit, _), members in sorted(units.items()):
        pending = [m for m in members if not m.state.is_final]
        if not pending:
            continue
        broken = next((m for m in members if m.state.is_final
                       and m.state is not UpdateState.ACTIVATED), None)
        if broken is not None:
            for member in pending:
                ledger.finish(
                    member.name, member.update_id, UpdateState.FAILED,
                    f"unit {unit!r}: {broken.name} {broken.state.value}: {broken.reason}",
                    code_from_reason(broken.reason) or EventCode.INTERNAL_ERROR)
            return True
        if all(m.state is UpdateState.HEALTH_CHECKED for m in pending):
            # Bases before the adapters made for them: each adapter then finds its
            # unit's build serving when its name is pointed at it.
            ordered = sorted(pending, key=lambda m: (_is_adapter(entry_of, m), m.name))
            hold = next((h for m in ordered
                         if (h := tools.gate.activation_hold(_policy(entry_of, m))) is not None),
                        None)
            if hold is not None:
                # Members stay health-checked (a unit is settled here, not run
                # alone); their records and events say what holds them.
                kept = dataclasses.replace(hold, state=UpdateState.HEALTH_CHECKED)
                for member in ordered:
                    record_hold(tools.ledger, member, kept)
                return kept
            await activate_unit(tools, ordered)
            return True
    return False


class UpdateRun:
    """One run of one name's update's remaining steps; see the module docstring."""

    def __init__(
        self, tools: StepTools, record: EntryRecord, entry: VerifiedEntry,
        artifact_url_base: str | None,
    ) -> None:
        self._tools = tools
        self.name = record.name
        self.update_id = record.update_id
        self._entry = entry
        self._url_base = artifact_url_base
        self._abort = asyncio.Event()
        #: set when the entry is re-signed while the run waits (:meth:`refresh`)
        self._refreshed = asyncio.Event()
        self._cancel = threading.Event()
        self._progress_step = -1
        self._running = False
        #: the release's evaluation set, verified (fetched before the model)
        self._eval: FetchedEvalSet | None = None
        #: bytes of the artifact this run fetched (every attempt's, resumed ones' new bytes)
        self._fetched = 0

    @property
    def _policy(self) -> UpdatePolicy | None:
        return self._entry.entry.policy

    def refresh(self, entry: VerifiedEntry) -> None:
        """This update's entry, re-signed: take its policy and wake a wait to re-check it."""
        if entry.entry.assignment_id == self._entry.entry.assignment_id:
            self._entry = entry
            self._refreshed.set()

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
            log.info("update %s of %s stopped at a safe point", self.update_id, self.name)
        except Failed as exc:
            with contextlib.suppress(Stopped):
                ledger.finish(self.name, self.update_id, exc.state, exc.reason, exc.code)
        except Exception as exc:
            # A bug or local trouble (disk full, permissions): end it rather
            # than retry forever; the previous model keeps serving.
            log.exception("update %s of %s failed unexpectedly", self.update_id, self.name)
            with contextlib.suppress(Stopped):
                ledger.finish(self.name, self.update_id, UpdateState.FAILED,
                              f"internal_error: {exc!r}", EventCode.INTERNAL_ERROR)
        finally:
            self._running = False

    def _current(self) -> EntryRecord:
        return self._tools.ledger.record(self.name, self.update_id)

    def _transition(self, state: UpdateState, event: EventType | None) -> None:
        self._tools.ledger.transition(self.name, self.update_id, state, event)

    async def _steps(self) -> None:
        record = self._current()
        state = record.state
        if state is UpdateState.VERIFIED:
            # Accepted by an agent from before set fit checks, which had not
            # checked it yet: the set it came in was a set of one.
            self._transition(UpdateState.FIT_CHECKED, EventType.FIT_CHECKED)
            state = UpdateState.FIT_CHECKED
        if state in (UpdateState.FIT_CHECKED, UpdateState.WAITING_WINDOW,
                     UpdateState.WAITING_NETWORK, UpdateState.DOWNLOADING):
            await self._stage()
            state = UpdateState.STAGED
        if state is UpdateState.STAGED:
            await self._health_check()
            state = UpdateState.HEALTH_CHECKED
        if state is UpdateState.HEALTH_CHECKED and record.unit is None:
            # The policy is read at each check: a re-signed entry (an operator's
            # lock override, a new window) replaces it while this run waits.
            gate = self._tools.gate
            if await self._hold(lambda: gate.activation_hold(self._policy)):
                self._transition(UpdateState.HEALTH_CHECKED, None)
            await activate(self._tools, self._current(), gate.override_note(self._policy))

    async def _hold(self, check: Callable[[], Hold | None], *, threaded: bool = False) -> bool:
        """Wait while ``check`` names a hold, recording each new one; True if it held.

        ``threaded``: ask in a thread (asking NetworkManager runs a subprocess).
        """
        held = False
        while (hold := await asyncio.to_thread(check) if threaded else check()) is not None:
            record_hold(self._tools.ledger, self._current(), hold)
            held = True
            await self._tools.gate.wait(hold, self._abort, self._refreshed)
            self._refreshed.clear()
            self._current()
        return held

    # -- download and stage ---------------------------------------------------------

    def _installed(self, key: str) -> bool:
        try:
            return installed_copy(self._tools.stores.store(self.name), key, self._entry) is not None
        except StagingError as exc:
            raise Failed.of(exc) from exc

    async def _stage(self) -> None:
        store, record = self._tools.stores.store(self.name), self._current()
        assert record.key is not None
        await self._fetch_eval(record.key)
        if await asyncio.to_thread(self._installed, record.key):
            # Already in the store (a rollback to the previous version): no download.
            log.info("%s is installed and intact; not downloading", record.key)
            self._fetched = 0
        else:
            await self._download(record.key)
            partial = store.staging_path(record.key)
            try:
                await asyncio.to_thread(check_tokenizer, partial, self._entry.variant)
            except StagingError as exc:
                await asyncio.to_thread(remove_partial, partial)
                raise Failed.of(exc) from exc
            self._current()
            await asyncio.to_thread(store.install, record.key, partial,
                                    store_manifest(self._entry))
        self._tools.ledger.staged(self.name, self.update_id, self._fetched)

    def _artifact_base(self) -> str:
        base = self._url_base or self._tools.config.artifact_base_url
        if base is None:
            raise Failed(UpdateState.FAILED, EventCode.NO_ARTIFACT_URL,
                         "the assignment names no artifact_url_base "
                         "and artifact_base_url is not configured")
        return base

    def _artifact_url(self) -> str:
        return f"{self._artifact_base().rstrip('/')}/{self._entry.variant.artifact}"

    async def _fetch_eval(self, key: str) -> None:
        """The release's evaluation set, verified against its pin (before the model's bytes)."""
        if self._eval is not None or self._entry.manifest.eval_set is None:
            return
        tools = self._tools
        self._eval = await fetch_eval_set(
            self._entry, self._artifact_base(), key=key, config=tools.config,
            stores=tools.stores, fetcher_factory=tools.fetcher_factory, cancel=self._cancel,
            abort=self._abort, still_current=self._current)

    async def _download(self, key: str) -> None:
        tools, variant = self._tools, self._entry.variant
        store = tools.stores.store(self.name)
        request = ArtifactRequest(
            url=self._artifact_url(),
            partial=store.staging_path(key),
            size=variant.size_bytes,
            sha256=variant.sha256,
            # A folder: each file from <url>/<path> into the partial folder.
            files=None if variant.files is None else tuple(variant.files),
        )
        # Leftovers of this name's other updates go; this one's partial stays and resumes.
        await asyncio.to_thread(store.clean_staging, [key])
        if request.partial.exists() and request.partial.is_dir() != variant.is_folder:
            # A file where a folder's files go, or the reverse: no base to resume from.
            await asyncio.to_thread(remove_partial, request.partial)
        gate = tools.gate
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(self._progress, done, total)

        while True:
            await self._hold(lambda: gate.download_hold(self._policy), threaded=True)
            held = await asyncio.to_thread(held_bytes, request.partial)
            self._transition(UpdateState.DOWNLOADING, None)
            self._progress(held, variant.size_bytes)
            try:
                await download_with_retries(
                    request,
                    config=gate.download_config(self._policy),
                    fetcher_factory=gate.fetcher_factory(tools.fetcher_factory, self._policy,
                                                         self._cancel),
                    progress=progress,
                    cancel=self._cancel,
                    abort=self._abort,
                    still_current=self._current,
                    pace=self._pace,
                )
                return
            except DownloadHeld as exc:
                # The partial keeps its bytes: the next attempt resumes with Range.
                log.info("download of %s paused: %s", key, exc.reason)

    def _pace(self, nbytes: int) -> None:
        """Count each chunk as it arrives (on the download thread), then pace it."""
        self._fetched += nbytes
        if self._tools.pace is not None:
            self._tools.pace(nbytes)

    def _progress(self, done: int, total: int) -> None:
        """Report download progress, at most one event per PROGRESS_STEP_PCT."""
        current = self._tools.ledger.file.models.get(self.name)
        if not self._running or current is None or current.update_id != self.update_id:
            return
        pct = 100.0 * done / total if total else 100.0
        step = int(pct // PROGRESS_STEP_PCT)
        if step <= self._progress_step:
            return
        self._progress_step = step
        self._tools.ledger.events.emit(EventType.DOWNLOADING, current.assignment_id,
                                       progress_pct=round(min(pct, 100.0), 1))

    # -- health check ----------------------------------------------------------------

    async def _health_check(self) -> None:
        tools, record, entry = self._tools, self._current(), self._entry
        if tools.active_key(self.name) == record.key:
            # Assigned what already serves (e.g. back to the active version):
            # it passed its check when it was activated.
            self._transition(UpdateState.HEALTH_CHECKED, None)
            return
        assert record.key is not None
        try:
            version = tools.stores.store(self.name).version(record.key)
        except StoreError:
            version = None
        if version is None:
            raise Failed(UpdateState.FAILED, EventCode.STORE_CORRUPT,
                         f"staged {record.key} is gone")
        await self._fetch_eval(record.key)
        request = HealthRequest(
            model=version.artifact,
            format=entry.variant.format,
            runtime=effective_runtime(tools.profile.runtime, entry.variant),
            spec=entry.variant.health_check,
            key=record.key,
            name=entry.manifest.name,
            version=entry.manifest.version,
            sha256=entry.variant.sha256,
            adapter_of=adapter_base(entry),
            **eval_fields(self._eval, tools.stores.store(self.name)),
        )
        try:
            result = await tools.health.check(request, self._abort)
        except HealthAborted as exc:
            raise Stopped() from exc
        record = self._current()
        report_evaluation(tools.ledger.events, record.assignment_id, self._eval, result)
        if not result.passed:
            tools.ledger.events.emit(EventType.HEALTH_FAILED, record.assignment_id,
                                     reason=result.reason, code=EventCode.HEALTH_FAILED)
            raise Failed(UpdateState.FAILED, EventCode.HEALTH_FAILED, result.reason)
        log.info("health check of %s passed: %s", record.key, result.details)
        self._transition(UpdateState.HEALTH_CHECKED, EventType.HEALTH_PASSED)
