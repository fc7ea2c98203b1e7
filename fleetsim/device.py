"""One simulated device: what it reports and how it acts on an assignment.

Everything a device sends is a real protocol message (``protocol.messages``)
and every assignment is checked with the agent's own verification
(:func:`protocol.verify_assignment`, or :func:`protocol.verify_desired` for
devices that read sets: both signatures, device id, expiry, sequence, tier
and RAM fit). Devices that read sets honour each entry's update policy
(:mod:`fleetsim.policy`). What is simulated is the work in between:
downloads and health checks take time drawn from the scenario, fail at its
rates, and inference figures come from it too. The hardware is a recorded
board preset, and every hello says ``simulated: true``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

from agent.profiles import FirmwareProfile, match_profile
from agent.simulated import simulated_capabilities
from agent.trust import TrustRoots
from protocol import (
    HELLO_SCHEMA_SETS,
    ActiveModel,
    Capabilities,
    DeviceState,
    Event,
    EventType,
    Hello,
    ProtocolError,
    ReleaseManifest,
    State,
    Tier,
    UpdatePolicy,
    UpdateState,
    UpdateStatus,
    Variant,
    code_from_reason,
    encode,
    verify_assignment,
    verify_desired,
)

from .policy import AppLock
from .scenario import Behaviour, Scenario

AGENT_VERSION = "fleetsim"
_json = json.dumps
#: a heartbeat up to its inference list (%.1f: the precision a device reports)
#: a heartbeat up to its inference list, after the device's own head (%.1f: the
#: precision a device reports; ts to the millisecond, as the ingest stores it)
_TELEMETRY_HEAD = '{"schema":"slmfleet.telemetry/1","device_id":%s,"ts":'
_TELEMETRY = ('%.3f,"seq":%d,"uptime_s":%.3f,"cpu_percent":%.1f,"ram_used_bytes":%d,'
              '"temp_c":%.1f')
_INFERENCE = ('{"model":%s,"version":%s,"requests":%d,"errors":%d,"tokens":%d,'
              '"crashes":%d,"ooms":0')
_FIGURES = (',"ttft_p50_ms":%.1f,"ttft_p95_ms":%.1f,"latency_p50_ms":%.1f,'
            '"latency_p95_ms":%.1f,"tokens_per_s":%.1f}')
#: tokens an average simulated request produces (for the tokens counter)
TOKENS_PER_REQUEST = 64


@dataclass(frozen=True, slots=True)
class Step:
    """One event of an update, ``delay_s`` after the previous step."""

    delay_s: float
    event: EventType
    reason: str | None = None
    #: the update's final state, reached with this step
    final: UpdateState | None = None
    #: ``download`` or ``activate``: the entry's policy (and locks) may hold the update here
    gate: str | None = None


@dataclass(frozen=True, slots=True)
class Taken:
    """A verified assignment (either form), as the device works on it."""

    assignment_id: str
    sequence: int
    manifest: ReleaseManifest
    variant: Variant
    tier: Tier
    policy: UpdatePolicy | None = None


@dataclass
class Update:
    """The assignment a device is working on."""

    assignment_id: str
    sequence: int
    ref: str
    tier: Tier
    active: ActiveModel
    state: UpdateState = UpdateState.RECEIVED
    reason: str | None = None
    policy: UpdatePolicy | None = None
    #: the waiting reason last reported (said once per wait)
    said: str | None = None
    #: bumped when a refresh changes the policy: older scheduled looks are dropped
    generation: int = 0
    #: the gate step it waits at, if any
    waiting_at: int | None = None


@dataclass
class SimDevice:
    """A device's state; the runner decides when each method is called."""

    device_id: str
    board: str
    capabilities: Capabilities
    profile: FirmwareProfile
    labels: dict[str, str]
    started: float = field(default_factory=time.time)
    active: ActiveModel | None = None
    #: refs installed on the device (the active and previous, as the agent keeps)
    installed: list[str] = field(default_factory=list)
    highest_sequence: int = 0
    update: Update | None = None
    event_seq: int = 0
    telemetry_seq: int = 0
    #: speaks hello/2 and reads signed sets (the form that carries update policies)
    sets: bool = False
    #: an update lock an app on it holds
    lock: AppLock | None = None
    #: the heartbeat's constant start, formatted at the first heartbeat
    _telemetry_head: str | None = field(default=None, init=False, repr=False)

    @property
    def tier(self) -> Tier:
        """The tier of the device's firmware profile."""
        return self.profile.tier

    # -- reports -----------------------------------------------------------------

    def hello(self) -> bytes:
        """The retained capability report, with the active model and update state."""
        status = None
        if self.update is not None:
            status = UpdateStatus(assignment_id=self.update.assignment_id,
                                  sequence=self.update.sequence, ref=self.update.ref,
                                  state=self.update.state, reason=self.update.reason,
                                  ts=time.time(),
                                  model=self.update.active.name if self.sets else None)
        form: dict[str, object] = {"active_model": self.active, "update": status}
        if self.sets:
            form = {"schema": HELLO_SCHEMA_SETS, "models": [self.active] if self.active else [],
                    "updates": [status] if status else []}
        return encode(Hello(device_id=self.device_id, ts=time.time(), agent_version=AGENT_VERSION,
                            capabilities=self.capabilities, profile=self.profile.id,
                            tier=self.tier, labels=self.labels, simulated=True,
                            **form))  # type: ignore[arg-type]

    def state(self, online: bool) -> bytes:
        """The retained liveness message."""
        return encode(State(device_id=self.device_id, ts=time.time(),
                            state=DeviceState.ONLINE if online else DeviceState.OFFLINE))

    def telemetry(self, scenario: Scenario, rng: random.Random) -> bytes:
        """One heartbeat, with inference figures for the active model.

        Formatted from a template rather than built as the pydantic model and
        encoded (a tenth of the cost, which matters at 10,000 heartbeats a
        second); the same JSON the model would give, key order aside.
        ``tests/test_fleet_cost.py`` decodes it with the protocol's strict model.
        """
        self.telemetry_seq += 1
        now = time.time()
        head = self._telemetry_head
        if head is None:
            head = self._telemetry_head = _TELEMETRY_HEAD % _json(self.device_id)
        random_ = rng.random
        body = head + _TELEMETRY % (
            now, self.telemetry_seq, now - self.started, 3 + 57 * random_(),
            int(self.capabilities.ram_bytes * (0.2 + 0.4 * random_())), 40 + 30 * random_())
        if self.active is None:
            return (body + ',"inference":[]}').encode()
        ref = f"{self.active.name}@{self.active.version}"
        stats = self._inference(scenario.behaviour(self.tier, ref), rng)
        return f'{body},"active_model":{_json(ref)},"inference":[{stats}]}}'.encode()

    def _inference(self, b: Behaviour, rng: random.Random) -> str:
        """:class:`protocol.InferenceStats` as JSON (figures absent when nothing was served)."""
        assert self.active is not None
        requests = max(0, round(b.requests_per_heartbeat * rng.uniform(0.5, 1.5)))
        errors = sum(rng.random() < b.error_rate for _ in range(requests))
        counters = _INFERENCE % (
            _json(self.active.name), _json(self.active.version), requests, errors,
            (requests - errors) * TOKENS_PER_REQUEST, int(rng.random() < b.crash_rate))
        if requests <= errors:
            return counters + "}"
        spread = [rng.uniform(0.9, 1.1) for _ in range(5)]
        return counters + _FIGURES % (
            b.ttft_ms * spread[0], b.ttft_ms * 1.6 * spread[1], b.latency_ms * spread[2],
            b.latency_ms * 1.5 * spread[3], b.tokens_per_s * spread[4])

    def event(self, event: EventType, assignment_id: str | None, reason: str | None = None,
              progress_pct: float | None = None) -> bytes:
        """One update-pipeline event with the next sequence number.

        Its ``code`` is the head of ``reason``: simulated reasons are worded
        as the agent words them (``"code: detail"``).
        """
        self.event_seq += 1
        return encode(Event(device_id=self.device_id, ts=time.time(), seq=self.event_seq,
                            type=event, assignment_id=assignment_id,
                            code=code_from_reason(reason), reason=reason,
                            progress_pct=progress_pct))

    # -- assignments ---------------------------------------------------------------

    def verify(
        self, payload: bytes, trust: TrustRoots | None,
        release_cache: dict[bytes, ReleaseManifest] | None = None,
    ) -> Taken | str | None:
        """The verified assignment, the reason it is refused (as the agent words it),
        or None for a set with nothing in it to run.

        ``release_cache``: releases verified for other simulated devices (the
        same bytes, so the same answer); each device still checks its own
        director signature, id, expiry, sequence, tier and fit. A set's first
        entry is taken (a simulated device runs one model).
        """
        if trust is None:
            return "keys_unavailable: the simulator was started without key lists"
        check = verify_desired if self.sets else verify_assignment
        try:
            verified = check(
                payload, device_id=self.device_id, release_keys=trust.release,
                director_keys=trust.director, now=time.time(),
                highest_sequence=self.highest_sequence, hardware=self.capabilities,
                device_tier=self.tier, release_cache=release_cache,
            )
        except ProtocolError as exc:
            return f"{exc.reason}: {exc}"
        if not self.sets:
            a = verified.assignment  # type: ignore[union-attr]
            return Taken(a.assignment_id, a.sequence, verified.manifest, verified.variant,
                         verified.tier)
        self.highest_sequence = verified.sequence  # type: ignore[union-attr]
        for entry in verified.entries.values():  # type: ignore[union-attr]
            return Taken(entry.assignment_id, verified.sequence,  # type: ignore[union-attr]
                         entry.manifest, entry.variant, entry.tier, entry.entry.policy)
        refused = next(iter(verified.refused.values()), None)  # type: ignore[union-attr]
        return f"{refused.error.reason}: {refused.error}" if refused else None

    def is_refresh(self, taken: Taken) -> bool:
        """A re-signed copy of the assignment already in hand: nothing to do but take it
        (and its policy, which an operator's lock override may have changed)."""
        u = self.update
        return (u is not None and u.assignment_id == taken.assignment_id
                and u.ref == taken.manifest.ref and u.tier == taken.tier)

    def accept(self, taken: Taken, scenario: Scenario, rng: random.Random) -> list[Step]:
        """Start working on ``taken``; the steps the runner plays out, in order."""
        variant = taken.variant
        self.highest_sequence = taken.sequence
        ref = taken.manifest.ref
        self.update = Update(taken.assignment_id, taken.sequence, ref, taken.tier, ActiveModel(
            name=taken.manifest.name, version=taken.manifest.version,
            tier=taken.tier, sha256=variant.sha256), policy=taken.policy)
        gates = self.sets
        b = scenario.behaviour(self.tier, ref)

        def t(mean: float) -> float:
            return max(0.0, mean * rng.uniform(1 - b.jitter, 1 + b.jitter))

        steps = [Step(0.0, EventType.RECEIVED), Step(0.0, EventType.VERIFIED)]
        if rng.random() < b.fit_fail_rate:
            return [*steps, Step(0.01, EventType.REJECTED, "insufficient_disk: simulated",
                                 UpdateState.REJECTED)]
        steps.append(Step(0.01, EventType.FIT_CHECKED))
        if gates:
            steps.append(Step(0.0, EventType.DOWNLOADING, gate="download"))
        if ref not in self.installed:
            steps.append(Step(0.01, EventType.DOWNLOADING))
            download = t(variant.size_bytes / b.download_bytes_per_s)
            if rng.random() < b.download_fail_rate:
                return [*steps, Step(download * rng.random(), EventType.FAILED,
                                     "interrupted: connection reset (simulated)",
                                     UpdateState.FAILED)]
            steps.append(Step(download, EventType.STAGED))
        health = t(b.health_check_s)
        if rng.random() < b.health_fail_rate:
            reason = "golden prompt 1: expected text not found (simulated)"
            return [*steps, Step(health, EventType.HEALTH_FAILED, reason),
                    Step(0.0, EventType.FAILED, f"health_failed: {reason}", UpdateState.FAILED)]
        steps.append(Step(health, EventType.HEALTH_PASSED))
        if gates:
            steps.append(Step(0.0, EventType.ACTIVATED, gate="activate"))
        return [*steps, Step(0.01, EventType.ACTIVATED, None, UpdateState.ACTIVATED)]

    def finish(self, state: UpdateState, reason: str | None) -> None:
        """The update ended in ``state``: switch models if it was activated."""
        assert self.update is not None
        self.update.state, self.update.reason = state, reason
        if state is UpdateState.ACTIVATED:
            self.active = self.update.active
            ref = self.update.ref
            self.installed = [*[r for r in self.installed if r != ref][-1:], ref]


def make_devices(scenario: Scenario, profiles: list[FirmwareProfile],
                 locks: list[AppLock | None] | None = None) -> list[SimDevice]:
    """The scenario's devices, boards drawn by weight with the scenario's seed;
    ``locks``: the update lock each holds (None: none)."""
    rng = random.Random(scenario.seed)
    boards = sorted(scenario.boards)
    weights = [scenario.boards[b] for b in boards]
    caps = {b: simulated_capabilities(b) for b in boards}
    chosen = {b: match_profile(caps[b], profiles) for b in boards}
    devices = []
    for device_id in scenario.device_ids():
        board = rng.choices(boards, weights)[0]
        devices.append(SimDevice(device_id, board, caps[board], chosen[board],
                                 {**scenario.labels, "board": board}, sets=scenario.sets,
                                 lock=locks[len(devices)] if locks else None))
    return devices
