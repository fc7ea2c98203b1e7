"""The console against `slmfleet dev`'s whole fleet: real agents running the real
SmolLM2 model, rollouts started from the release page and followed live.

One module-scoped fleet (broker, control plane, three agents); the good
release goes canary-first to every device, the bad one stops at the canary.
Screenshots of each page go to the session's screenshot directory.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.devfleet.fleet import BAD_VERSION, DEMO_DEVICES, GOOD_VERSION, DevFleet
from tests.support.console_data import issue_tokens

pytest_plugins = ["tests.support.browser"]

#: a rollout on this machine: three agents download and health-check in turn,
#: on cores other tests may be using too
ROLLOUT_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def devfleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[DevFleet]:
    fleet = DevFleet(tmp_path_factory.mktemp("dev"), log=lambda _: None)
    try:
        fleet.start()
        fleet.publish_releases(model_path)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def console_url(devfleet: DevFleet) -> str:
    return devfleet.api_url


@pytest.fixture(scope="module")
def operator(devfleet: DevFleet) -> str:
    with httpx.Client(base_url=devfleet.api_url, headers=devfleet.headers) as api:
        return issue_tokens(api, "dev-console").operator


def _printed(proc: subprocess.Popen[str], prefixes: tuple[str, ...],
             timeout: float) -> dict[str, str]:
    """The first line starting with each of ``prefixes`` that ``proc`` prints, by prefix."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while len(found) < len(prefixes) and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        line = proc.stdout.readline() if ready else ""
        if ready and not line:
            break  # it exited
        for prefix in prefixes:
            if line.startswith(prefix + " ") and prefix not in found:
                found[prefix] = line.strip()
    return found


def test_slmfleet_dev_prints_the_console_line_with_a_code_that_signs_in(
        tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "slmfleet", "dev", "--data-dir", str(tmp_path / "dev")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, "COLUMNS": "120"})
    try:
        lines = _printed(proc, ("API", "TOKEN", "CONSOLE"), 180.0)
        assert set(lines) == {"API", "TOKEN", "CONSOLE"}, lines
        api = lines["API"].split()[1]
        token = lines["TOKEN"].split()[1]
        _, url, *rest = lines["CONSOLE"].split()
        assert url == f"{api}/ui/"
        assert rest[:2] == ["sign-in", "code"] and len(rest) == 3
        code = rest[2]
        assert token not in lines["CONSOLE"]
        with httpx.Client(base_url=api) as browser_like:
            form = browser_like.get("/ui/sign-in")
            pre = form.text.split('name="csrf" value="')[1].split('"')[0]
            signed = browser_like.post("/ui/sign-in", data={"csrf": pre, "credential": code},
                                       headers={"Origin": api})
            assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
            assert "(admin)" in browser_like.get("/ui/").text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(c: Any, version: str) -> str:
    """Start a rollout of ``version`` from its release page, as the demo would; its id."""
    c.page.goto(f"/ui/models/smollm2/{version}")
    c.page.fill("input[name=stages]", "10, 100")
    c.page.fill("input[name=bake_s]", "3")
    c.page.fill("input[name=max_concurrent_downloads]", "1")
    c.page.click("button:has-text('Review rollout')")
    assert f"Start a rollout of smollm2@{version}?" in c.page.locator("#confirm-q").inner_text()
    c.page.click(f"button:has-text('Start rollout of smollm2@{version}')")
    c.page.wait_for_url("**/ui/rollouts/*")
    return c.page.url.rsplit("/", 1)[-1]


def _follow(c: Any, until: set[str], fleet: DevFleet, rollout_id: str) -> list[str]:
    """The progress section's text each time it changed, until its state is in ``until``."""
    seen: list[str] = []
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    while time.monotonic() < deadline:
        # One read of both, so the state and the text are from the same swap.
        state, text = c.page.evaluate(
            "() => [document.querySelector('#progress [data-state]').dataset.state,"
            " document.querySelector('#progress').innerText]")
        if not seen or seen[-1] != text:
            seen.append(text)
        if state in until:
            return seen
        c.page.wait_for_timeout(250)
    with httpx.Client(base_url=fleet.api_url, headers=fleet.headers) as client:
        actual = client.get(f"/v1/rollouts/{rollout_id}").json()
    raise AssertionError(f"the page never showed {until}; last seen: {seen[-1]}; the API says "
                         f"{actual['state']} {actual['counts']}")


