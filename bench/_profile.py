"""What a control plane's CPU went to, from ``py-spy record --format raw`` output.

    python bench/_profile.py PROFILE.txt [RATE]

Each line of py-spy's raw (collapsed) format is one stack, frames joined by
``;``, then the number of samples that caught it. A stack is charged to the
first category (in :data:`CATEGORIES` order) one of its frames matches, so
a metrics query made by the API is "metrics", not "api". Samples are taken
only of threads that are running (py-spy's default), so samples / rate is
CPU seconds.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

#: leaf frames of a thread that waits (py-spy counts some blocking calls as running)
WAITING = ("Client._loop (", "Condition.wait (", "Event.wait (", "Connection._recv (",
           "EpollSelector.select (", "select (", "sleep (")

#: (category, substrings of a frame that put a stack in it), first match wins
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("startup", ("alembic", "upgrade_to_head", "_find_and_load", "ControlPlane.start",
                 "make_engine")),
    ("liveness and offline detection", ("liveness.py",)),
    ("retention", ("retention/",)),
    ("rollout ticks", ("rollouts/",)),
    ("director re-signing", ("director.py",)),
    ("metrics", ("controlplane/metrics.py",)),
    ("leader lease", ("leader.py",)),
    ("publisher", ("publisher.py",)),
    ("writer counters to the receiver", ("_Reporter", "_collect_reports")),
    ("writes", ("writes.py", "batch_writer.py")),
    ("validation", ("decode.py", "decode_device_message")),
    ("api", ("uvicorn", "starlette", "fastapi")),
    ("receive", ("paho", "receiver.py")),
    ("writer process, other", ("writer_process.py",)),
    ("scheduler", ("apscheduler",)),
)


def categorize(path: Path) -> Counter[str]:
    """Samples per category in one raw py-spy profile."""
    samples: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        # The process titles py-spy puts first name the parent's command line.
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames or frames[-1].startswith(WAITING):
            continue
        stack = ";".join(frames)
        for name, needles in CATEGORIES:
            if any(n in stack for n in needles):
                samples[name] += int(count)
                break
        else:
            samples["other"] += int(count)
    return samples


def breakdown(path: Path, rate: float, seconds: float | None = None) -> dict[str, float]:
    """CPU per category: % of one core over ``seconds``, or CPU seconds without it."""
    samples = categorize(path)
    samples.pop("startup", None)
    scale = 100 / (rate * seconds) if seconds else 1 / rate
    return {name: round(count * scale, 2) for name, count in samples.most_common()}


if __name__ == "__main__":
    figures = breakdown(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 200)
    print(json.dumps(figures, indent=1))
