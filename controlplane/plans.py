"""How one call changes one device's document: the next entries, or why not.

Pure decisions over the entries a device has now and the form its agent
reads; the director (:mod:`.director`) reads, signs and stores around them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .documents import SET, SINGLE, Entry, Form, Signed

Status = Literal["assigned", "incompatible", "unknown_device", "unassigned", "not_assigned",
                 "needs_upgrade"]



@dataclass(frozen=True)
class AssignResult:
    """What happened for one device."""

    device_id: str
    status: Status
    tier: str | None = None
    assignment_id: str | None = None
    sequence: int | None = None
    expires_at: float | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """What one call changes in one device's document."""

    device_id: str
    #: the model name changed; None: every name (``clear``) or none (a re-sign)
    model_name: str | None = None
    #: its new entry; None with a name: take that model off the device
    entry: Entry | None = None
    #: revoke every entry and clear ``desired`` (the device keeps what it runs)
    clear: bool = False
    #: the new entry keeps the live one's assignment id: only its policy changed
    #: (an operator's lock override), a refresh for the device
    keeps_id: bool = False

    @property
    def kind(self) -> str:
        """What the change is, in a result: assign, remove, clear or refresh."""
        if self.clear:
            return "clear"
        if self.model_name is None:
            return "refresh"
        return "assign" if self.entry is not None else "remove"


@dataclass(slots=True)
class Plan:
    """A device's next document: its entries, the form it is signed in, the signature."""

    change: Change
    #: the form the device's agent reads, as read
    reads: Form
    form: Form
    entries: dict[str, Entry]
    signed: Signed | None = None


def plan_change(
    change: Change, current: Mapping[str, Entry], reads: Form
) -> tuple[Plan | None, AssignResult | None]:
    """The device's next document under ``change``, or why there is none."""
    entries = dict(current)
    kind = change.kind
    if kind == "clear":
        if not entries:
            return None, AssignResult(change.device_id, "not_assigned")
        # Cleared in either form: nothing pending, the device keeps what it runs.
        return Plan(change, reads, SINGLE, {}), None
    if kind == "remove":
        if change.model_name not in entries:
            return None, AssignResult(change.device_id, "not_assigned",
                                      reason=f"{change.model_name} is not assigned")
        del entries[change.model_name]
    elif kind == "assign":
        assert change.entry is not None and change.model_name is not None
        live = entries.get(change.model_name)
        if change.keeps_id and (live is None
                                or live.assignment_id != change.entry.assignment_id):
            return None, AssignResult(change.device_id, "not_assigned",
                                      reason=f"{change.model_name}'s entry changed meanwhile")
        entries[change.model_name] = change.entry
    form = reads
    if reads == SINGLE and len(entries) > 1:
        if kind == "assign":
            others = sorted(set(entries) - {change.model_name})
            return None, AssignResult(
                change.device_id, "needs_upgrade",
                reason=(f"the device's agent reads one model (its last hello was slmfleet.hello/1, "
                        f"or it has not said hello) and "
                        f"already runs {', '.join(others)}: upgrade its agent to one that "
                        f"says slmfleet.hello/2 to assign it a second model"),
            )
        # Its agent went back to the old form while running several: the set
        # is all that says what it should run (the old agent refuses it, in events).
        form = SET
    if form == SINGLE and any(e.policy is not None for e in entries.values()):
        if kind != "assign" or change.entry is None or change.entry.policy is None:
            # Its agent went back to the old form holding an entry with a
            # policy: only the set can say it (the old agent refuses it, in events).
            return Plan(change, reads, SET, entries), None
        # The old form has no place for a policy, and an agent that cannot
        # read one would update at once, outside every window: refused.
        return None, AssignResult(
            change.device_id, "needs_upgrade",
            reason=("the assignment carries an update policy (windows, rate cap, metered "
                    "links or a lock override) and the device's agent reads one model "
                    "(slmfleet.hello/1) with no place for it: upgrade its agent to one that "
                    "says slmfleet.hello/2"),
        )
    return Plan(change, reads, form, entries), None
