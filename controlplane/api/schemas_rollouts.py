"""Response bodies of the rollout and inference-metrics routes.

The request body of ``POST /v1/rollouts`` is :class:`controlplane.rollouts.RolloutSpec`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ActionRequest(BaseModel):
    """Optional body of ``POST /v1/rollouts/{id}/{action}``."""

    reason: str | None = Field(None, max_length=1024, description="recorded in the timeline")


class RolloutSummary(BaseModel):
    """One rollout in a list."""

    id: str
    model: str
    version: str
    state: str
    stage: int = Field(description="current stage, 1-based")
    stages: int
    percent: float = Field(description="the current stage's share of the matched devices")
    created_at: float
    updated_at: float
    reason: str | None


class RolloutPage(BaseModel):
    """One page of rollouts, newest first; pass ``next`` as ``cursor`` for the next."""

    items: list[RolloutSummary]
    next: str | None


class StageOut(BaseModel):
    """One stage: its settings, where it stands, and its devices by state."""

    index: int = Field(description="1-based")
    percent: float
    bake_s: float
    approval: bool
    status: str = Field(description="done, current or waiting")
    devices: dict[str, int]


class DecisionOut(BaseModel):
    """One entry of the timeline: what was decided, by whom, and why."""

    ts: float
    kind: str
    stage: int | None = Field(description="1-based")
    actor: str
    reason: str
    details: dict[str, Any] | None


class MemberOut(BaseModel):
    """A device of the rollout."""

    device_id: str
    device_tier: str | None
    variant_tier: str | None
    state: str
    stage: int | None = Field(description="the stage it was assigned in, 1-based")
    assignment_id: str | None
    previous: str | None = Field(description="the version it ran when it joined")
    health: str | None
    reason: str | None


class RolloutDetail(RolloutSummary):
    """Everything about one rollout."""

    spec: dict[str, Any]
    stage_started_at: float | None
    bake_started_at: float | None = Field(
        None, description="when the current stage had enough activated devices for its bake "
                          "to start (devices waiting for a window or a lock count as waiting)")
    counts: dict[str, int] = Field(description="devices by state")
    per_stage: list[StageOut]
    per_tier: dict[str, dict[str, int]] = Field(description="device tier -> state -> count")
    gates: list[dict[str, Any]] = Field(description="the current stage's latest evaluation")
    timeline: list[DecisionOut]
    devices: list[MemberOut]
    devices_truncated: bool


class VersionMetrics(BaseModel):
    """``GET /v1/models/{name}/versions/{version}/metrics``: figures per device tier."""

    model: str
    version: str
    since: float
    tiers: list[dict[str, Any]]


class DeviceMetrics(BaseModel):
    """``GET /v1/devices/{id}/metrics``: one device's figures per model version."""

    device_id: str
    since: float
    items: list[dict[str, Any]]
