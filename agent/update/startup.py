"""Start-up: make whatever the last run left behind harmless, name by name.

In order, before anything is served or connected:

1. the single-store layout of an older agent becomes per-name stores
   (:meth:`ModelStores.migrate`, idempotent if killed halfway), and the
   update file of the single-model form is read into its per-name form;
2. staging leftovers are removed, except the partial downloads of pending
   updates (they resume with ``Range``);
3. after an unclean stop, every name's active version is hashed again and
   rolled back to its previous version if it fails
   (:mod:`agent.update.recovery`);
4. each pending update is settled: one activated but not yet recorded is
   recorded (the pointer swap is what counts), one interrupted by too many
   restarts is given up (``crash_loop``), any other resumes;
5. with nothing pending, old versions are garbage-collected (a crash
   between an activation and its clean-up leaves one behind).

So after a kill -9 at any point each name serves its old or its new
version, whole, never neither.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from protocol import EventCode, EventType, UpdateState

from ..config import AgentConfig
from .ledger import Ledger
from .recovery import check_active, consume_clean_marker
from .state import EntryRecord
from .stores import ModelStores

if TYPE_CHECKING:
    from .pipeline import Updater

log = logging.getLogger(__name__)

#: start-ups that may find the same update unfinished before it is given up
MAX_RESUMES = 5


async def recover(config: AgentConfig, stores: ModelStores, ledger: Ledger,
                  updater: Updater) -> None:
    """Run the start-up steps of the module docstring."""
    # hello reports the free disk of the models' filesystem from the start.
    stores.root.mkdir(parents=True, exist_ok=True)
    moved = await asyncio.to_thread(stores.migrate)
    if moved:
        log.info("moved %s into per-name model stores", moved)
    ledger.load()
    clean = consume_clean_marker(config.state_dir)
    keep = {r.name: [r.key] for r in ledger.pending() if r.key is not None}
    await asyncio.to_thread(stores.clean_staging, keep)
    if not clean:
        await _check_actives(stores, ledger, updater)
    # Again: a check may have ended one (its model rolled back).
    for record in ledger.pending():
        _reconcile(record, stores, ledger, updater)
    if not ledger.pending() and not ledger.disabled:
        await asyncio.to_thread(stores.gc, config.keep_versions)


async def _check_actives(stores: ModelStores, ledger: Ledger, updater: Updater) -> None:
    for name, store in stores.all():
        check = await asyncio.to_thread(check_active, store)
        if check.problem is None:
            continue
        if check.active_key is None:
            # Never report (or later fall back to) a model that failed its hash.
            damaged = updater.active_key(name)
            if damaged is not None:
                updater.damaged.add(damaged)
        record = ledger.file.models.get(name)
        affected = record is not None and record.key == check.rolled_back_from
        if check.rolled_back_from is not None:
            assignment_id = record.assignment_id if affected and record else None
            ledger.events.emit(EventType.ROLLED_BACK, assignment_id, reason=check.problem,
                               code=EventCode.ACTIVE_BROKEN)
            if affected and record is not None:
                ledger.save_record(record, UpdateState.ROLLED_BACK, check.problem)
        ledger.status_changed()


def _reconcile(record: EntryRecord, stores: ModelStores, ledger: Ledger,
               updater: Updater) -> None:
    """Settle what a crash can leave half-recorded before the worker resumes."""
    if (record.state is UpdateState.HEALTH_CHECKED and not record.remove
            and updater.active_key(record.name) == record.key):
        # Crashed between the pointer swap and the record: the swap is what counts.
        ledger.save_record(record, UpdateState.ACTIVATED, None)
        ledger.events.emit(EventType.ACTIVATED, record.assignment_id)
        return
    if record.resumes + 1 >= MAX_RESUMES:
        reason = f"crash_loop: interrupted by {record.resumes + 1} restarts"
        ledger.save_record(record, UpdateState.FAILED, reason)
        ledger.events.emit(EventType.FAILED, record.assignment_id, reason=reason,
                           code=EventCode.CRASH_LOOP)
        stores.store(record.name).clean_staging()
        return
    log.info("resuming %s of %s from %s", record.assignment_id, record.name, record.state.value)
    ledger.save(ledger.file.with_record(record.model_copy(update={"resumes": record.resumes + 1})))
