"""The console's fleet page with 10,000 devices: server time and bytes transferred.

    .venv/bin/python bench/console.py          # CONSOLE_DEVICES=N, CONSOLE_REQUESTS=N

Fills a fresh SQLite registry with simulated devices through the ingest's own
batch writer (the rows a real hello makes: tier, profile, labels, active
model, capabilities), serves the control plane's app with uvicorn on a
loopback port, signs in through the console's form, then asks for the first
fleet page (default page size, no filter) ``CONSOLE_REQUESTS`` times.

* server time: from the API's own request histogram
  (``slmfleet_api_request_seconds`` for ``GET /ui/``): authentication of the
  session, the queries (one page of devices, counts per tier and state) and
  the template, as the control plane measures every request;
* client time: the same requests seen from an HTTP client on the loopback;
* transfer: the page's HTML, then with its stylesheet and scripts (a first
  visit with an empty cache), uncompressed.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from _common import report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import protocol as p  # noqa: E402
from controlplane.db.writes import BatchStore, IngestItem  # noqa: E402
from tests.support.auth import issue  # noqa: E402
from tests.support.controlplane import hello  # noqa: E402
from tests.support.registry import registry_api  # noqa: E402

DEVICES = int(os.environ.get("CONSOLE_DEVICES", "10000"))
REQUESTS = int(os.environ.get("CONSOLE_REQUESTS", "50"))
TIERS = ("micro", "small", "medium")
BATCH = 500


def fill(app: object, devices: int) -> float:
    """``devices`` hellos (and an offline state for every fifth) through the batch writer."""
    store = BatchStore(app.state.context.engine)  # type: ignore[attr-defined]
    started = time.perf_counter()
    for first in range(0, devices, BATCH):
        items = []
        for n in range(first, min(devices, first + BATCH)):
            device_id = f"bench-{n:05d}"
            tier = TIERS[n % 3]
            message = hello(device_id, tier=tier, profile=f"board-{n % 7}",
                            labels={"site": f"site-{n % 40}", "row": str(n % 12)})
            items.append(IngestItem(p.TopicKind.HELLO, message, time.time(), False))
            online = n % 5 != 0
            items.append(IngestItem(p.TopicKind.STATE, p.State(
                device_id=device_id, ts=time.time(),
                state=p.DeviceState.ONLINE if online else p.DeviceState.OFFLINE),
                time.time(), False))
        store.write(items)
    return time.perf_counter() - started


def serve(app: object) -> tuple[uvicorn.Server, str]:
    """The app on a free loopback port, in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,  # type: ignore[arg-type]
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def sign_in(client: httpx.Client, token: str) -> None:
    """The console's own sign-in form."""
    form = client.get("/ui/sign-in")
    pre = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert pre is not None, form.text
    done = client.post("/ui/sign-in", data={"csrf": pre.group(1), "credential": token},
                       headers={"Origin": str(client.base_url).rstrip("/")})
    assert done.status_code == 303, done.text


def main() -> None:
    """Fill, serve, sign in, measure, report."""
    app, engine = registry_api(Path(tempfile.mkdtemp(prefix="slmfleet-console-bench-")))
    print(f"filling {DEVICES} devices", flush=True)
    fill_s = fill(app, DEVICES)
    print(f"filled in {fill_s:.1f} s; serving", flush=True)
    server, url = serve(app)
    registry = app.state.metrics_registry
    labels = {"method": "GET", "route": "/ui/", "status": "200"}
    try:
        with httpx.Client(base_url=url, follow_redirects=False, timeout=30) as client:
            sign_in(client, issue(app, "viewer", name="bench"))
            first = client.get("/ui/")
            assert first.status_code == 200 and "bench-00000" in first.text, first.text[:500]
            rows = first.text.count('<th scope="row"><a href="/ui/devices/')
            assets = re.findall(r'(?:href|src)="(/ui/static/[^"]+)"', first.text)
            asset_bytes = sum(len(client.get(a).content) for a in assets)
            before_sum = registry.get_sample_value("slmfleet_api_request_seconds_sum", labels)
            before_n = registry.get_sample_value("slmfleet_api_request_seconds_count", labels)
            wall = []
            for _ in range(REQUESTS):
                t0 = time.perf_counter()
                page = client.get("/ui/")
                wall.append((time.perf_counter() - t0) * 1000)
                assert page.status_code == 200
            server_s = registry.get_sample_value("slmfleet_api_request_seconds_sum",
                                                 labels) - before_sum
            served = registry.get_sample_value("slmfleet_api_request_seconds_count",
                                               labels) - before_n
            print(f"{served:.0f} requests, mean server time {1000 * server_s / served:.1f} ms",
                  flush=True)
    finally:
        server.should_exit = True
        engine.dispose()
    wall.sort()
    report({
        "devices": DEVICES,
        "rows_on_first_page": rows,
        "fill_s": round(fill_s, 1),
        "server_ms_mean": round(1000 * server_s / served, 1),
        "client_ms_p50": round(statistics.median(wall), 1),
        "client_ms_p95": round(wall[int(0.95 * (len(wall) - 1))], 1),
        "client_ms_max": round(wall[-1], 1),
        "html_bytes": len(first.content),
        "first_visit_bytes": len(first.content) + asset_bytes,
    })


if __name__ == "__main__":
    main()
