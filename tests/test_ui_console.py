"""The console in a real Chromium against a real control plane: sign-in and sessions,
roles, hostile device text, CSRF and cross-site forms, keyboard use.

Every page here runs under the console's real Content-Security-Policy.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from controlplane.devfleet.mosquitto import MosquittoBroker
from controlplane.service import ControlPlane
from tests.support.auth import issue
from tests.support.console_data import (
    IMG,
    SCRIPT,
    Tokens,
    new_tag,
    report_hostile_device,
)
from tests.support.controlplane import wait_until
from tests.support.registry import registry_api
from tests.support.rollout_fleet import SimFleet

pytest_plugins = ["tests.support.trust_fixtures", "tests.support.browser", "tests.support.console"]


def _audit(api: httpx.Client, path: str) -> list[dict[str, Any]]:
    return [e for e in api.get("/v1/audit", params={"limit": 200}).json()["items"]
            if e["path"] == path]


def test_pages_redirect_to_sign_in_and_a_token_opens_a_strict_http_only_session(
        console: Any, tokens: Tokens, fleet: SimFleet) -> None:
    c = console()
    c.page.goto("/ui/devices/ui-sim-1")
    assert "/ui/sign-in" in c.page.url and c.page.title().startswith("Sign in")
    assert "slmf_" not in c.page.url
    c.page.fill("#credential", tokens.viewer)
    c.page.click("button[type=submit]")
    c.page.wait_for_url("**/ui/devices/ui-sim-1")  # back where it was going
    assert c.page.locator("h1").inner_text() == "Device ui-sim-1"
    cookie = next(k for k in c.context.cookies() if k["name"] == "slmf_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert not cookie["secure"]  # plain HTTP here; over HTTPS it is Secure (test below)
    assert tokens.viewer not in cookie["value"]
    # The page's own scripts cannot read it.
    assert "slmf_console" not in c.page.evaluate("document.cookie")
    assert c.csp_violations() == []


def test_a_wrong_credential_is_refused_on_the_form(console: Any) -> None:
    c = console()
    c.page.goto("/ui/sign-in")
    c.page.fill("#credential", "slmf_not-a-token")
    c.page.click("button[type=submit]")
    assert c.page.locator("[role=alert]").inner_text().startswith("That token or code is unknown")
    assert not [k for k in c.context.cookies() if k["name"] == "slmf_console"]


def test_fleet_page_lists_devices_with_tiers_models_and_counts(
        console: Any, tokens: Tokens, fleet: SimFleet) -> None:
    c = console().sign_in(tokens.viewer)
    counts = c.page.locator("table.counts tbody tr", has_text="micro")
    assert int(counts.locator("td").nth(0).inner_text()) >= 2
    # The filter form narrows the list without a reload (htmx), and the URL follows.
    # (Filtered first: other suites' devices share this control plane, and the
    # first page of 50 need not reach these two.)
    c.page.evaluate("window.__same_page = true")
    c.page.fill("input[name=label]", "ui=console")
    c.page.press("input[name=label]", "Enter")
    c.page.wait_for_url(re.compile(r".*label=ui%3Dconsole.*"))
    wait_until(lambda: c.page.locator("table.devices tbody tr").count() == 2, 5, "filtered rows")
    assert c.page.evaluate("window.__same_page") is True
    row = c.page.locator("table.devices tbody tr", has_text="ui-sim-1")
    assert row.locator("td").nth(0).inner_text() == "micro"
    assert "online" in row.inner_text() and "smollm2 → 1.0.0" in row.inner_text()
    assert "ui=console" in row.inner_text()
    c.shoot("fleet")
    assert c.csp_violations() == []


def test_device_page_shows_capabilities_charts_and_history(
        console: Any, tokens: Tokens, fleet: SimFleet) -> None:
    c = console().sign_in(tokens.viewer, "/ui/devices/ui-sim-1")
    c.page.reload()  # a few more heartbeats by now
    text = c.page.locator("main").inner_text()
    assert "aarch64" in text and "4.0 GiB" in text
    charts = c.page.locator("figure.chart")
    assert charts.count() == 5
    assert c.page.locator("figure.chart svg polyline").count() >= 3  # CPU, RAM, tokens/s...
    c.shoot("device")


def test_hostile_device_text_is_shown_as_text_and_no_script_runs(
        console: Any, tokens: Tokens, broker: MosquittoBroker, cp: ControlPlane) -> None:
    device_id = f"{new_tag()}-hostile"
    report_hostile_device(broker, cp, device_id)
    c = console().sign_in(tokens.viewer, f"/ui/?label=site%3D{SCRIPT}")
    for path in (f"/ui/?label=site%3D{SCRIPT}", f"/ui/devices/{device_id}"):
        c.page.goto(path)
        c.page.wait_for_load_state("load")
        body = c.page.locator("main").inner_text()
        assert SCRIPT in body and IMG in body, path  # shown, as the device sent it
        assert c.page.evaluate("window.__xss") is None, path
        assert c.page.locator("main img, main script").count() == 0, path
    assert c.dialogs == []
    c.shoot("hostile-device")


def test_viewer_sees_no_action_controls_and_a_posted_action_is_refused_and_audited(
        console: Any, tokens: Tokens, rollout: str, api: httpx.Client) -> None:
    c = console().sign_in(tokens.viewer, f"/ui/rollouts/{rollout}")
    assert c.page.locator("text=Pause…").count() == 0
    assert c.page.locator("a.button, form[action*='/act/']").count() == 0
    c.page.goto("/ui/models/smollm2/1.1.0")
    assert c.page.locator("text=Start a rollout").count() == 0
    c.page.goto("/ui/devices/ui-sim-1")
    assert c.page.locator("form[action$='/pin']").count() == 0
    # Posting the form anyway, with the session's own CSRF token: refused by role.
    path = f"/ui/rollouts/{rollout}/act/pause"
    answer = c.page.request.post(path, form={"csrf": c.csrf(), "reason": "viewer tries"})
    assert answer.status == 403
    assert "needs the operator role" in answer.text()
    assert api.get(f"/v1/rollouts/{rollout}").json()["state"] == "awaiting_approval"
    entry = wait_until(lambda: _audit(api, path), 5, "the audit row")[0]
    assert entry["status"] == 403 and entry["token_name"] == "console-viewer"
    # Admin pages are not even readable.
    c.page.goto("/ui/tokens")
    assert c.page.locator("h1").inner_text() == "Not allowed"


def test_forms_without_csrf_or_from_another_site_are_refused(
        console: Any, tokens: Tokens, rollout: str, api: httpx.Client) -> None:
    c = console().sign_in(tokens.operator, f"/ui/rollouts/{rollout}")
    path = f"/ui/rollouts/{rollout}/act/pause"
    no_token = c.page.request.post(path, form={"reason": "no csrf"})
    assert no_token.status == 403 and "(csrf)" in no_token.text()
    stale = c.page.request.post(path, form={"csrf": "forged", "reason": "wrong csrf"})
    assert stale.status == 403
    elsewhere = c.page.request.post(path, form={"csrf": c.csrf()},
                                    headers={"Origin": "http://attacker.test"})
    assert elsewhere.status == 403 and "(cross_site)" in elsewhere.text()
    # A real cross-site page posting to the console: the browser withholds the
    # SameSite=Strict cookie, and the request is refused.
    attacker = ("<!doctype html><title>win</title><form method=post action="
                f"'{c.base_url}{path}'><input name=reason value=x></form>"
                "<script>document.forms[0].submit()</script>")
    c.page.route("http://attacker.test/", lambda route: route.fulfill(
        body=attacker, content_type="text/html"))
    with c.page.expect_response(lambda r: r.url.endswith(path)) as caught:
        c.page.goto("http://attacker.test/")
    assert caught.value.status in (401, 403)
    assert api.get(f"/v1/rollouts/{rollout}").json()["state"] == "awaiting_approval"
    statuses = [e["status"] for e in _audit(api, path)]
    assert statuses and all(s in (401, 403) for s in statuses)


def _tab_to(c: Any, text: str, presses: int = 60) -> None:
    for _ in range(presses):
        c.page.keyboard.press("Tab")
        focused = c.page.evaluate("document.activeElement && document.activeElement.innerText")
        if focused and focused.strip().startswith(text):
            return
    raise AssertionError(f"Tab never reached {text!r}")


def test_rollout_actions_work_from_the_keyboard_alone(
        console: Any, tokens: Tokens, rollout: str, api: httpx.Client) -> None:
    c = console().sign_in(tokens.operator, f"/ui/rollouts/{rollout}")
    _tab_to(c, "Pause")
    c.page.keyboard.press("Enter")
    c.page.wait_for_url(f"**/ui/rollouts/{rollout}/act/pause")
    heading = c.page.locator("#confirm-q").inner_text()
    assert "Pause the rollout of smollm2@1.1.0" in heading and rollout in heading
    c.shoot("confirm-pause")
    c.page.keyboard.press("Tab")
    while c.page.evaluate("document.activeElement.id") != "reason":
        c.page.keyboard.press("Tab")
    c.page.keyboard.type("checked from the keyboard")
    _tab_to(c, "Pause rollout of smollm2@1.1.0")
    c.page.keyboard.press("Enter")
    c.page.wait_for_url(f"**/ui/rollouts/{rollout}?done=pause")
    assert api.get(f"/v1/rollouts/{rollout}").json()["state"] == "paused"
    assert "checked from the keyboard" in c.page.locator("ol.timeline").inner_text()
    # The same keys resume it; and the operator's requests are in the audit log.
    _tab_to(c, "Resume")
    c.page.keyboard.press("Enter")
    c.page.wait_for_url(f"**/ui/rollouts/{rollout}/act/resume")
    _tab_to(c, "Resume rollout of")
    c.page.keyboard.press("Enter")
    c.page.wait_for_url("**?done=resume")
    assert api.get(f"/v1/rollouts/{rollout}").json()["state"] in ("active", "awaiting_approval")
    audited = _audit(api, f"/ui/rollouts/{rollout}/act/pause")
    assert [(e["status"], e["token_name"]) for e in audited] == [(303, "console-operator")]
    api.post(f"/v1/rollouts/{rollout}/abort", json={"reason": "test over"})


def test_operator_pins_a_device_after_a_confirmation(
        console: Any, tokens: Tokens, fleet: SimFleet, api: httpx.Client) -> None:
    c = console().sign_in(tokens.operator, "/ui/devices/ui-sim-2")
    c.page.select_option("select[name=release]", "smollm2@1.1.0")
    c.page.click("text=Pin…")
    assert "Pin device ui-sim-2 to smollm2@1.1.0?" in c.page.locator("#confirm-q").inner_text()
    c.page.click("button:has-text('Pin ui-sim-2 to smollm2@1.1.0')")
    c.page.wait_for_url("**/ui/devices/ui-sim-2?done=pinned")
    assigned = api.get("/v1/devices/ui-sim-2").json()["assignment"]
    assert assigned["ref"] == "smollm2@1.1.0" and assigned["rollout_id"] is None
    assert "Assigned smollm2@1.1.0" in c.page.locator("main").inner_text()


def test_sign_out_and_a_revoked_token_end_the_session(
        console: Any, api: httpx.Client) -> None:
    made = api.post("/v1/tokens", json={"name": "short-lived", "role": "viewer"}).json()
    c = console().sign_in(made["token"])
    stolen = next(k for k in c.context.cookies() if k["name"] == "slmf_console")
    c.page.click("button:has-text('Sign out')")
    c.page.wait_for_url("**/ui/sign-in")
    # The old cookie, replayed, is worth nothing: the session is gone on the server.
    replay = httpx.get(f"{c.base_url}/ui/", cookies={"slmf_console": stolen["value"]},
                       follow_redirects=False)
    assert replay.status_code == 303 and "/ui/sign-in" in replay.headers["location"]
    c.sign_in(made["token"])
    assert api.delete(f"/v1/tokens/{made['id']}").status_code == 200
    c.page.goto("/ui/")
    assert "/ui/sign-in" in c.page.url


def test_admin_issues_and_revokes_a_token(console: Any, tokens: Tokens,
                                          api: httpx.Client) -> None:
    c = console().sign_in(tokens.admin, "/ui/tokens")
    c.page.fill("input[name=name]", "from-the-console")
    c.page.select_option("select[name=role]", "viewer")
    c.page.click("button:has-text('Issue token')")
    secret = c.page.locator("#new-token").inner_text()
    assert secret.startswith("slmf_")
    me = httpx.get(f"{c.base_url}/v1/auth/whoami", headers={"Authorization": f"Bearer {secret}"})
    assert me.json()["name"] == "from-the-console"
    token_id = me.json()["id"]
    c.page.click(f"a[href='/ui/tokens/{token_id}/revoke']")
    c.page.click("button:has-text('Revoke from-the-console')")
    c.page.wait_for_url("**/ui/tokens")
    assert httpx.get(f"{c.base_url}/v1/auth/whoami",
                     headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    c.page.goto("/ui/audit")
    assert f"POST /ui/tokens/{token_id}/revoke" in c.page.locator("main").inner_text()
    c.shoot("audit")


def test_a_sign_in_code_works_once_and_only_for_a_bearer(cp: ControlPlane, tokens: Tokens,
                                                         console: Any) -> None:
    headers = {"Authorization": f"Bearer {tokens.operator}"}
    made = httpx.post(f"{cp.api_url}/ui/sign-in-codes", headers=headers, json={"ttl_s": 60})
    assert made.status_code == 201, made.text
    code = made.json()["code"]
    assert re.fullmatch(r"[2-9A-Z]{4}-[2-9A-Z]{4}-[2-9A-Z]{4}", code)
    assert made.json()["expires_at"] == pytest.approx(time.time() + 60, abs=5)
    c = console().sign_in(code.lower())  # typed loosely is fine
    assert "operator" in c.page.locator("form.who").inner_text()
    again = console()
    again.page.goto("/ui/sign-in")
    again.page.fill("#credential", code)
    again.page.click("button[type=submit]")
    assert again.page.locator("[role=alert]").count() == 1
    assert httpx.post(f"{cp.api_url}/ui/sign-in-codes").status_code == 401
    too_long = httpx.post(f"{cp.api_url}/ui/sign-in-codes", headers=headers,
                          json={"ttl_s": 10 ** 9})
    assert too_long.status_code == 422


def test_start_form_refuses_a_bad_spec_with_its_field(console: Any, tokens: Tokens) -> None:
    c = console().sign_in(tokens.operator, "/ui/models/smollm2/1.1.0")
    c.page.fill("input[name=stages]", "50, 20")
    c.page.click("button:has-text('Review rollout')")
    assert c.page.locator("h1").inner_text() == "Refused"
    assert "percentages must increase" in c.page.locator("[role=alert]").inner_text()


def test_over_https_the_session_cookie_is_secure(tmp_path: Any) -> None:
    app, engine = registry_api(tmp_path)
    try:
        token = issue(app, "viewer")
        client = TestClient(app, base_url="https://console.test")
        form = client.get("/ui/sign-in")
        pre = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        signed = client.post("/ui/sign-in", data={"csrf": pre, "credential": token},
                             headers={"Origin": "https://console.test"}, follow_redirects=False)
        assert signed.status_code == 303
        cookie = next(v for k, v in signed.headers.multi_items()
                      if k == "set-cookie" and v.startswith("slmf_console="))
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    finally:
        engine.dispose()


def test_a_rollout_page_follows_a_change_made_elsewhere_without_reloading(
        console: Any, tokens: Tokens, rollout: str, api: httpx.Client) -> None:
    c = console().sign_in(tokens.viewer, f"/ui/rollouts/{rollout}")
    c.page.evaluate("window.__same_page = true")
    assert api.post(f"/v1/rollouts/{rollout}/pause",
                    json={"reason": "paused over the API"}).status_code == 200
    c.page.wait_for_selector("#progress [data-state=paused]", timeout=10_000)
    assert "paused over the API" in c.page.locator("ol.timeline").inner_text()
    assert c.page.evaluate("window.__same_page") is True
    assert c.csp_violations() == []
    api.post(f"/v1/rollouts/{rollout}/abort", json={"reason": "test over"})


def test_a_live_page_stops_following_once_its_token_is_revoked(
        console: Any, rollout: str, api: httpx.Client) -> None:
    made = api.post("/v1/tokens", json={"name": "watcher", "role": "viewer"}).json()
    c = console().sign_in(made["token"], f"/ui/rollouts/{rollout}")
    c.page.wait_for_timeout(500)  # the live stream is open
    assert api.delete(f"/v1/tokens/{made['id']}").status_code == 200
    c.page.wait_for_selector("#live[data-done=true]", timeout=10_000)
    assert "Signed out" in c.page.locator("#live").inner_text()
