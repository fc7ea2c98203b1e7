"""Shared helpers for benchmarks: a throwaway broker and the JSON last line."""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.broker_auth import CONTROL_PLANE_USER
from controlplane.devfleet.mosquitto import MosquittoBroker


def scratch_broker(device_ids: list[str]) -> MosquittoBroker:
    """Start a private Mosquitto with the control-plane user and ``device_ids``."""
    users = {CONTROL_PLANE_USER: secrets.token_urlsafe(12)}
    users |= {d: secrets.token_urlsafe(12) for d in device_ids}
    return MosquittoBroker(Path(tempfile.mkdtemp(prefix="slmfleet-bench-")), users=users).start()


def report(figures: dict[str, float | int | str]) -> None:
    """Print the figures as the last line, one JSON object (DESIGN.md convention)."""
    print(json.dumps(figures), flush=True)
