"""The memory limit of the cgroup the agent runs in.

The shipped unit caps the agent and its inference workers together with
``MemoryMax=`` (systemd/slmfleet-agent.service), and containers cap them the
same way. A model that fits the board's RAM but not that limit would be
OOM-killed in its worker after a full download, so the fit check uses the
smaller of the two. Read from the files the kernel exposes, nothing else:
cgroup v2 (``memory.max`` along the unified hierarchy) and v1 (the memory
controller's ``memory.limit_in_bytes``).
"""

from __future__ import annotations

from pathlib import Path

#: cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything this big is none
_V1_UNLIMITED = 1 << 62


def memory_limit_bytes(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors, or ``None``.

    ``None`` when there is no limit or it cannot be read (no cgroup
    filesystem, a v1 hierarchy not mounted where expected): the fit check
    then goes by physical RAM alone, as it would on a bare board.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            limits += _walk(root, path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _walk(root / "memory", path, "memory.limit_in_bytes")
    return min(limits) if limits else None


def _walk(base: Path, path: str, name: str) -> list[int]:
    """Limits in ``name`` from the cgroup at ``path`` up to the hierarchy's root."""
    found: list[int] = []
    current = Path(path.strip() or "/")
    while True:
        value = _read_limit(base / current.relative_to("/") / name)
        if value is not None:
            found.append(value)
        if current == current.parent:
            return found
        current = current.parent


def _read_limit(file: Path) -> int | None:
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max" (v2): no limit at this level
    value = int(text)
    return None if value >= _V1_UNLIMITED else value