def _roll_out(c: Any, fleet: DevFleet, version: str) -> tuple[str, list[str]]:
    """Start a rollout from the release page and follow it on its page until it ends,
    proving the page was never reloaded; its id and the progress texts seen."""
    rollout_id = _start(c, version)
    c.page.evaluate("window.__same_page = true")
    seen = _follow(c, {"completed", "rolled_back", "aborted"}, fleet, rollout_id)
    assert c.page.evaluate("window.__same_page") is True
    return rollout_id, seen


def test_the_dev_code_signs_in_and_the_fleet_page_lists_the_demo_agents(
        devfleet: DevFleet, console: Any) -> None:
    assert devfleet.console_code and devfleet.console_url == f"{devfleet.api_url}/ui/"
    c = console().sign_in(devfleet.console_code)
    assert "(admin)" in c.page.locator("form.who").inner_text()
    with httpx.Client(base_url=devfleet.api_url, headers=devfleet.headers) as api:
        tiers = {d["id"]: d["tier"] for d in api.get("/v1/devices").json()["items"]}
    for device_id, _, _ in DEMO_DEVICES:
        row = c.page.locator("table.devices tbody tr", has_text=device_id)
        assert row.locator("td").nth(0).inner_text() == tiers[device_id]
        assert "online" in row.inner_text()
    assert len(set(tiers.values())) == 3  # micro, small and medium boards
    c.shoot("dev-fleet")
    c.page.goto(f"/ui/models/smollm2/{GOOD_VERSION}")
    assert c.page.locator("table tbody tr").count() >= 3  # a variant per tier
    assert "a pinned release key" in c.page.locator("main").inner_text()
    c.shoot("dev-release")
    assert c.csp_violations() == []


@pytest.mark.timeout(600)
def test_a_good_rollout_started_from_the_release_page_shows_live_progress_to_100(
        devfleet: DevFleet, console: Any, operator: str) -> None:
    c = console().sign_in(operator)
    rollout_id, seen = _roll_out(c, devfleet, GOOD_VERSION)
    assert "completed" in seen[-1], seen[-1]
    assert f"Devices updated: {len(DEMO_DEVICES)} of {len(DEMO_DEVICES)}" in seen[-1]
    assert "100 %" in seen[-1]
    # Several states came in over the live stream.
    assert len(seen) >= 3, seen
    assert any("stage 1 of 2" in s for s in seen), seen
    assert c.page.locator("#live").get_attribute("data-done") == "true"
    assert c.page.locator("a:has-text('Pause…')").count() == 0  # no lever left to pull
    c.shoot("dev-rollout-completed")
    c.page.goto("/ui/devices/pi4-kitchen")
    assert f"smollm2 → {GOOD_VERSION}" in c.page.locator("main").inner_text()
    assert rollout_id in c.page.locator("main").inner_text()
    c.shoot("dev-device")
    assert c.csp_violations() == []


@pytest.mark.timeout(600)
def test_the_bad_release_stops_at_the_canary_with_the_failed_gate_and_its_values(
        devfleet: DevFleet, console: Any, operator: str) -> None:
    c = console().sign_in(operator)
    _, seen = _roll_out(c, devfleet, BAD_VERSION)
    assert "rolled_back" in seen[-1], seen[-1]
    progress = c.page.locator("#progress")
    assert "stage 1 of 2" in progress.inner_text()
    assert c.page.locator("a:has-text('Pause…')").count() == 0
    failed = progress.locator("table.gates").first.locator("tr.gate-row[data-verdict=fail]")
    assert failed.count() >= 1
    cells = failed.first.locator("td")
    gate = failed.first.locator("th").inner_text()
    measured, threshold = cells.nth(1).inner_text(), cells.nth(2).inner_text()
    assert measured != "n/a" and threshold != "n/a", (gate, measured, threshold)
    assert "Failed gate at stage 1" in progress.inner_text()
    assert gate in progress.locator("#why").inner_text()  # the reason names the gate
    c.shoot("dev-rollout-stopped")
