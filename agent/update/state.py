"""The update pipeline's persisted record: one JSON file, replaced atomically per transition.

Everything the pipeline must remember across a kill -9 lives in one file, so
one atomic write (temp, fsync, rename, fsync dir: :mod:`agent.atomic`)
moves it from one consistent state to the next:

- ``highest_sequence``: the highest assignment sequence ever accepted. It
  only grows; replaying a lower or equal one is refused even after a restart
  (DESIGN.md "Trust: two signatures").
- ``current``: the newest accepted assignment and where its update stands,
  with the payload exactly as received, so a restarted agent can re-verify it
  and pick the update up where it stopped.
- ``status``: what ``hello`` reports as ``update``: the current update, or a
  newer assignment that was refused.

Keeping the sequence and the record in one file matters: written apart, a
crash between the two writes could leave the sequence raised without the
record that explains it, and the retained assignment would then be refused
as a replay forever.

A file that exists but does not parse is not replaced with a fresh one: that
would reset ``highest_sequence`` and reopen replay. The agent refuses
updates instead, until an operator looks (:class:`StateCorrupt`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol import Tier, UpdateState, UpdateStatus

from ..atomic import ensure_dir, read_json, write_bytes_atomic

SCHEMA = "slmfleet.agent-update/1"

NonNegInt = Annotated[int, Field(ge=0)]


class StateCorrupt(Exception):
    """The persisted update record exists but cannot be read."""

    reason = "state_corrupt"


class UpdateRecord(BaseModel):
    """One accepted assignment and where its update stands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: local id of this update; a re-signed refresh keeps it, a new assignment gets a new one
    update_id: str
    assignment_id: str
    sequence: NonNegInt
    #: ``name@version`` of the release
    ref: str
    tier: Tier
    #: the model store key ``name@version-tier``
    key: str
    #: sha256 of the variant's artifact, as the release signed it
    sha256: str
    state: UpdateState
    reason: str | None = None
    #: time of the last transition
    ts: float
    #: when the assignment was verified; the clock it is re-verified against on resume
    accepted_at: float
    #: the ``desired`` payload as received (canonical JSON text) and its sha256
    payload: str
    payload_sha256: str
    #: start-ups that found this update unfinished; bounds a crash loop
    resumes: NonNegInt = 0

    def status(self) -> UpdateStatus:
        """This record as ``hello`` reports it."""
        return UpdateStatus(
            assignment_id=self.assignment_id[:128],
            sequence=self.sequence,
            ref=self.ref[:128],
            state=self.state,
            reason=self.reason[:1024] if self.reason else None,
            ts=self.ts,
        )


class UpdateFile(BaseModel):
    """The whole persisted file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["slmfleet.agent-update/1"] = Field(SCHEMA, alias="schema")
    highest_sequence: NonNegInt = 0
    current: UpdateRecord | None = None
    status: UpdateStatus | None = None


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
        try:
            return UpdateFile.model_validate(data)
        except ValidationError as exc:
            raise StateCorrupt(f"update state {self.path} is invalid: {exc}") from exc

    def save(self, state: UpdateFile) -> None:
        """Replace the record durably: a crash leaves the old one or this one."""
        ensure_dir(self.path.parent)
        data = state.model_dump_json(by_alias=True, indent=1).encode() + b"\n"
        write_bytes_atomic(self.path, data)
