"""Running a rollout to its end through the API, for end-to-end rollout tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from tests.support.controlplane import wait_until


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`wait_until` at a gentler pace: the API shares the test's process and two cores."""
    return wait_until(predicate, timeout, what, poll=0.3)


def run_rollout(api: httpx.Client, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Create the rollout ``spec`` describes; its detail once completed, rolled back or
    paused (an assertion listing its decisions if it is not within ``timeout``)."""
    r = api.post("/v1/rollouts", json=spec)
    assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]

    def over() -> dict[str, Any] | None:
        detail = api.get(f"/v1/rollouts/{rollout_id}").json()
        return detail if detail["state"] in ("completed", "rolled_back", "paused") else None

    try:
        return poll(over, timeout, f"rollout {rollout_id} to finish")
    except AssertionError:
        detail = api.get(f"/v1/rollouts/{rollout_id}").json()
        raise AssertionError([(d["kind"], d["reason"]) for d in detail["timeline"]]) from None
