"""How a rollout looks on a terminal: stages and tiers with progress bars, gates, timeline.

Shared by ``slmfleet rollouts show/watch`` and ``slmfleet dev``.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .output import titled_table

#: member states in the order columns show them
STATES = ("succeeded", "assigned", "waiting", "pending", "failed", "incompatible",
          "rolled_back", "superseded")
_STYLE = {"succeeded": "green", "failed": "red", "rolled_back": "yellow",
          "incompatible": "dim", "assigned": "cyan", "waiting": "magenta"}
#: waiting devices listed by name; the rest are counted
WAITING_SHOWN = 10


def _bar(done: int, total: int) -> ProgressBar:
    return ProgressBar(total=max(total, 1), completed=done, width=24)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[s]} {s}" for s in STATES if counts.get(s)) or "-"


def headline(detail: dict[str, Any]) -> Text:
    """``r-… smollm2@1.1.0  active  stage 2/3 (50 %)`` and the reason, if any."""
    text = Text(f"{detail['id']}  {detail['model']}@{detail['version']}  ", style="bold")
    text.append(detail["state"], style=_STYLE.get(detail["state"], "bold"))
    text.append(f"  stage {detail['stage']}/{detail['stages']} ({detail['percent']:g} %)")
    if detail.get("reason"):
        text.append(f"\n{detail['reason']}", style="italic")
    return text


def stage_table(detail: dict[str, Any]) -> Table:
    """One row per stage: its share, bake time, status and a bar of devices done."""
    table = titled_table(
        "stages", "stage", "share", "bake", "status", "progress", "devices", expand=False
    )
    for stage in detail["per_stage"]:
        devices = stage["devices"]
        total = sum(devices.values())
        done = devices.get("succeeded", 0)
        table.add_row(
            str(stage["index"]), f"{stage['percent']:g} %", f"{stage['bake_s']:g} s"
            + (" +approval" if stage["approval"] else ""), stage["status"],
            _bar(done, total), _counts(devices),
        )
    return table


def tier_table(detail: dict[str, Any]) -> Table:
    """One row per device tier: a bar of devices on the new version, and counts by state."""
    table = titled_table("tiers", "tier", "progress", "devices", expand=False)
    for tier, counts in detail["per_tier"].items():
        relevant = sum(n for s, n in counts.items() if s not in ("incompatible", "superseded"))
        table.add_row(tier, _bar(counts.get("succeeded", 0), relevant), _counts(counts))
    return table


def gate_table(gates: list[dict[str, Any]]) -> Table:
    """The latest gate evaluation: measured value, threshold and verdict of each gate."""
    table = titled_table(
        "gates (current stage)", "gate", "tier", "measured", "threshold", "verdict", "note",
        expand=False,
    )
    for g in gates:
        measured = "-" if g["measured"] is None else f"{g['measured']:.4g}"
        threshold = "-" if g["threshold"] is None else f"{g['threshold']:.4g}"
        style = {"pass": "green", "fail": "red", "wait": "yellow"}[g["verdict"]]
        table.add_row(g["gate"], g.get("tier") or "all", measured, threshold,
                      Text(g["verdict"], style=style), g.get("note") or "")
    return table


def timeline_table(timeline: list[dict[str, Any]], last: int = 12) -> Table:
    """The newest ``last`` decisions: when, what, who, why."""
    table = titled_table("timeline", "time", "stage", "decision", "by", "reason", expand=False)
    for d in timeline[-last:]:
        table.add_row(time.strftime("%H:%M:%S", time.localtime(d["ts"])),
                      str(d["stage"] or "-"), d["kind"], d["actor"], d["reason"])
    return table


def waiting_table(detail: dict[str, Any]) -> Table | None:
    """Devices whose update waits on the device (a window, a lock, the network), by
    what they wait for, the first few by name with their reason; None when none waits."""
    waiting = [m for m in detail["devices"] if m["state"] == "waiting"]
    if not waiting:
        return None
    by_kind: dict[str, int] = {}
    for m in waiting:
        kind = (m.get("reason") or "waiting").split(":", 1)[0]
        by_kind[kind] = by_kind.get(kind, 0) + 1
    table = titled_table(
        "waiting on the device: " + ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())),
        "device", "stage", "reason", expand=False)
    for m in waiting[:WAITING_SHOWN]:
        table.add_row(m["device_id"], str(m.get("stage") or "-"), m.get("reason") or "")
    if len(waiting) > WAITING_SHOWN:
        table.add_row(f"... {len(waiting) - WAITING_SHOWN} more", "", "")
    return table


def rollout_view(detail: dict[str, Any]) -> Group:
    """Everything about one rollout, for ``show`` and each frame of ``watch``."""
    parts: list[Any] = [headline(detail), stage_table(detail), tier_table(detail)]
    waiting = waiting_table(detail)
    if waiting is not None:
        parts.append(waiting)
    if detail["gates"]:
        parts.append(gate_table(detail["gates"]))
    parts.append(timeline_table(detail["timeline"]))
    return Group(*parts)
