"""The update record in memory and on disk, and the event each transition reports.

Every change to what the pipeline remembers goes through :class:`Ledger`:
one atomic replace of the update file (:class:`UpdateStateStore`) per
transition, then the event. A record that could not be read at start-up is
never overwritten (it holds the replay floor): the ledger is ``disabled``
and refuses updates until an operator looks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from protocol import EventCode, EventType, UpdateState

from ..events import EventLog
from .outcome import Stopped
from .state import StateCorrupt, UpdateFile, UpdateRecord, UpdateStateStore
from .store import ModelStore

log = logging.getLogger(__name__)

#: the event that reports an update ending in each final state (FAILED otherwise)
_FINAL_EVENTS = {
    UpdateState.ACTIVATED: EventType.ACTIVATED,
    UpdateState.REJECTED: EventType.REJECTED,
    UpdateState.ROLLED_BACK: EventType.ROLLED_BACK,
}


class Ledger:
    """The persisted update file, its transitions and their events."""

    def __init__(
        self,
        state_store: UpdateStateStore,
        events: EventLog,
        store: ModelStore,
        on_status: Callable[[], None],
    ) -> None:
        self._state_store = state_store
        self.events = events
        self._store = store
        self._on_status = on_status
        #: the update file as last saved
        self.file = UpdateFile()
        #: why updates are refused wholesale (unreadable record); None when they are not
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

    def pending(self) -> UpdateRecord | None:
        """The current update if it has not ended (and updates are not disabled)."""
        current = self.file.current
        if current is None or current.state.is_final or self.disabled:
            return None
        return current

    def save(self, state: UpdateFile) -> None:
        """Persist ``state`` atomically (never over a record that could not be read)."""
        if self.disabled:
            return  # it holds the replay floor
        self._state_store.save(state)
        self.file = state

    def save_record(self, record: UpdateRecord, state: UpdateState, reason: str | None) -> None:
        """Persist ``record`` in ``state`` as the current update and ``hello``'s status."""
        record = record.model_copy(update={"state": state, "reason": reason, "ts": time.time()})
        self.save(self.file.model_copy(update={"current": record, "status": record.status()}))

    def current(self, update_id: str) -> UpdateRecord:
        """The record of ``update_id``; raises :class:`Stopped` if it is no longer current."""
        current = self.file.current
        if self.stopping or current is None or current.update_id != update_id:
            raise Stopped()
        return current

    def transition(self, update_id: str, state: UpdateState, event: EventType | None) -> None:
        """Move the current update ``update_id`` to ``state`` and report ``event``, if any."""
        record = self.current(update_id)
        self.save_record(record, state, None)
        if event is not None:
            self.events.emit(event, record.assignment_id)

    def finish(
        self,
        update_id: str,
        state: UpdateState,
        reason: str | None = None,
        code: EventCode | None = None,
    ) -> None:
        """End the update in a final state: record, clean staging, report, re-publish hello."""
        record = self.current(update_id)
        self.save_record(record, state, reason)
        if state is not UpdateState.ACTIVATED:
            # Nothing is in progress now: no partial or half-built version is worth
            # keeping. Before the event, so whoever sees it sees staging empty.
            self._store.clean_staging()
        event = _FINAL_EVENTS.get(state, EventType.FAILED)
        self.events.emit(event, record.assignment_id, reason=reason, code=code)
        self._on_status()
