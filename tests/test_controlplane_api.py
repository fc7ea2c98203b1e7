"""The device API over a real SQLite registry, seeded through the ingest's own writer.

The app is built as the service builds it; its ingest is a real, never
started :class:`MqttIngest` (no broker needed: the registry is written with
:class:`BatchStore`, exactly what the ingest worker does with each batch).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

import protocol as p
from controlplane.api import create_app
from controlplane.api.pagination import encode_cursor
from controlplane.config import ControlPlaneSettings
from controlplane.context import AppContext
from controlplane.db import make_engine, session_factory, upgrade_to_head
from controlplane.db.writes import BatchStore, IngestItem
from controlplane.ingest import MqttIngest
from tests.support import database
from tests.support.auth import admin_client
from tests.support.controlplane import hello, state, telemetry

PAGE_MAX = 5
ODD_LABELS = {'owner"s': "Zürich ☃", "eq": "a=b", "sp ace": "x&y?#"}


def _item(kind: p.TopicKind, message: Any, *, retained: bool = False) -> IngestItem:
    return IngestItem(kind, message, time.time(), retained)


def _hello(device_id: str, **kwargs: Any) -> IngestItem:
    retained = kwargs.pop("retained", False)
    return _item(p.TopicKind.HELLO, hello(device_id, **kwargs), retained=retained)


def _offline(device_id: str) -> IngestItem:
    return _item(p.TopicKind.STATE, state(device_id, online=False))


def _make_app(tmp_path: Path, database_url: str | None = None) -> tuple[TestClient, Engine]:
    given = {"database_url": database_url} if database_url else {}
    settings = ControlPlaneSettings(
        data_dir=tmp_path, page_max=PAGE_MAX, **given, **database.settings(given)
    )
    engine = make_engine(settings.database_url)
    if database_url is None:
        upgrade_to_head(engine)
    context = AppContext(settings, engine, session_factory(engine), MqttIngest(settings))
    return admin_client(create_app(context)), engine


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Any]:
    engines: list[Engine] = []

    def make(database_url: str | None = None) -> tuple[TestClient, BatchStore]:
        client, engine = _make_app(tmp_path, database_url)
        engines.append(engine)
        return client, BatchStore(engine)

    yield make
    for engine in engines:
        engine.dispose()


FLEET = {
    "bare-01": None,  # heard only through telemetry: no hello fields
    "jet-01": "small",
    "jet-02": "small",
    "jet-03": "small",
    "pi-01": "micro",
    "pi-02": "micro",
    "pi-03": "micro",
    "pi-04": "micro",
    "pi-05": "micro",
    "ws-01": "medium",
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, database_backend: str) -> Iterator[TestClient]:
    client, engine = _make_app(tmp_path_factory.mktemp("api"))
    store = BatchStore(engine)
    items = [_item(p.TopicKind.TELEMETRY, telemetry("bare-01", 0))]
    for n in range(1, 6):
        labels = {"site": "lab", "rack": f"r{n % 2}"}
        items.append(_hello(f"pi-0{n}", labels=labels))
    items.append(_offline("pi-05"))
    for n in range(1, 4):
        items.append(
            _hello(
                f"jet-0{n}", tier="small", profile="jetson-orin-nano-8gb", labels={"site": "field"}
            )
        )
    # known only from a retained replay: in the registry, but never heard live
    items.append(
        _hello(
            "ws-01",
            tier="medium",
            profile="x86_64-gpu-workstation",
            labels=ODD_LABELS,
            retained=True,
        )
    )
    store.write(items)
    # 25 heartbeats for pi-01, in two batches, with ts increasing with seq
    store.write(
        [_item(p.TopicKind.TELEMETRY, telemetry("pi-01", s, ts=1000.0 + s)) for s in range(12)]
    )
    store.write(
        [_item(p.TopicKind.TELEMETRY, telemetry("pi-01", s, ts=1000.0 + s)) for s in range(12, 25)]
    )
    yield client
    engine.dispose()


def _ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()["items"]]


def _list(client: TestClient, **params: Any) -> list[str]:
    return _ids(client.get("/v1/devices", params=params))


def _error(response: Any, param: str) -> str:
    assert response.status_code == 422, response.text
    (err,) = [e for e in response.json()["detail"] if e["loc"] == ["query", param]]
    return err["msg"]


# -- filters -------------------------------------------------------------------


def test_default_listing_is_one_page_of_page_max_by_id(fleet: TestClient) -> None:
    page = fleet.get("/v1/devices").json()
    assert [d["id"] for d in page["items"]] == sorted(FLEET)[:PAGE_MAX]
    assert page["next"] is not None


@pytest.mark.parametrize("tier", ["micro", "small", "medium"])
def test_filter_by_tier(fleet: TestClient, tier: str) -> None:
    expected = sorted(d for d, t in FLEET.items() if t == tier)
    assert _list(fleet, tier=tier, limit=PAGE_MAX) == expected


def test_filter_by_profile(fleet: TestClient) -> None:
    assert _list(fleet, profile="jetson-orin-nano-8gb") == ["jet-01", "jet-02", "jet-03"]
    assert _list(fleet, profile="x86_64-gpu-workstation") == ["ws-01"]
    assert _list(fleet, profile="no-such-board") == []


def test_filter_by_online(fleet: TestClient) -> None:
    # pi-05 said offline; ws-01 is known only from a retained hello
    assert _list(fleet, online="false") == ["pi-05", "ws-01"]
    online = set(FLEET) - {"pi-05", "ws-01"}
    seen: list[str] = []
    cursor = None
    while True:
        page = fleet.get(
            "/v1/devices", params={"online": "true", **({"cursor": cursor} if cursor else {})}
        ).json()
        assert all(d["online"] for d in page["items"])
        seen += [d["id"] for d in page["items"]]
        if not (cursor := page["next"]):
            break
    assert seen == sorted(online)


def test_filters_combine(fleet: TestClient) -> None:
    assert _list(fleet, tier="micro", online="false") == ["pi-05"]
    assert _list(fleet, tier="small", label="site=lab") == []
    assert _list(fleet, tier="micro", profile="raspberry-pi-4-4gb", label="rack=r0") == [
        "pi-02",
        "pi-04",
    ]


def test_several_labels_must_all_match(fleet: TestClient) -> None:
    assert _list(fleet, label="rack=r1") == ["pi-01", "pi-03", "pi-05"]
    assert _list(fleet, label=["site=lab", "rack=r1"]) == ["pi-01", "pi-03", "pi-05"]
    assert _list(fleet, label=["site=field", "rack=r1"]) == []
    # key and value must match on the same label, not across two
    assert _list(fleet, label="site=r1") == []


def test_labels_with_quotes_unicode_and_separators(fleet: TestClient) -> None:
    for key, value in ODD_LABELS.items():
        assert _list(fleet, label=f"{key}={value}") == ["ws-01"], (key, value)
    assert _list(fleet, label=[f"{k}={v}" for k, v in ODD_LABELS.items()]) == ["ws-01"]
    # only the first '=' separates key from value
    assert _list(fleet, label="eq=a") == []
    assert _list(fleet, label='owner"s=Zurich ☃') == []
    detail = fleet.get("/v1/devices/ws-01").json()
    assert detail["labels"] == ODD_LABELS


def test_bad_filters_are_422(fleet: TestClient) -> None:
    assert "key=value" in _error(fleet.get("/v1/devices", params={"label": "site"}), "label")
    assert "key=value" in _error(fleet.get("/v1/devices", params={"label": "=lab"}), "label")
    assert "micro" in _error(fleet.get("/v1/devices", params={"tier": "huge"}), "tier")
    _error(fleet.get("/v1/devices", params={"online": "maybe"}), "online")


# -- pagination ------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "sizes"), [(3, [3, 3, 3, 1]), (5, [5, 5]), (1, [1] * 10)])
def test_cursor_walks_every_device_exactly_once(
    fleet: TestClient, limit: int, sizes: list[int]
) -> None:
    seen: list[str] = []
    pages: list[int] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        page = fleet.get("/v1/devices", params=params).json()
        pages.append(len(page["items"]))
        seen += [d["id"] for d in page["items"]]
        if page["next"] is None:
            break
        params["cursor"] = page["next"]
    assert seen == sorted(FLEET)
    assert pages == sizes


def test_cursor_keeps_the_filter_pages_consistent(fleet: TestClient) -> None:
    first = fleet.get("/v1/devices", params={"label": "site=lab", "limit": 2}).json()
    second = fleet.get(
        "/v1/devices", params={"label": "site=lab", "limit": 2, "cursor": first["next"]}
    ).json()
    third = fleet.get(
        "/v1/devices", params={"label": "site=lab", "limit": 2, "cursor": second["next"]}
    ).json()
    assert [[d["id"] for d in pg["items"]] for pg in (first, second, third)] == [
        ["pi-01", "pi-02"],
        ["pi-03", "pi-04"],
        ["pi-05"],
    ]
    assert third["next"] is None


def test_limit_above_page_max_is_422_naming_the_cap(fleet: TestClient) -> None:
    msg = _error(fleet.get("/v1/devices", params={"limit": PAGE_MAX + 1}), "limit")
    assert msg == f"limit must be at most {PAGE_MAX}"
    _error(fleet.get("/v1/devices", params={"limit": 0}), "limit")
    _error(fleet.get("/v1/devices", params={"limit": "ten"}), "limit")
    assert len(_list(fleet, limit=PAGE_MAX)) == PAGE_MAX


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        _b64(b"not json"),
        _b64(json.dumps({"v": 2, "after": "pi-01"}).encode()),
        _b64(json.dumps({"v": 1}).encode()),
        _b64(json.dumps({"v": 1, "after": 7}).encode()),
        _b64(json.dumps(["pi-01"]).encode()),
        _b64(b"\xff\xfe"),
    ],
)
def test_bad_cursor_is_422(fleet: TestClient, cursor: str) -> None:
    assert _error(fleet.get("/v1/devices", params={"cursor": cursor}), "cursor") == (
        "invalid cursor"
    )


def test_pages_stay_stable_while_devices_are_added(app_factory: Any) -> None:
    client, store = app_factory()
    store.write([_hello(f"a-0{n}") for n in range(1, 7)])
    first = client.get("/v1/devices", params={"limit": 3}).json()
    assert [d["id"] for d in first["items"]] == ["a-01", "a-02", "a-03"]
    store.write([_hello("a-00"), _hello("a-99")])  # one before the cursor, one after
    rest: list[str] = []
    cursor = first["next"]
    while cursor:
        page = client.get("/v1/devices", params={"limit": 3, "cursor": cursor}).json()
        rest += [d["id"] for d in page["items"]]
        cursor = page["next"]
    assert rest == ["a-04", "a-05", "a-06", "a-99"]
    # a cursor is a position, not a device: an id no device has works too
    assert _list(client, cursor=encode_cursor("a-055")) == ["a-06", "a-99"]


# -- one device -------------------------------------------------------------------


def test_device_detail_has_capabilities_and_newest_telemetry_first(fleet: TestClient) -> None:
    r = fleet.get("/v1/devices/pi-01")
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["id"], d["tier"], d["profile"], d["online"]) == (
        "pi-01",
        "micro",
        "raspberry-pi-4-4gb",
        True,
    )
    assert d["labels"] == {"site": "lab", "rack": "r1"}
    assert d["capabilities"]["cpu"]["cores"] == 4
    assert d["runtimes"] == [{"name": "llama.cpp", "version": "0.3.2", "providers": []}]
    assert d["active_model"]["name"] == "smollm2"
    assert [t["seq"] for t in d["recent_telemetry"]] == list(range(24, 4, -1))
    assert d["last_seen"] is not None and d["first_seen"] <= d["last_seen"]


def test_device_heard_only_through_telemetry_has_no_hello_fields(fleet: TestClient) -> None:
    d = fleet.get("/v1/devices/bare-01").json()
    assert (d["tier"], d["profile"], d["capabilities"], d["labels"]) == (None, None, None, {})
    assert d["online"] is True
    assert [t["seq"] for t in d["recent_telemetry"]] == [0]


def test_device_from_retained_hello_only_was_never_seen_live(fleet: TestClient) -> None:
    d = fleet.get("/v1/devices/ws-01").json()
    assert d["tier"] == "medium"
    assert d["online"] is False
    assert d["last_seen"] is None


@pytest.mark.parametrize("device_id", ["nope", "PI-01", "pi-01 ", "ünï"])
def test_unknown_device_is_404_naming_it(fleet: TestClient, device_id: str) -> None:
    r = fleet.get(f"/v1/devices/{device_id}")
    assert r.status_code == 404
    assert r.json() == {"detail": f"device {device_id!r} not found"}


# -- service routes ------------------------------------------------------------------


def test_healthz_reports_mqtt_down_with_503(fleet: TestClient) -> None:
    # the ingest of this app was never started, so it is not subscribed
    r = fleet.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "degraded", "database": True, "mqtt": False, "leader": None}


def test_healthz_reports_an_unreachable_database(app_factory: Any, tmp_path: Path) -> None:
    client, _ = app_factory(f"sqlite:///{tmp_path / 'missing-dir' / 'cp.db'}")
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["database"] is False
    # the listing fails as a server error, not as an empty fleet
    client_no_raise = TestClient(
        client.app, raise_server_exceptions=False, headers=client.headers
    )
    assert client_no_raise.get("/v1/devices").status_code == 500


def test_metrics_count_devices_by_tier_and_state(fleet: TestClient) -> None:
    r = fleet.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    devices = {
        (s.labels["tier"], s.labels["online"]): s.value
        for s in families["slmfleet_devices"].samples
    }
    assert devices == {
        ("unknown", "true"): 1,
        ("micro", "true"): 4,
        ("micro", "false"): 1,
        ("small", "true"): 3,
        ("medium", "false"): 1,
    }
    assert families["slmfleet_mqtt_connected"].samples[0].value == 0


def test_openapi_lists_the_routes(fleet: TestClient) -> None:
    r = fleet.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in (
        "/v1/devices",
        "/v1/devices/{device_id}",
        "/healthz",
        "/metrics",
        "/v1/ingest/stats",
    ):
        assert "get" in paths[path], path
    params = {q["name"] for q in paths["/v1/devices"]["get"]["parameters"]}
    assert params == {"tier", "profile", "online", "label", "assignment_form", "limit", "cursor"}
    assert "404" in paths["/v1/devices/{device_id}"]["get"]["responses"]
    assert fleet.get("/docs").status_code == 200
