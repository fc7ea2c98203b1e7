"""The update pipeline's persisted record: one JSON file, replaced atomically per transition.

Everything the pipeline must remember across a kill -9 lives in one file, so
one atomic write (temp, fsync, rename, fsync dir: :mod:`agent.atomic`)
moves it from one consistent state to the next:

- ``highest_sequence``: the highest desired-state sequence ever accepted.
  It only grows; replaying a lower or equal one is refused even after a
  restart (DESIGN.md "Trust: two signatures").
- ``document``: the newest accepted desired-state document, once, with the
  payload exactly as received, so a restarted agent can verify it again
  and pick every entry up where it stopped.
- ``models``: one :class:`EntryRecord` per model name, each with its own
  state machine (``verified -> fit_checked -> downloading -> staged ->
  health_checked -> activated``, or ``failed`` / ``rejected`` /
  ``rolled_back``; ``removed`` when the name left the set).
- ``status``: a newer document that was refused as a whole (what ``hello``
  reports as ``update`` until another is accepted).

Keeping the sequence and the records in one file matters: written apart, a
crash between the two writes could leave the sequence raised without the
records that explain it, and the retained document would then be refused
as a replay forever.

A file that exists but does not parse is not replaced with a fresh one: that
would reset ``highest_sequence`` and reopen replay. The agent refuses
updates instead, until an operator looks (:class:`StateCorrupt`). A file in
the single-model form (``slmfleet.agent-update/1``) is read and migrated:
its one record becomes its model name's record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import Tier, UpdateState, UpdateStatus

from ..atomic import ensure_dir, read_json, write_bytes_atomic

SCHEMA = "slmfleet.agent-update/2"
SCHEMA_V1 = "slmfleet.agent-update/1"

NonNegInt = Annotated[int, Field(ge=0)]


class StateCorrupt(Exception):
    """The persisted update record exists but cannot be read."""

    reason = "state_corrupt"


class EntryRecord(BaseModel):
    """One model name's latest entry and where its update stands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the model name (the store and the local API know it by this)
    name: str
    #: local id of this entry's update; a re-signed refresh keeps it, a change gets a new one
    update_id: str
    #: the entry's assignment id (the events about this name carry it)
    assignment_id: str
    #: the sequence of the document that last carried this entry
    sequence: NonNegInt
    #: ``name@version`` of the release; None for a removal
    ref: str | None = None
    tier: Tier | None = None
    #: the model store key ``name@version-tier``; None for a removal
    key: str | None = None
    #: sha256 of the variant's artifact, as the release signed it
    sha256: str | None = None
    #: entries sharing a unit activate together or not at all
    unit: str | None = None
    #: this update takes the name out of service (the name left the set)
    remove: bool = False
    state: UpdateState
    reason: str | None = None
    #: time of the last transition
    ts: float
    #: start-ups that found this update unfinished; bounds a crash loop
    resumes: NonNegInt = 0
    #: bytes fetched over the network for the artifact, set once it is staged
    #: (0: an installed copy was reused)
    downloaded_bytes: NonNegInt | None = None

    def status(self, *, with_model: bool = True) -> UpdateStatus:
        """This record as ``hello`` reports it (``model`` set in ``updates``)."""
        return UpdateStatus(
            model=self.name[:128] if with_model else None,
            assignment_id=self.assignment_id[:128],
            sequence=self.sequence,
            ref=self.ref[:128] if self.ref else None,
            state=self.state,
            reason=self.reason[:1024] if self.reason else None,
            ts=self.ts,
            downloaded_bytes=self.downloaded_bytes,
        )


class DocumentRecord(BaseModel):
    """The newest accepted desired-state document, as received."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sequence: NonNegInt
    #: the ``desired`` payload as received (canonical JSON text) and its sha256
    payload: str
    payload_sha256: str
    #: when it was verified; the clock it is verified again against on resume
    accepted_at: float
    #: in the single-model form (``slmfleet.assignment/1``)
    legacy: bool = False


class UpdateFile(BaseModel):
    """The whole persisted file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["slmfleet.agent-update/2"] = Field(SCHEMA, alias="schema")
    highest_sequence: NonNegInt = 0
    document: DocumentRecord | None = None
    models: dict[str, EntryRecord] = {}
    #: a newer document refused as a whole; None once another is accepted
    status: UpdateStatus | None = None

    def pending(self) -> list[EntryRecord]:
        """The records whose update has not ended, by name."""
        return [r for _, r in sorted(self.models.items()) if not r.state.is_final]

    def with_record(self, record: EntryRecord) -> UpdateFile:
        """This file with ``record`` as its name's record."""
        return self.model_copy(update={"models": {**self.models, record.name: record}})


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """The single-model file (``slmfleet.agent-update/1``) in this form."""
    current = data.get("current")
    out: dict[str, Any] = {"schema": SCHEMA, "highest_sequence": data.get("highest_sequence", 0)}
    status = data.get("status")
    if not isinstance(current, dict):
        out["status"] = status
        return out
    name = str(current.get("ref", "")).partition("@")[0]
    out["document"] = {
        "sequence": current.get("sequence"),
        "payload": current.get("payload"),
        "payload_sha256": current.get("payload_sha256"),
        "accepted_at": current.get("accepted_at"),
        "legacy": True,
    }
    record = {k: v for k, v in current.items()
              if k not in ("payload", "payload_sha256", "accepted_at")}
    out["models"] = {name: {**record, "name": name}}
    if isinstance(status, dict) and status.get("assignment_id") != current.get("assignment_id"):
        out["status"] = status  # a newer assignment was refused
    return out


class UpdateStateStore:
    """Load and atomically replace the record at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> UpdateFile:
        """The persisted record, or an empty one if none was ever written.

        Raises :class:`StateCorrupt` when the file exists but is unreadable.
        """
        try:
            data = read_json(self.path)
        except (OSError, ValueError) as exc:
            raise StateCorrupt(f"update state {self.path} is unreadable: {exc}") from exc
        if data is None:
            return UpdateFile()
        if isinstance(data, dict) and data.get("schema") == SCHEMA_V1:
            data = _migrate_v1(data)
        try:
            return UpdateFile.model_validate(data)
        except ValidationError as exc:
            raise StateCorrupt(f"update state {self.path} is invalid: {exc}") from exc

    def save(self, state: UpdateFile) -> None:
        """Replace the record durably: a crash leaves the old one or this one."""
        ensure_dir(self.path.parent)
        data = state.model_dump_json(by_alias=True, indent=1).encode() + b"\n"
        write_bytes_atomic(self.path, data)
