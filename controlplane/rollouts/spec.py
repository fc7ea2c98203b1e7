"""What an admin submits: the rollout spec, validated strictly.

The same model serves ``POST /v1/rollouts`` (JSON) and ``slmfleet rollouts
create --file spec.yaml`` (YAML). Unknown keys are refused, so a typo in a
gate name is an error, not a gate that silently never fires.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from protocol import Tier, Window

ShortStr = Annotated[str, StringConstraints(min_length=1, max_length=128)]
#: a rollout has at most this many stages
MAX_STAGES = 16
#: and bakes a stage for at most a week
MAX_BAKE_S = 7 * 86_400


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """Which devices the rollout is for; every given criterion must match, ``all`` for all."""

    all: bool = False
    tiers: Annotated[list[Tier], Field(max_length=3)] = []
    profiles: Annotated[list[ShortStr], Field(max_length=64)] = []
    labels: Annotated[dict[ShortStr, ShortStr], Field(max_length=32)] = {}
    device_ids: Annotated[list[ShortStr], Field(max_length=10_000)] = []

    def is_empty(self) -> bool:
        """True when no criterion is given (and ``all`` is not set)."""
        return not (self.tiers or self.profiles or self.labels or self.device_ids)

    @model_validator(mode="after")
    def _all_or_criteria(self) -> Target:
        if self.all and not self.is_empty():
            raise ValueError("target: `all: true` matches every device; drop the other criteria")
        if not self.all and self.is_empty():
            raise ValueError(
                "target: give at least one of tiers, profiles, labels, device_ids, "
                "or `all: true`"
            )
        return self


Ratio = Annotated[float, Field(gt=0)]
Rate = Annotated[float, Field(ge=0, le=1)]


class Gates(_Strict):
    """Conditions a stage must meet before the rollout moves on.

    Unset (None) gates are not checked. Regression gates compare, per tier,
    the new version on the rollout's devices with the other versions of the
    same model on devices of that tier not running the new one; a tier with
    no inference data on either side is reported, not failed.
    """

    #: stage devices whose update ended (activated or failed) before the stage may pass
    min_devices_reporting: Annotated[int, Field(ge=0)] | None = 1
    #: stage devices whose update failed
    max_failed: Annotated[int, Field(ge=0)] | None = 0
    max_failed_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    #: health checks passed / health checks run, among the stage's devices
    min_health_pass_rate: Rate | None = 1.0
    #: new p95 latency / old p95 latency
    max_p95_latency_ratio: Ratio | None = None
    #: new tokens/s / old tokens/s
    min_tokens_per_s_ratio: Ratio | None = None
    #: errors / requests of the new version
    max_error_rate: Rate | None = None
    #: crashes + OOMs of the new version's workers
    max_crashes: Annotated[int, Field(ge=0)] | None = None
    #: requests a side needs before its inference figures count
    min_requests: Annotated[int, Field(ge=1)] = 1


class Stage(_Strict):
    """One step: a share of the matched devices, how long it bakes, its gates."""

    percent: Annotated[float, Field(gt=0, le=100)]
    bake_s: Annotated[float, Field(ge=0, le=MAX_BAKE_S)] = 300.0
    #: an operator must approve before this stage starts
    approval: bool = False
    #: gates for this stage; default: the spec's ``gates``
    gates: Gates | None = None


class RolloutSpec(_Strict):
    """A staged rollout of ``model@version``."""

    model: ShortStr
    version: ShortStr
    target: Target
    stages: Annotated[list[Stage], Field(min_length=1, max_length=MAX_STAGES)]
    gates: Gates = Gates()
    on_failure: Literal["pause", "rollback"] = "rollback"
    #: devices updating at once (assigned, not yet activated or failed); None: no cap
    max_concurrent_downloads: Annotated[int, Field(ge=1)] | None = None
    #: the update policy signed into each entry, over the devices' label and profile
    #: defaults (docs/update-policy-controlplane.md); None: the defaults' say
    download_window: Window | None = None
    activation_window: Window | None = None
    max_bytes_per_s: Annotated[int, Field(strict=True, ge=1024)] | None = None
    allow_metered: Annotated[bool, Field(strict=True)] | None = None

    @model_validator(mode="after")
    def _stages_grow_to_100(self) -> RolloutSpec:
        percents = [s.percent for s in self.stages]
        if any(b <= a for a, b in itertools.pairwise(percents)):
            raise ValueError(f"stages: percentages must increase, got {percents}")
        if percents[-1] != 100:
            raise ValueError(f"stages: the last stage must be 100 %, got {percents[-1]:g}")
        return self

    def gates_for(self, stage_index: int) -> Gates:
        """The gates stage ``stage_index`` is judged by."""
        return self.stages[stage_index].gates or self.gates
