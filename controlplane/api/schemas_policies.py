"""Request and response bodies of the update-policy routes and the lock override."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from controlplane.update_policies import PolicyLayer


class PolicyDefaultOut(BaseModel):
    """One default update policy and what it applies to."""

    selector: Literal["label", "profile"]
    key: str = Field(description="the label's key, or the profile's name")
    value: str = Field(description="the label's value; empty for a profile")
    policy: PolicyLayer
    updated_at: float


class PolicyDefaultList(BaseModel):
    """Every default update policy: profiles first, then labels."""

    items: list[PolicyDefaultOut]


class LockOverrideRequest(BaseModel):
    """An operator's override of a device's update locks for one of its models."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class LockOverrideOut(BaseModel):
    """The override as signed into the device's entry for ``model``."""

    device_id: str
    model: str
    assignment_id: str
    override_id: str
    issued_at: float
    reason: str
    sequence: int = Field(description="the number of the re-signed document")


class WaitingOut(BaseModel):
    """One entry whose update waits on the device, from its latest event."""

    model: str
    assignment_id: str
    type: str = Field(description="waiting_window, waiting_network, deferred or staged")
    code: str | None = None
    reason: str | None = Field(None, description="the device's words: what it waits for")
    since: float = Field(description="when the device reported it (its clock)")
    until: float | None = Field(None, description="the next opening the device named, if any")
