"""Model update: assignment published -> new model active, and download+verify throughput.

Part 1, end to end with real parts: a private Mosquitto (ACLs on), a real
``slmfleet agent run`` process with pinned trust files, the real
SmolLM2-135M GGUF (~93 MB) served over loopback HTTP with Range support,
a release and an assignment signed with real Ed25519 keys. The clock runs
from the retained publish on ``desired`` to the ``activated`` event:
verification, fit check, download with streaming sha256, install into a
versioned directory, health check (the model loaded in a subprocess and its
golden prompts answered) and the atomic switch. Several rounds, each a new
release version (so each downloads), median reported.

Part 2, the downloader against the wire: in one run, alternating, the same
file fetched by ``agent.update.fetcher.download_artifact`` (Range-capable fetch,
size cap, throughput floor, streaming sha256 on a second thread, fsync) and
by a bare httpx stream written to disk with no checks at all. Target (issue
3): download+verify >= 0.8 of raw.

Part 3, LoRA adapters (``bench/_adapters.py``): moving the device to a new
adapter against a full model update (seconds and bytes), and applying an
adapter against loading the base in a fresh worker.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _adapters import adapter_figures
from _common import report, scratch_broker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.devfleet.model_cache import smollm2_path

DEVICE = "bench-update"
ROUNDS = 3
THROUGHPUT_ROUNDS = 5


def _model_path() -> Path:
    path = smollm2_path()
    if not path.is_file():
        raise SystemExit(f"model missing at {path}: run scripts/bootstrap.sh")
    return path


def assign_to_active(work: Path, model: Path) -> tuple[list[float], dict[str, float]]:
    """Seconds from publish to activated, per round; and the agent's phase times (last round)."""
    import protocol as p
    from controlplane.broker_auth import CONTROL_PLANE_USER
    from tests.support.http_artifacts import ArtifactServer
    from tests.support.signer import TrustSimulator
    from tests.support.updates import DeviceRig, link_or_copy, variant_for

    broker = scratch_broker([DEVICE])
    link_or_copy(model, work / "artifacts" / "smollm2.gguf")
    times: list[float] = []
    phases: dict[str, float] = {}
    try:
        with ArtifactServer(work / "artifacts") as server:
            rig = DeviceRig(work / DEVICE, broker,
                            (CONTROL_PLANE_USER, broker.users[CONTROL_PLANE_USER]),
                            DEVICE, broker.users[DEVICE], server, TrustSimulator(),
                            log_level="INFO")
            try:
                rig.start()
                for i in range(ROUNDS):
                    variant = variant_for(server.directory / "smollm2.gguf", "smollm2.gguf")
                    payload = rig.assign(rig.release(f"1.0.{i}", variant))
                    aid = json.loads(payload)["signed"]["assignment_id"]
                    started = time.monotonic()
                    rig.publish(payload)
                    final = rig.wait_final(aid, timeout=120)
                    elapsed = time.monotonic() - started
                    if final.type != p.EventType.ACTIVATED:
                        raise SystemExit(f"round {i}: {final.type.value}: {final.reason}")
                    times.append(elapsed)
                    events = {e.type: e.ts for e in rig.events(aid)}
                    first_download = min(e.ts for e in rig.events(aid)
                                         if e.type == p.EventType.DOWNLOADING)
                    phases = {
                        "verify_fit_s": first_download - events[p.EventType.RECEIVED],
                        "download_install_s": events[p.EventType.STAGED] - first_download,
                        "health_check_s": events[p.EventType.HEALTH_PASSED]
                        - events[p.EventType.STAGED],
                        "activate_s": events[p.EventType.ACTIVATED]
                        - events[p.EventType.HEALTH_PASSED],
                    }
                    print(f"round {i + 1}/{ROUNDS}: assignment -> active in {elapsed:.2f} s "
                          f"({', '.join(f'{k} {v:.3f}' for k, v in phases.items())})",
                          flush=True)
            finally:
                rig.close()
    finally:
        broker.stop()
    return times, phases


def _raw_download(url: str, dest: Path) -> None:
    """The baseline: bytes off the socket into a file, nothing checked."""
    with httpx.Client() as client, client.stream("GET", url) as response, dest.open("wb") as f:
        response.raise_for_status()
        for chunk in response.iter_raw():
            f.write(chunk)


def throughput(work: Path, model: Path) -> tuple[float, float]:
    """(download+verify MB/s, raw MB/s), medians over alternating rounds."""
    from agent.update.fetcher import HttpFetcher, download_artifact
    from tests.support.http_artifacts import ArtifactServer
    from tests.support.updates import file_sha256, link_or_copy

    link_or_copy(model, work / "served" / "model.gguf")
    size, sha256 = model.stat().st_size, file_sha256(model)
    verified: list[float] = []
    raw: list[float] = []
    with ArtifactServer(work / "served") as server, HttpFetcher() as fetcher:
        url = server.url("model.gguf")
        _raw_download(url, work / "warm-up")  # page cache and connection warm for both
        for i in range(THROUGHPUT_ROUNDS):
            dest = work / f"raw-{i}"
            t0 = time.perf_counter()
            _raw_download(url, dest)
            raw.append(size / (time.perf_counter() - t0) / 1e6)
            dest.unlink()

            dest = work / f"verified-{i}.partial"
            t0 = time.perf_counter()
            download_artifact(fetcher, url, dest, expected_size=size, expected_sha256=sha256,
                              min_bytes_per_s=1e6, stall_window_s=10)
            verified.append(size / (time.perf_counter() - t0) / 1e6)
            dest.unlink()
            print(f"throughput round {i + 1}/{THROUGHPUT_ROUNDS}: download+verify "
                  f"{verified[-1]:.0f} MB/s, raw {raw[-1]:.0f} MB/s", flush=True)
    return statistics.median(verified), statistics.median(raw)


def main() -> None:
    model = _model_path()
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-update-"))
    print(f"model {model.name}, {model.stat().st_size / 1e6:.1f} MB; work dir {work}", flush=True)
    times, phases = assign_to_active(work, model)
    verified, raw = throughput(work, model)
    adapters = adapter_figures(work, model)
    assign_s = statistics.median(times)
    print(f"assignment -> active: median {assign_s:.2f} s of {ROUNDS}; "
          f"download+verify {verified:.0f} MB/s vs raw {raw:.0f} MB/s "
          f"(ratio {verified / raw:.2f}, target >= 0.8)")
    report({
        "assign_to_active_s": round(assign_s, 3),
        "assign_to_active_max_s": round(max(times), 3),
        **{k: round(v, 3) for k, v in phases.items()},
        "download_verify_mb_per_s": round(verified, 1),
        "raw_http_mb_per_s": round(raw, 1),
        "ratio_vs_raw": round(verified / raw, 3),
        "artifact_mb": round(model.stat().st_size / 1e6, 1),
        **adapters,
    })


if __name__ == "__main__":
    main()
