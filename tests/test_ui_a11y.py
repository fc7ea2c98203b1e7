"""Every console page has a title and landmarks, and axe-core (vendored) finds no
serious or critical accessibility violation on it.

axe is injected as a script, which the console's CSP forbids; so these pages
open in a context that bypasses the CSP (``bypass_csp=True``). Every other
console test runs under the real policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.support.console_data import Tokens
from tests.support.rollout_fleet import SimFleet

pytest_plugins = ["tests.support.trust_fixtures", "tests.support.browser", "tests.support.console"]

SERIOUS = {"serious", "critical"}


def _pages(rollout: str) -> list[str]:
    return ["/ui/", "/ui/?tier=micro", "/ui/devices/ui-sim-1", "/ui/models",
            "/ui/models/smollm2/1.1.0", "/ui/models/smollm2/1.1.0/rollout?stages=10,100",
            "/ui/rollouts", f"/ui/rollouts/{rollout}", f"/ui/rollouts/{rollout}/act/pause",
            "/ui/audit", "/ui/tokens", "/ui/devices/no-such-device"]


def _check(c: Any, path: str, axe: Path) -> list[str]:
    """Problems on ``path``: a missing title or landmark, serious axe violations."""
    c.page.goto(path)
    problems = []
    if not c.page.title().endswith("slmfleet console"):
        problems.append(f"{path}: title {c.page.title()!r}")
    for landmark in ("header", "main", "footer"):
        if c.page.locator(landmark).count() != 1:
            problems.append(f"{path}: no single <{landmark}>")
    if c.page.locator("h1").count() != 1:
        problems.append(f"{path}: not exactly one <h1>")
    c.page.add_script_tag(path=str(axe))
    assert c.page.evaluate("axe.version").startswith("4."), "axe did not load"
    found = c.page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']}))"
                            ".violations.map(v => [v.id, v.impact, v.nodes.length, v.help])")
    problems += [f"{path}: {rule} ({impact}, {n} nodes): {help_}"
                 for rule, impact, n, help_ in found if impact in SERIOUS]

    return problems


def test_every_page_has_a_title_landmarks_and_no_serious_axe_violation(
        console: Any, tokens: Tokens, fleet: SimFleet, rollout: str,
        api: httpx.Client, axe_script: Path) -> None:
    c = console(bypass_csp=True).sign_in(tokens.admin)
    problems = []
    for path in _pages(rollout):
        problems += _check(c, path, axe_script)
    assert c.page.locator("nav[aria-label=Console]").count() == 1
    signed_out = console(bypass_csp=True)
    problems += _check(signed_out, "/ui/sign-in", axe_script)
    assert problems == []
    api.post(f"/v1/rollouts/{rollout}/abort", json={"reason": "test over"})
