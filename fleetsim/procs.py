"""One scenario's fleet split over several simulator processes (``slmfleet simulate --procs N``).

One simulator process sends ~10,000 heartbeats a second on a fraction of a
core, but it is one thread: on a machine whose cores are busy, the
scheduler can hold it back for a second at a time and the asked rate is
lost for that second. ``--procs N`` starts N processes, process *k*
simulating devices k, k + N, k + 2N, ... of the same scenario (the same
device ids, boards and labels as one process would have), each on
connections of its own; the parent only waits and adds up their summaries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from types import FrameType
from typing import Any

#: the environment variable a part reads its broker password from (not its command line)
PASSWORD_ENV = "SLMFLEET_SIM_PASSWORD"


def part_command(options: Sequence[str], k: int, n: int) -> list[str]:
    """The command line of part ``k`` of ``n``: ``slmfleet simulate`` with ``options``."""
    return [sys.executable, "-m", "slmfleet", "simulate", *options,
            "--part", f"{k}/{n}", "--output", "json"]


def parse_part(text: str) -> tuple[int, int]:
    """``"k/n"`` as (k, n), 0 <= k < n; ValueError saying what is wrong otherwise."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"--part {text}: k must be in 0..n-1")
    return k, n


def run_parts(options: Sequence[str], n: int, password: str) -> dict[str, Any]:
    """Run ``n`` parts to their end and return their merged summary.

    SIGINT and SIGTERM to this process are passed on to every part, which
    stops its devices cleanly and still prints its summary.
    """
    env = {**os.environ, PASSWORD_ENV: password}
    parts = [subprocess.Popen(part_command(options, k, n), stdout=subprocess.PIPE, env=env,
                              text=True) for k in range(n)]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for proc in parts:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        outputs = [proc.communicate()[0] for proc in parts]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    failed = [k for k, proc in enumerate(parts) if proc.returncode != 0]
    if failed:
        raise RuntimeError(f"simulator part(s) {failed} of {n} failed; their errors are above")
    return merge([json.loads(out.strip().splitlines()[-1]) for out in outputs])


def merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from several parts': counts added, seconds lined up by wall time."""
    base = min(s["started_wall"] for s in summaries)
    per_second: list[int] = []
    for s in summaries:
        offset = round(s["started_wall"] - base)
        seconds = s["heartbeats_per_second"]
        per_second.extend([0] * (offset + len(seconds) - len(per_second)))
        for i, count in enumerate(seconds):
            per_second[offset + i] += count
    out: dict[str, Any] = {"started_wall": base, "parts": len(summaries),
                           "elapsed_s": max(s["elapsed_s"] for s in summaries),
                           "published_per_s": round(sum(s["published_per_s"]
                                                        for s in summaries), 1),
                           "publish_errors": sum(s["publish_errors"] for s in summaries),
                           "heartbeats_per_second": per_second}
    for key in ("published", "assignments", "states", "active"):
        total: Counter[str] = Counter()
        for s in summaries:
            total.update(s.get(key, {}))
        out[key] = dict(total)
    out["devices"] = sum(s.get("devices", 0) for s in summaries)
    return out
