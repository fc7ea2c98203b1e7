"""API tokens, the audit log and the first-run admin token, over a real SQLite database."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controlplane.auth.roles import Role
from controlplane.config import ControlPlaneSettings
from tests.support.auth import bearer, issue
from tests.support.registry import registry_api


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    app, engine = registry_api(tmp_path)
    yield app
    engine.dispose()


@pytest.fixture
def admin(app: Any) -> TestClient:
    return TestClient(app, headers=bearer(issue(app, Role.ADMIN, name="root")))


def test_a_token_is_shown_once_works_for_its_role_and_stops_when_revoked(
    app: Any, admin: TestClient
) -> None:
    made = admin.post("/v1/tokens", json={"name": "ci", "role": "viewer", "expires_in_s": 3600})
    assert made.status_code == 201, made.text
    issued = made.json()
    assert issued["token"].startswith("slmf_") and issued["role"] == "viewer"
    assert issued["expires_at"] == pytest.approx(time.time() + 3600, abs=60)
    listed = admin.get("/v1/tokens").json()["items"]
    assert {t["id"] for t in listed} >= {issued["id"]}
    assert all("token" not in t for t in listed)

    viewer = TestClient(app, headers=bearer(issued["token"]))
    me = viewer.get("/v1/auth/whoami").json()
    assert me == {"id": issued["id"], "name": "ci", "role": "viewer"}
    assert viewer.get("/v1/devices").status_code == 200
    assert viewer.post("/v1/tokens", json={"name": "x", "role": "admin"}).status_code == 403

    revoked = admin.delete(f"/v1/tokens/{issued['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert viewer.get("/v1/devices").status_code == 401
    # revoking again changes nothing; an unknown id is a 404
    assert admin.delete(f"/v1/tokens/{issued['id']}").json() == revoked.json()
    assert admin.delete("/v1/tokens/nope").status_code == 404


def test_an_expired_token_is_refused(app: Any) -> None:
    token = issue(app, Role.ADMIN, expires_in_s=60, now=time.time() - 61)
    r = TestClient(app).get("/v1/devices", headers=bearer(token))
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "expired" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "role": "viewer"},
        {"name": "x", "role": "root"},
        {"name": "x", "role": "viewer", "expires_in_s": 1},
        {"name": "x", "role": "viewer", "expires_in_s": 10**12},
        {"name": "x\n", "role": "viewer"},
        {"name": "x", "role": "viewer", "scopes": ["all"]},
    ],
)
def test_bad_token_requests_are_422_and_issue_nothing(admin: TestClient, body: dict) -> None:
    def ids() -> list[str]:
        return [t["id"] for t in admin.get("/v1/tokens").json()["items"]]

    before = ids()
    assert admin.post("/v1/tokens", json=body).status_code == 422
    assert ids() == before


def test_the_last_admin_token_cannot_be_revoked(app: Any, admin: TestClient) -> None:
    admins = [t for t in admin.get("/v1/tokens").json()["items"]
              if t["role"] == "admin" and not t["revoked_at"]]
    for token in admins[:-1]:
        assert admin.delete(f"/v1/tokens/{token['id']}").status_code == 200
    last = admins[-1]
    client = TestClient(app, headers=bearer(issue(app, Role.OPERATOR)))
    assert client.delete(f"/v1/tokens/{last['id']}").status_code == 403
    survivor = TestClient(app, headers=bearer(issue(app, Role.ADMIN)))
    assert survivor.delete(f"/v1/tokens/{last['id']}").status_code == 200
    survivor_id = survivor.get("/v1/auth/whoami").json()["id"]
    refused = survivor.delete(f"/v1/tokens/{survivor_id}")
    assert refused.status_code == 409 and "last active admin" in refused.json()["detail"]


def test_every_mutating_request_is_audited_reads_are_not(app: Any, admin: TestClient) -> None:
    operator_token = issue(app, Role.OPERATOR, name="ops")
    operator = TestClient(app, headers=bearer(operator_token))
    anonymous = TestClient(app)
    since = time.time() - 1
    assert operator.get("/v1/devices").status_code == 200
    assert operator.post("/v1/tokens", json={"name": "n", "role": "viewer"}).status_code == 403
    assert anonymous.put("/v1/artifacts/a/b.gguf", content=b"x").status_code == 401
    assert operator.post("/v1/models", content=b"{}").status_code in (400, 404)
    made = admin.post("/v1/tokens", json={"name": "n", "role": "viewer"})
    assert made.status_code == 201

    entries = admin.get("/v1/audit", params={"since": since}).json()["items"]
    seen = [(e["method"], e["path"], e["status"], e["token_name"]) for e in entries]
    assert seen == [
        ("POST", "/v1/tokens", 201, "root"),
        ("POST", "/v1/models", seen[1][2], "ops"),
        ("PUT", "/v1/artifacts/a/b.gguf", 401, None),
        ("POST", "/v1/tokens", 403, "ops"),
    ]
    assert entries[0]["route"] == "/v1/tokens" and entries[0]["role"] == "admin"
    # the audit log names tokens by id, and never holds a token itself
    assert made.json()["token"] not in str(entries)
    assert operator.get("/v1/audit").status_code == 403


def test_audit_pages_newest_first_and_filters_by_token(app: Any, admin: TestClient) -> None:
    ops_token = issue(app, Role.OPERATOR, name="ops")
    ops = TestClient(app, headers=bearer(ops_token))
    ops_id = ops.get("/v1/auth/whoami").json()["id"]
    for n in range(5):
        ops.post("/v1/models", content=f"{n}".encode())
    first = admin.get("/v1/audit", params={"limit": 2, "token_id": ops_id}).json()
    second = admin.get("/v1/audit", params={"limit": 2, "token_id": ops_id,
                                            "cursor": first["next"]}).json()
    ids = [e["id"] for e in first["items"] + second["items"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4
    assert {e["token_id"] for e in first["items"] + second["items"]} == {ops_id}
    assert admin.get("/v1/audit", params={"cursor": "bad"}).status_code == 422


def test_first_start_logs_one_admin_token_that_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controlplane.auth.bootstrap")
    app, engine = registry_api(tmp_path)
    try:
        (line,) = [r.getMessage() for r in caplog.records if "TOKEN" in r.getMessage()]
        token = re.search(r"TOKEN (\S+)", line)[1]  # type: ignore[index]
        assert token == app.state.bootstrap_token
        me = TestClient(app).get("/v1/auth/whoami", headers=bearer(token)).json()
        assert me["role"] == "admin" and me["name"] == "bootstrap"
        caplog.clear()
        # a second start on the same database creates and prints nothing
        from controlplane.api import create_app

        again = create_app(app.state.context)
        assert again.state.bootstrap_token is None
        assert not [r for r in caplog.records if "TOKEN" in r.getMessage()]
    finally:
        engine.dispose()


def test_a_configured_bootstrap_token_becomes_the_admin_and_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "slmf_configured-" + "k" * 40
    app, engine = registry_api(tmp_path, bootstrap_token=secret)
    try:
        assert app.state.bootstrap_token is None
        me = TestClient(app).get("/v1/auth/whoami", headers=bearer(secret)).json()
        assert me["role"] == "admin"
        assert secret not in caplog.text
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("mqtt_password", "changethis", "placeholder"),
        ("mqtt_password", "Password", "placeholder"),
        ("bootstrap_token", "changeme", "placeholder"),
        ("bootstrap_token", "short-but-not-default", "32 to 256"),
    ],
)
def test_default_secrets_are_refused_outside_dev(
    tmp_path: Path, field: str, value: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        ControlPlaneSettings(data_dir=tmp_path, **{field: value})
    # `slmfleet dev` runs with throwaway secrets
    dev = ControlPlaneSettings(data_dir=tmp_path, dev_mode=True, **{field: value})
    assert getattr(dev, field).get_secret_value() == value
