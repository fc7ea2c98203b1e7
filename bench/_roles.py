"""CPU per role: which process (and, in a control plane, which thread) spent it.

A benchmark that runs a broker, PostgreSQL, a fleet simulator and one or
more control planes on one machine must not charge one for another. Every
process is classified by what it is, from its command line and its place
in the process tree:

| role | how it is recognised |
| --- | --- |
| ``bench`` | the benchmark's own process (its probes and pollers run here) |
| ``controlplane``, ``replicaN`` | ``_controlplane.py --role NAME``, or ``bench-replica-N`` |
| ``NAME_writer`` | the ingest writer: a ``multiprocessing`` child of that control plane |
| ``broker`` | ``mosquitto`` whose command line names the benchmark's broker directory |
| ``postgres_backends`` | PostgreSQL client backends but the benchmark's own |
| ``postgres_bench`` | the backend serving the benchmark's own connection (the lag probe) |
| ``postgres_background`` | the postmaster and its helpers (checkpointer, WAL writer, autovacuum) |
| ``simulator`` | ``slmfleet simulate`` |
| ``profiler`` | ``py-spy``, when a control plane runs under it |
| ``other`` | anything else under the benchmark's process tree |

CPU is user plus system time from ``/proc`` (psutil), read at the start
and the end of a window; a process that starts inside the window counts
from zero, one that exits inside it loses what it spent (PostgreSQL
backends live as long as their connection pool holds them, so the
benchmarks keep pools open over a window).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

#: the command-line flag the control-plane process script is started with
ROLE_FLAG = "--role"
#: the client ids of bench/ingest.py's replicas: bench-replica-0, -1, ...
INGEST_REPLICA_PREFIX = "bench-replica-"


def _cpu(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return t.user + t.system


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def cp_role(cmdline: list[str]) -> str | None:
    """The role a control-plane process was started with, or None for any other process.

    ``bench/_controlplane.py --role NAME`` names it; ``bench/ingest.py``'s
    replicas carry their MQTT client id ``bench-replica-N`` (role ``replicaN``).
    """
    if ROLE_FLAG in cmdline and any(a.endswith("_controlplane.py") for a in cmdline):
        at = cmdline.index(ROLE_FLAG)
        return cmdline[at + 1] if at + 1 < len(cmdline) else None
    for arg in cmdline:
        if arg.startswith(INGEST_REPLICA_PREFIX) and arg[len(INGEST_REPLICA_PREFIX):].isdigit():
            return f"replica{arg[len(INGEST_REPLICA_PREFIX):]}"
    return None


def classify(proc: psutil.Process, bench_pid: int) -> str:
    """The role of one process under the benchmark's tree (see the module docstring)."""
    if proc.pid == bench_pid:
        return "bench"
    cmd = _cmdline(proc)
    joined = " ".join(cmd)
    if "py-spy" in joined:
        return "profiler"  # its command line names the control plane it runs
    role = cp_role(cmd)
    if role is not None:
        return role
    if "multiprocessing" in joined:
        try:
            parent = proc.parent()
        except psutil.NoSuchProcess:
            parent = None
        parent_role = cp_role(_cmdline(parent)) if parent is not None else None
        if parent_role is not None:
            return f"{parent_role}_writer"
        if parent is not None and parent.pid == bench_pid:
            return "bench_child"
    if "slmfleet" in joined and "simulate" in cmd:
        return "simulator"
    if "mosquitto" in joined:
        return "broker"
    return "other"


class RoleCpu:
    """Reads CPU seconds per role over the benchmark's processes.

    ``broker_dir`` names the benchmark's Mosquitto (its config lives there);
    ``postgres_dir`` the data directory of its PostgreSQL cluster, and
    ``backend_roles`` a callable returning ``{backend pid: role}`` for
    backends that belong to a role of their own (the benchmark's own
    connection), read from ``pg_stat_activity``.
    """

    def __init__(self, broker_dir: Path | None = None, postgres_dir: Path | None = None,
                 backend_roles: Callable[[], dict[int, str]] | None = None) -> None:
        self._bench = psutil.Process(os.getpid())
        self._broker_dir = str(broker_dir) if broker_dir else None
        self._postgres_dir = str(postgres_dir) if postgres_dir else None
        self._backend_roles = backend_roles or (lambda: {})
        self._roles: dict[int, str] = {}

    def _processes(self) -> Iterable[tuple[psutil.Process, str]]:
        seen: set[int] = set()
        for proc in [self._bench, *self._bench.children(recursive=True)]:
            if _name(proc) == "postgres":
                continue  # below, by kind
            seen.add(proc.pid)
            yield proc, self._role(proc, lambda p: classify(p, self._bench.pid))
        if self._broker_dir is None and self._postgres_dir is None:
            return
        special = self._backend_roles() if self._postgres_dir else {}
        for proc in psutil.process_iter(["name", "cmdline"]):
            if proc.pid in seen:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if self._broker_dir and "mosquitto" in (proc.info["name"] or "") \
                    and self._broker_dir in cmd:
                yield proc, "broker"
            elif self._postgres_dir and proc.info["name"] == "postgres":
                yield from self._postgres(proc, special)

    def _postgres(self, proc: psutil.Process,
                  special: dict[int, str]) -> Iterable[tuple[psutil.Process, str]]:
        """The postmaster of our data directory, then each of its children by kind."""
        if self._postgres_dir not in " ".join(_cmdline(proc)):
            return
        yield proc, "postgres_background"
        try:
            children = proc.children()
        except psutil.NoSuchProcess:
            return
        for child in children:
            title = " ".join(_cmdline(child))
            if child.pid in special:
                yield child, special[child.pid]
            # a client backend's title is "postgres: user db host(port) state"
            elif "(" in title and ")" in title:
                yield child, "postgres_backends"
            else:
                yield child, "postgres_background"

    def _role(self, proc: psutil.Process, how: Callable[[psutil.Process], str]) -> str:
        role = self._roles.get(proc.pid)
        if role is None:
            role = self._roles[proc.pid] = how(proc)
        return role

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """``{pid: (role, cpu seconds so far)}`` of every process of the benchmark now."""
        out: dict[int, tuple[str, float]] = {}
        for proc, role in self._processes():
            cpu = _cpu(proc)
            if cpu is not None:
                out[proc.pid] = (role, cpu)
        return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                seconds: float) -> dict[str, float]:
    """Percent of one core per role between two :meth:`RoleCpu.snapshot` calls."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (role, cpu) in after.items():
        spent[role] += cpu - before.get(pid, (role, 0.0))[1]
    return {role: round(100 * s / seconds, 2) for role, s in sorted(spent.items())}


def thread_group(name: str) -> str:
    """What a control-plane thread does, from its name."""
    if name.startswith("paho-mqtt-client-slmfleet-cp-desired"):
        return "publisher"
    if name.startswith("paho-mqtt-client-") or name.startswith("ingest-"):
        return "ingest_receive"
    if name == "api" or name.startswith("AnyIO") or name.startswith("asyncio"):
        return "api"
    if name == "APScheduler" or name.startswith("ThreadPoolExecutor"):
        return "scheduler_jobs"
    if name == "leader-lease":
        return "leader_lease"
    if name == "desired-publisher":
        return "publisher"
    if name == "MainThread":
        return "main"
    return "other_threads"
