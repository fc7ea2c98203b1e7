"""What a simulated fleet looks like and how its devices behave.

A scenario is a small YAML file (``examples/fleet.scenario.yaml``) or the
defaults below: how many devices, which boards in which proportions, how
often they report, and per tier how long downloads and health checks take,
how often each step fails, and what inference figures the devices report.
``releases`` overrides any of that for one release (``name@version``), which
is how an operator rehearses "this version is slower on small devices" or
"this one fails its health check" against the real control plane.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from agent.simulated import SIMULATED_PRESETS
from protocol import Tier, parse_yaml_mapping, validation_problems

#: a scenario is a page of YAML; anything far bigger is the wrong file
MAX_SCENARIO_BYTES = 1 << 20

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
NonNeg = Annotated[float, Field(ge=0.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Behaviour(_Strict):
    """How devices of one tier (or running one release) behave. Times in seconds."""

    #: download bandwidth, bytes/s: download time is artifact size / this
    download_bytes_per_s: Positive = 20e6
    health_check_s: NonNeg = 2.0
    #: each step's time is drawn uniformly within +-jitter of its mean
    jitter: Rate = 0.3
    fit_fail_rate: Rate = 0.0
    download_fail_rate: Rate = 0.0
    health_fail_rate: Rate = 0.0
    #: local inference the device reports each heartbeat
    requests_per_heartbeat: NonNeg = 20.0
    ttft_ms: NonNeg = 150.0
    latency_ms: NonNeg = 900.0
    tokens_per_s: NonNeg = 25.0
    error_rate: Rate = 0.0
    crash_rate: Rate = 0.0
    """chance per heartbeat that the worker crashed since the last one"""


class _Override(_Strict):
    def apply(self, base: Behaviour) -> Behaviour:
        """``base`` with the fields set here replaced."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


#: Fields of :class:`Behaviour` to change, for one tier or one release: each
#: of its fields, with the same bounds, unset (None) by default
BehaviourOverride = create_model(
    "BehaviourOverride",
    __base__=_Override,
    __doc__="Fields of :class:`Behaviour` to change, for one tier or one release.",
    **{
        name: (Annotated[(field.annotation, *field.metadata)] | None, None)
        for name, field in Behaviour.model_fields.items()
    },
)


#: what each tier does when the scenario says nothing: faster boards download
#: and infer faster (figures of the order measured with SmolLM2-135M)
DEFAULT_TIERS: dict[Tier, Behaviour] = {
    Tier.MICRO: Behaviour(download_bytes_per_s=10e6, health_check_s=3.0, ttft_ms=400,
                          latency_ms=2500, tokens_per_s=12),
    Tier.SMALL: Behaviour(download_bytes_per_s=40e6, health_check_s=1.5, ttft_ms=150,
                          latency_ms=900, tokens_per_s=35),
    Tier.MEDIUM: Behaviour(download_bytes_per_s=100e6, health_check_s=0.8, ttft_ms=40,
                           latency_ms=300, tokens_per_s=120),
}


class Locks(_Strict):
    """Update locks apps on the devices hold from the start (fleetsim/policy.py)."""

    #: share of the devices holding one
    fraction: Rate = 0.1
    #: how long each holds it (simulated seconds, +-50 %)
    hold_s: NonNeg = 60.0
    reason: Annotated[str, Field(min_length=1, max_length=128)] = "simulated app busy"


class Scenario(_Strict):
    """A simulated fleet."""

    devices: Annotated[int, Field(ge=1, le=100_000)] = 100
    #: device ids are ``<prefix>-<n>`` (zero-padded), stable across runs
    id_prefix: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")] = "sim"
    heartbeat_s: Positive = 30.0
    #: hellos are spread over this many seconds at start, as a fleet coming up
    ramp_s: NonNeg = 10.0
    #: simulated board preset -> relative weight (presets: agent/simulated.py)
    boards: dict[str, Positive] = Field(default_factory=lambda: {
        "raspberry-pi-4-4gb": 4, "raspberry-pi-5-8gb": 3, "jetson-orin-nano-8gb": 2,
        "x86_64-gpu-workstation": 1,
    })
    labels: dict[str, str] = Field(default_factory=lambda: {"site": "sim"})
    tiers: dict[Tier, BehaviourOverride] = {}
    #: ``name@version`` -> how devices behave while installing or running it
    releases: dict[str, BehaviourOverride] = {}
    seed: int = 1
    #: speak slmfleet.hello/2 and read signed sets, honouring each entry's update policy
    sets: bool = False
    #: the devices' clock at start (ISO 8601, with a zone); None: the real time
    clock_start: AwareDatetime | None = None
    #: update locks held by apps on some devices (needs ``sets``)
    locks: Locks | None = None

    @model_validator(mode="after")
    def _known_boards(self) -> Scenario:
        unknown = set(self.boards) - set(SIMULATED_PRESETS)
        if unknown:
            raise ValueError(f"unknown board presets {sorted(unknown)}; known: "
                             f"{', '.join(sorted(SIMULATED_PRESETS))}")
        if not self.boards:
            raise ValueError("boards must name at least one preset")
        if (self.locks is not None or self.clock_start is not None) and not self.sets:
            raise ValueError("locks and clock_start need sets: true (policies travel in sets)")
        return self

    def behaviour(self, tier: Tier, ref: str | None) -> Behaviour:
        """How a ``tier`` device behaves while installing or running release ``ref``."""
        base = DEFAULT_TIERS[tier]
        if tier in self.tiers:
            base = self.tiers[tier].apply(base)
        if ref is not None and ref in self.releases:
            base = self.releases[ref].apply(base)
        return base

    def device_ids(self) -> list[str]:
        """The simulated device ids, in a stable order."""
        width = len(str(self.devices - 1))
        return [f"{self.id_prefix}-{i:0{width}d}" for i in range(self.devices)]


def load_scenario(path: Path | None, **overrides: object) -> Scenario:
    """The scenario in ``path`` (or the defaults) with CLI ``overrides`` that are not None.

    Raises ``ValueError`` naming the file and the field that is wrong.
    """
    data: dict[str, object] = {}
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"scenario {path}: {exc}") from exc
        data = parse_yaml_mapping(raw, f"scenario {path}", max_bytes=MAX_SCENARIO_BYTES)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        where = f"scenario {path}" if path else "scenario"
        raise ValueError(f"{where}: {validation_problems(exc)}") from exc
