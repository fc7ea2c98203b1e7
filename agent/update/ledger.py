"""The update file in memory and on disk, and the event each transition reports.

Every change to what the pipeline remembers goes through :class:`Ledger`:
one atomic replace of the update file (:class:`UpdateStateStore`) per
transition of one model name's record, then the event, which carries that
entry's assignment id. A file that could not be read at start-up is never
overwritten (it holds the replay floor): the ledger is ``disabled`` and
refuses updates until an operator looks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from protocol import EventCode, EventType, UpdateState, UpdateStatus

from ..events import EventLog
from .outcome import Stopped
from .state import EntryRecord, StateCorrupt, UpdateFile, UpdateStateStore
from .stores import ModelStores

log = logging.getLogger(__name__)

#: the event that reports an update ending in each final state (FAILED otherwise)
_FINAL_EVENTS = {
    UpdateState.ACTIVATED: EventType.ACTIVATED,
    UpdateState.REJECTED: EventType.REJECTED,
    UpdateState.ROLLED_BACK: EventType.ROLLED_BACK,
    UpdateState.REMOVED: EventType.REMOVED,
}
#: how far along the pipeline each state is (a document reports its least advanced entry)
_ORDER = [UpdateState.RECEIVED, UpdateState.VERIFIED, UpdateState.FIT_CHECKED,
          UpdateState.WAITING_WINDOW, UpdateState.WAITING_NETWORK, UpdateState.DOWNLOADING,
          UpdateState.STAGED, UpdateState.HEALTH_CHECKED]
#: how a document's entries ended, worst first
_WORST = [UpdateState.FAILED, UpdateState.ROLLED_BACK, UpdateState.REJECTED]


def document_status(file: UpdateFile) -> UpdateStatus | None:
    """What ``hello`` reports as ``update``: the document as a whole.

    A document refused as a whole is reported as such. Otherwise the
    entries it carried: in progress while any is (at the least advanced
    one's state), else ``activated`` when every entry was activated or
    removed, else the worst way one ended, with each such entry's reason.
    A document naming one model (always so in the single-model form)
    reports that entry's own status.
    """
    document = file.document
    if file.status is not None or document is None:
        return file.status
    records = sorted((r for r in file.models.values() if r.sequence == document.sequence),
                     key=lambda r: r.name)
    entries = [r for r in records if not r.remove]
    if len(entries) == 1:
        # The one model it names (the names it dropped are a side effect).
        return entries[0].status(with_model=False)
    pending = [r.state for r in records if not r.state.is_final]
    bad = [r for r in records if r.state in _WORST]
    if pending:
        state = min(pending, key=_ORDER.index)
    elif bad:
        state = min((r.state for r in bad), key=_WORST.index)
    else:
        state = UpdateState.ACTIVATED
    reason = "; ".join(f"{r.name}: {r.reason}" for r in bad if r.reason) or None
    return UpdateStatus(
        assignment_id=f"desired-{document.sequence}",
        sequence=document.sequence,
        state=state,
        reason=reason[:1024] if reason else None,
        ts=max((r.ts for r in records), default=document.accepted_at),
    )


class Ledger:
    """The persisted update file, its transitions and their events."""

    def __init__(
        self,
        state_store: UpdateStateStore,
        events: EventLog,
        stores: ModelStores,
        on_status: Callable[[], None],
    ) -> None:
        self._state_store = state_store
        self.events = events
        self._stores = stores
        self._on_status = on_status
        #: the update file as last saved
        self.file = UpdateFile()
        #: why updates are refused wholesale (unreadable file); None when they are not
        self.disabled: str | None = None
        #: set when the agent stops: no running update is current any more
        self.stopping = False

    def load(self) -> None:
        """Read the persisted file; an unreadable one disables updates."""
        try:
            self.file = self._state_store.load()
        except StateCorrupt as exc:
            self.disabled = str(exc)
            log.error("updates disabled: %s", exc)

    def status_changed(self) -> None:
        """Tell the agent ``hello`` has something new to say."""
        self._on_status()

    def pending(self) -> list[EntryRecord]:
        """The records whose update has not ended (none while updates are disabled)."""
        return [] if self.disabled else self.file.pending()

    def save(self, state: UpdateFile) -> None:
        """Persist ``state`` atomically (never over a file that could not be read)."""
        if self.disabled:
            return  # it holds the replay floor
        self._state_store.save(state)
        self.file = state

    def save_record(self, record: EntryRecord, state: UpdateState, reason: str | None) -> None:
        """Persist ``record`` in ``state`` as its name's record."""
        record = record.model_copy(update={"state": state, "reason": reason, "ts": time.time()})
        self.save(self.file.with_record(record))

    def record(self, name: str, update_id: str) -> EntryRecord:
        """The record of ``name``'s update ``update_id``; raises :class:`Stopped` if it
        is no longer that name's current update (or the agent is stopping)."""
        record = self.file.models.get(name)
        if self.stopping or record is None or record.update_id != update_id:
            raise Stopped()
        return record

    def transition(self, name: str, update_id: str, state: UpdateState,
                   event: EventType | None) -> None:
        """Move ``name``'s update ``update_id`` to ``state`` and report ``event``, if any."""
        record = self.record(name, update_id)
        self.save_record(record, state, None)
        if event is not None:
            self.events.emit(event, record.assignment_id)

    def staged(self, name: str, update_id: str, downloaded_bytes: int) -> None:
        """``name``'s update is staged, having fetched ``downloaded_bytes`` for its artifact."""
        record = self.record(name, update_id).model_copy(
            update={"downloaded_bytes": downloaded_bytes})
        self.save_record(record, UpdateState.STAGED, None)
        self.events.emit(EventType.STAGED, record.assignment_id,
                         downloaded_bytes=downloaded_bytes)

    def finish(
        self,
        name: str,
        update_id: str,
        state: UpdateState,
        reason: str | None = None,
        code: EventCode | None = None,
    ) -> None:
        """End ``name``'s update in a final state: record, clean staging, report."""
        record = self.record(name, update_id)
        self.save_record(record, state, reason)
        if state not in (UpdateState.ACTIVATED, UpdateState.REMOVED):
            # Nothing of this name is in progress now: no partial or half-built
            # version is worth keeping. Before the event, so whoever sees it
            # sees its staging empty.
            self._stores.store(name).clean_staging()
        event = _FINAL_EVENTS.get(state, EventType.FAILED)
        # What the activated version cost the link, where the device sees it whole.
        moved = record.downloaded_bytes if state is UpdateState.ACTIVATED else None
        self.events.emit(event, record.assignment_id, reason=reason, code=code,
                         downloaded_bytes=moved)
        self._on_status()
