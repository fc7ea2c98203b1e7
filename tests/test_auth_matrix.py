"""Role x route matrix over every operation in the OpenAPI schema.

Each route is called by: no token, a viewer, an operator, an admin, a revoked
and an expired admin token, and a device's MQTT credential (as a bearer
token and as HTTP Basic). The expectation is written out here, apart from
the policy code: reads need viewer, other mutations operator, deletes and
everything about tokens, audit, keys and device credentials admin; health,
metrics, docs and artifact downloads need nothing.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controlplane.auth.roles import Role
from tests.support.auth import bearer, issue
from tests.support.registry import registry_api
from tests.support.signer import TrustSimulator

#: (method, template) -> role needed; None: open to anyone
OPEN: set[tuple[str, str]] = {
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/artifacts/{path}"),
    ("HEAD", "/v1/artifacts/{path}"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
}
#: a 5xx that is an operation's documented answer in this app, which has no
#: broker: health is "degraded" (503), as a load balancer must be told
DOCUMENTED_5XX: dict[tuple[str, str], int] = {("GET", "/healthz"): 503}
ADMIN_PREFIXES = ("/v1/tokens", "/v1/audit", "/v1/keys", "/v1/blobs/gc")
ADMIN_PATTERNS = (re.compile(r"^/v1/devices/\{[^}]+\}/credentials"),)
RANK = {None: -1, "viewer": 0, "operator": 1, "admin": 2}


def expected_role(method: str, template: str) -> str | None:
    """Who may call it, stated independently of controlplane.auth.policy."""
    if (method, template) in OPEN:
        return None
    if template.startswith(ADMIN_PREFIXES) or any(p.match(template) for p in ADMIN_PATTERNS):
        return "admin"
    if method in ("GET", "HEAD"):
        return "viewer"
    if method == "DELETE":
        return "admin"
    return "operator"


def concrete(template: str) -> str:
    """A real path for ``template``: every parameter filled with a plausible value."""
    return re.sub(r"\{([^}]+)\}", lambda m: "a/b.gguf" if m[1] == "path" else "x-1", template)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    tmp = tmp_path_factory.mktemp("matrix")
    app, engine = registry_api(tmp, TrustSimulator())
    yield app, engine, tmp / "cp" / "controlplane.db"
    engine.dispose()


@pytest.fixture(scope="module")
def callers(api: tuple[Any, Any, Path]) -> dict[str, dict[str, str]]:
    app, _, _ = api
    past = time.time() - 3600
    admin = TestClient(app, headers=bearer(issue(app, Role.ADMIN)))
    made = admin.post("/v1/tokens", json={"name": "revoked", "role": "admin"})
    assert made.status_code == 201, made.text
    assert admin.delete(f"/v1/tokens/{made.json()['id']}").status_code == 200
    revoked = made.json()["token"]
    device_password = "device-mqtt-password-" + "q" * 20
    basic = base64.b64encode(f"pi-01:{device_password}".encode()).decode()
    return {
        "none": {},
        "viewer": bearer(issue(app, Role.VIEWER)),
        "operator": bearer(issue(app, Role.OPERATOR)),
        "admin": bearer(issue(app, Role.ADMIN)),
        "revoked": bearer(revoked),
        "expired": bearer(issue(app, Role.ADMIN, name="expired", expires_in_s=60, now=past)),
        "device-bearer": bearer(device_password),
        "device-basic": {"Authorization": f"Basic {basic}"},
    }


def _operations(app: Any) -> list[tuple[str, str]]:
    ops = []
    for template, item in app.openapi()["paths"].items():
        for method in item:
            if method in ("get", "head", "post", "put", "patch", "delete"):
                ops.append((method.upper(), template))
    return sorted(ops)


def test_every_operation_answers_each_caller_as_its_role_allows(
    api: tuple[Any, Any, Path], callers: dict[str, dict[str, str]]
) -> None:
    app, _, _ = api
    client = TestClient(app, raise_server_exceptions=False)
    operations = [*_operations(app), ("GET", "/docs"), ("GET", "/openapi.json")]
    # the schema really lists the API, not a handful of routes
    assert len(operations) >= 15
    wrong = []
    for method, template in operations:
        needed = expected_role(method, template)
        url = concrete(template)
        for caller, headers in callers.items():
            # a JSON body of the wrong shape: allowed callers get a 4xx from validation
            body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
            status = client.request(method, url, headers=headers, **body).status_code
            role = caller if caller in RANK else None
            if needed is None or (role is not None and RANK[role] >= RANK[needed]):
                # allowed: past the policy, and answered by the route, never a server error
                server_error = status >= 500 and DOCUMENTED_5XX.get((method, template)) != status
                ok = not server_error and status not in (401, 403)
            elif role is None:
                ok = status == 401
            else:
                ok = status == 403
            if not ok:
                wrong.append(f"{caller:13} {method:6} {template} -> {status} (needs {needed})")
    assert not wrong, "\n".join(wrong)


def test_the_schema_states_each_operations_role(api: tuple[Any, Any, Path]) -> None:
    app, _, _ = api
    schema = app.openapi()
    assert schema["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
    for method, template in _operations(app):
        op = schema["paths"][template][method.lower()]
        needed = expected_role(method, template)
        if needed is None:
            assert op["security"] == [], (method, template)
        else:
            assert op["x-required-role"] == needed, (method, template)
            assert "401" in op["responses"], (method, template)


def test_an_unknown_path_needs_a_token_before_it_is_a_404(
    api: tuple[Any, Any, Path], callers: dict[str, dict[str, str]]
) -> None:
    client = TestClient(api[0])
    assert client.get("/v1/no-such-thing").status_code == 401
    assert client.get("/v1/no-such-thing", headers=callers["viewer"]).status_code == 404


def test_an_issued_token_is_nowhere_in_a_database_dump(api: tuple[Any, Any, Path]) -> None:
    app, _engine, db_file = api
    client = TestClient(app, headers=bearer(issue(app, Role.ADMIN)))
    made = client.post("/v1/tokens", json={"name": "dump-check", "role": "operator"})
    assert made.status_code == 201, made.text
    secret = made.json()["token"]
    assert client.get("/v1/devices", headers=bearer(secret)).status_code == 200
    with sqlite3.connect(db_file) as conn:
        dump = "\n".join(conn.iterdump())
    raw = b"".join(p.read_bytes() for p in db_file.parent.glob("controlplane.db*"))
    # the row is in the dump (by its hash), the token is not, in any form
    assert hashlib.sha256(secret.encode()).hexdigest() in dump
    for needle in (secret, secret.removeprefix("slmf_")):
        assert needle not in dump
        assert needle.encode() not in raw
