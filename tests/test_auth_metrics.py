"""API latency in /metrics (labelled by route template and status) and JSON log lines."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from controlplane.auth.roles import Role
from controlplane.logs import JsonFormatter
from tests.support.auth import bearer, issue
from tests.support.registry import registry_api


def test_api_requests_are_timed_by_route_template_and_status(tmp_path: Path) -> None:
    app, engine = registry_api(tmp_path)
    try:
        client = TestClient(app)
        viewer = bearer(issue(app, Role.VIEWER))
        assert client.get("/v1/devices/pi-1").status_code == 401
        assert client.get("/v1/devices/pi-1", headers=viewer).status_code == 404
        assert client.get("/v1/devices/pi-2", headers=viewer).status_code == 404
        assert client.post("/v1/tokens", headers=viewer, json={}).status_code == 403
        text = client.get("/metrics").text
    finally:
        engine.dispose()
    counts = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "slmfleet_api_request_seconds"
        for s in f.samples
        if s.name.endswith("_count")
    }
    assert counts[("GET", "/v1/devices/{device_id}", "401")] == 1
    # two devices, one label value: the template, never the raw path
    assert counts[("GET", "/v1/devices/{device_id}", "404")] == 2
    assert counts[("POST", "/v1/tokens", "403")] == 1
    assert not any("pi-1" in route for _, route, _ in counts)


def test_json_log_lines_carry_level_logger_message_extras_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("controlplane.x", logging.WARNING, __file__, 1,
                               "device %s rejected", ("pi-1",), None)
    record.device_id = "pi-1"
    doc = json.loads(formatter.format(record))
    assert doc["level"] == "WARNING" and doc["logger"] == "controlplane.x"
    assert doc["msg"] == "device pi-1 rejected" and doc["device_id"] == "pi-1"
    assert doc["ts"].endswith("Z")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_every_metric_the_grafana_dashboard_queries_is_exported(tmp_path: Path) -> None:
    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\b(slmfleet_[a-z_]+)", e)}
    assert len(wanted) >= 8
    app, engine = registry_api(tmp_path)
    try:
        client = TestClient(app)
        client.get("/v1/devices")  # one timed request, so the histogram has series
        text = client.get("/metrics").text
    finally:
        engine.dispose()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    # gauges only present once there is data (a batch, a device) are named in HELP lines
    exported |= set(re.findall(r"^# HELP (\S+)", text, re.M))
    exported |= {f"{name}_total" for name in exported}
    # reported only after the ingest committed its first batch
    source = (Path(__file__).parent.parent / "controlplane" / "metrics.py").read_text()
    assert '"slmfleet_ingest_last_batch_seconds"' in source
    exported.add("slmfleet_ingest_last_batch_seconds")
    missing = {m for m in wanted if m not in exported}
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
