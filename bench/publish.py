"""Publishing the demo's releases: every byte every time against only what the store lacks.

    python bench/publish.py [--repeat 3] [--onnx]

Against a fresh control plane each run (in this process, its own broker),
publishes the ``slmfleet dev`` demo's two chat releases (``1.0.0`` and
``1.0.1``: the same SmolLM2 GGUF for micro, small and medium) in two modes:

- ``before``: what publishing did before the store was content addressed:
  each tier's file hashed on its own and sent in full to its own path
  (``controlplane.publishing.publish(dedupe=False)``);
- ``after``: each distinct file hashed once, ``POST /v1/blobs/missing``,
  only the blobs the store lacks sent.

With ``--onnx`` (and an ONNX build from scripts/build-onnx-genai.sh) a third
release follows, examples/smollm2-onnx.release.yaml: the same GGUF for micro
and the int4 ONNX folder for small; only the folder's bytes are new.

Prints a table, then one JSON line: per mode the median seconds and the
bytes hashed and sent for all releases, and the blobs the store holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import report, scratch_broker  # noqa: E402

from controlplane.broker_auth import CONTROL_PLANE_USER  # noqa: E402
from controlplane.devfleet.demo_specs import (  # noqa: E402
    GOOD_VERSION,
    NEXT_VERSION,
    demo_release_spec,
)
from controlplane.devfleet.model_cache import smollm2_path  # noqa: E402
from controlplane.keyfiles import save_key  # noqa: E402
from controlplane.publishing import publish  # noqa: E402
from controlplane.service import ControlPlane  # noqa: E402
from tests.support.controlplane import cp_settings  # noqa: E402
from tests.support.genai import onnx_genai_path  # noqa: E402
from tests.support.registry import write_trust  # noqa: E402
from tests.support.signer import TrustSimulator  # noqa: E402


def _specs(work: Path, model: Path, onnx: Path | None) -> list[Path]:
    specs = []
    for version in (GOOD_VERSION, NEXT_VERSION):
        path = work / f"smollm2-{version}.yaml"
        path.write_text(yaml.safe_dump(demo_release_spec(model, version), sort_keys=False))
        specs.append(path)
    if onnx is not None:
        os.environ["SLMFLEET_ONNX_MODEL"] = str(onnx)
        example = (ROOT / "examples" / "smollm2-onnx.release.yaml").read_text()
        path = work / "smollm2-onnx.yaml"
        path.write_text(example.replace(
            "~/.cache/slmfleet/models/SmolLM2-135M-Instruct.Q4_1.gguf", str(model)))
        specs.append(path)
    return specs


def run_once(broker: Any, dedupe: bool, model: Path, onnx: Path | None) -> dict[str, Any]:
    """Publish the releases to a fresh control plane; the figures of all of them."""
    work = Path(tempfile.mkdtemp(prefix="slmfleet-bench-publish-"))
    sim = TrustSimulator()
    trust = write_trust(work / "keys", sim)
    key, _ = save_key(work / "release", "release", sim.release_signers[0])
    credentials = (CONTROL_PLANE_USER, broker.users[CONTROL_PLANE_USER])
    plane = ControlPlane(cp_settings(work / "cp", broker, credentials,
                                     release_keys_file=trust.release_keys_file)).start()
    try:
        totals = {"s": 0.0, "bytes_hashed": 0, "bytes_sent": 0, "bytes_held": 0, "uploads": 0,
                  "per_release": []}
        for spec in _specs(work, model, onnx):
            started = time.perf_counter()
            done = publish(spec, [key], plane.api_url, dedupe=dedupe)
            elapsed = time.perf_counter() - started
            s = done.summary
            totals["s"] += elapsed
            for field in ("bytes_hashed", "bytes_sent", "bytes_held", "uploads"):
                totals[field] += getattr(s, field)
            totals["per_release"].append(
                {"ref": f"{done.version['name']}@{done.version['version']}", "s": elapsed,
                 "files": s.files, "bytes_sent": s.bytes_sent, "bytes_held": s.bytes_held})
        blobs = plane.settings.artifacts_dir / "blobs" / "sha256"
        totals["blobs_stored"] = sum(1 for _ in blobs.iterdir())
        return totals
    finally:
        plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--onnx", action="store_true",
                        help="publish the GGUF + ONNX example release third")
    args = parser.parse_args()
    model = smollm2_path()
    onnx = onnx_genai_path() if args.onnx else None
    if args.onnx and onnx is None:
        sys.exit("no ONNX build: run scripts/build-onnx-genai.sh")
    broker = scratch_broker([])
    figures: dict[str, Any] = {"model_bytes": model.stat().st_size}
    try:
        for mode, dedupe in (("before", False), ("after", True)):
            runs = [run_once(broker, dedupe, model, onnx) for _ in range(args.repeat)]
            last = runs[-1]
            figures[f"{mode}_s"] = round(statistics.median(r["s"] for r in runs), 2)
            for field in ("bytes_hashed", "bytes_sent", "bytes_held", "uploads", "blobs_stored"):
                figures[f"{mode}_{field}"] = last[field]
            print(f"{mode:>6}: {figures[f'{mode}_s']:6.2f} s (median of {args.repeat}), "
                  f"hashed {last['bytes_hashed'] / 1e6:7.1f} MB, "
                  f"sent {last['bytes_sent'] / 1e6:7.1f} MB in {last['uploads']} uploads, "
                  f"held {last['bytes_held'] / 1e6:6.1f} MB, {last['blobs_stored']} blobs stored")
            for release in last["per_release"]:
                print(f"        {release['ref']:<22} {release['files']} files "
                      f"sent {release['bytes_sent'] / 1e6:7.1f} MB  "
                      f"held {release['bytes_held'] / 1e6:7.1f} MB  {release['s']:.2f} s")
    finally:
        broker.stop()
    figures["speedup"] = round(figures["before_s"] / figures["after_s"], 2)
    figures["bytes_ratio"] = round(figures["after_bytes_sent"] / figures["before_bytes_sent"], 3)
    report(figures)


if __name__ == "__main__":
    main()
