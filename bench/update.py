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
size cap, throughput floor, streaming sha256 on a second thread, writeback
started as bytes arrive) and by a bare httpx stream written to disk with no
checks at all; then both again followed by the fsync the store's install
does (the durable figures). Then a folder variant, the ONNX SmolLM2 folder
the set-up built, fetched file by file by
``agent.update.folder.download_folder`` against the same bare stream per
file. Target: download+verify >= 0.8 of raw, for a file and for a folder.

Part 3, LoRA adapters (``bench/_adapters.py``): moving the device to a new
adapter against a full model update (seconds and bytes), applying an
adapter against loading the base in a fresh worker, and the evaluation set's
score on the base alone and with the adapter applied.

``--throughput`` runs part 2 alone.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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


def _raw_download(client: httpx.Client, url: str, dest: Path) -> None:
    """The baseline: bytes off the socket into a file, nothing checked."""
    with client.stream("GET", url) as response, dest.open("wb") as f:
        response.raise_for_status()
        for chunk in response.iter_raw():
            f.write(chunk)


def _fsync(path: Path) -> None:
    """What the store's install adds to a download: its bytes made durable."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alternate(label: str, size: int, ways: dict[str, Callable[[Path], None]],
               work: Path) -> dict[str, float]:
    """MB/s of each way of fetching the same bytes, medians over alternating rounds."""
    speeds: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(THROUGHPUT_ROUNDS):
        for name, fetch in ways.items():
            dest = work / f"{label}-{name}-{i}"
            t0 = time.perf_counter()
            fetch(dest)
            speeds[name].append(size / (time.perf_counter() - t0) / 1e6)
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        print(f"{label} round {i + 1}/{THROUGHPUT_ROUNDS}: "
              + ", ".join(f"{name} {v[-1]:.0f} MB/s" for name, v in speeds.items()), flush=True)
    return {name: statistics.median(v) for name, v in speeds.items()}


def throughput(work: Path, model: Path) -> dict[str, float]:
    """Download+verify against raw HTTP of the same file, then with both made durable."""
    from agent.update.fetcher import HttpFetcher, download_artifact
    from tests.support.http_artifacts import ArtifactServer
    from tests.support.updates import file_sha256, link_or_copy

    link_or_copy(model, work / "served" / "model.gguf")
    size, sha256 = model.stat().st_size, file_sha256(model)
    with (ArtifactServer(work / "served") as server, HttpFetcher() as fetcher,
          httpx.Client() as client):
        url = server.url("model.gguf")

        def raw(dest: Path) -> None:
            _raw_download(client, url, dest)

        def verified(dest: Path) -> None:
            download_artifact(fetcher, url, dest, expected_size=size, expected_sha256=sha256,
                              min_bytes_per_s=1e6, stall_window_s=10)

        def durable(fetch: Callable[[Path], None]) -> Callable[[Path], None]:
            return lambda dest: (fetch(dest), _fsync(dest))  # type: ignore[func-returns-value]

        raw(work / "warm-up")  # page cache and connection warm for both
        return _alternate("file", size, {
            "raw": raw, "verified": verified,
            "raw+fsync": durable(raw), "verified+fsync": durable(verified),
        }, work)


def folder_throughput(work: Path) -> dict[str, float] | None:
    """The same for a folder variant: the ONNX SmolLM2 folder, file by file (None if not built)."""
    from agent.update.fetcher import HttpFetcher, download_artifact
    from agent.update.folder import download_folder, file_url
    from tests.support.genai import onnx_genai_path
    from tests.support.http_artifacts import ArtifactServer
    from tests.support.updates import folder_files, link_or_copy

    source = onnx_genai_path()
    if source is None:
        print("no ONNX model folder built (scripts/build-onnx-genai.sh): folder case skipped")
        return None
    for f in source.iterdir():
        link_or_copy(f, work / "served-folder" / "onnx" / f.name)
    files = folder_files(work / "served-folder" / "onnx")
    size = sum(f.size_bytes for f in files)
    print(f"folder {len(files)} files, {size / 1e6:.1f} MB", flush=True)
    with (ArtifactServer(work / "served-folder") as server, HttpFetcher() as fetcher,
          httpx.Client() as client):
        url = server.url("onnx")

        def raw(dest: Path) -> None:
            dest.mkdir()
            for f in files:
                _raw_download(client, file_url(url, f.path), dest / f.path)

        def verified(dest: Path) -> None:
            download_folder(functools.partial(download_artifact, fetcher), url, dest, files,
                            min_bytes_per_s=1e6, stall_window_s=10)

        raw(work / "warm-up-folder")
        return _alternate("folder", size, {"raw": raw, "verified": verified}, work)


def _download_figures(file: dict[str, float], folder: dict[str, float] | None) -> dict[str, float]:
    """The JSON figures of part 2, printed as a summary too."""
    verified, raw = file["verified"], file["raw"]
    print(f"download+verify {verified:.0f} MB/s vs raw {raw:.0f} MB/s "
          f"(ratio {verified / raw:.2f}, target >= 0.8)")
    figures = {
        "download_verify_mb_per_s": round(verified, 1),
        "raw_http_mb_per_s": round(raw, 1),
        "ratio_vs_raw": round(verified / raw, 3),
        "durable_verify_mb_per_s": round(file["verified+fsync"], 1),
        "durable_raw_mb_per_s": round(file["raw+fsync"], 1),
        "durable_ratio_vs_raw": round(file["verified+fsync"] / file["raw+fsync"], 3),
    }
    if folder is not None:
        print(f"folder: download+verify {folder['verified']:.0f} MB/s vs raw "
              f"{folder['raw']:.0f} MB/s (ratio {folder['verified'] / folder['raw']:.2f}, "
              f"target >= 0.8)")
        figures |= {
            "folder_download_verify_mb_per_s": round(folder["verified"], 1),
            "folder_raw_http_mb_per_s": round(folder["raw"], 1),
            "folder_ratio_vs_raw": round(folder["verified"] / folder["raw"], 3),
        }
    return figures


def main() -> None:
    """All three parts; ``--throughput`` runs part 2 alone."""
    model = _model_path()
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-update-"))
    print(f"model {model.name}, {model.stat().st_size / 1e6:.1f} MB; work dir {work}", flush=True)
    figures: dict[str, float] = {}
    if "--throughput" not in sys.argv[1:]:
        times, phases = assign_to_active(work, model)
        assign_s = statistics.median(times)
        print(f"assignment -> active: median {assign_s:.2f} s of {ROUNDS}")
        figures |= {
            "assign_to_active_s": round(assign_s, 3),
            "assign_to_active_max_s": round(max(times), 3),
            **{k: round(v, 3) for k, v in phases.items()},
        }
    figures |= _download_figures(throughput(work, model), folder_throughput(work))
    if "--throughput" not in sys.argv[1:]:
        figures |= adapter_figures(work, model)
    report({
        **figures,
        "artifact_mb": round(model.stat().st_size / 1e6, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
