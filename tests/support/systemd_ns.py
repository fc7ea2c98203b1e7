"""A real systemd, PID 1 of its own namespaces, to run slmfleet's units in tests.

``systemd-run`` needs a running system manager, and the test machines run
the suite in containers or VMs whose init is not systemd. So this boots one:
``unshare`` gives it fresh PID, mount, UTS and IPC namespaces (it shares the
host's network, so units reach the test broker on 127.0.0.1), and the mount
namespace hides everything a boot would touch:

* the unit and generator directories are empty tmpfs mounts, holding only
  stub targets and the units a test installs, so nothing of the host starts;
* ``/run`` and ``/var/lib`` are tmpfs, so ``StateDirectory=`` and the
  manager's runtime files stay inside the namespace;
* ``/etc/passwd`` and friends are bind-mounted copies to which the project's
  ``systemd/sysusers.d/slmfleet.conf`` was applied, so ``User=`` resolves
  without adding users to the host;
* a test's ``share`` directory appears as :data:`SHARE`, because units run
  with ``PrivateTmp=`` and cannot see the pytest temp directory.

Its cgroups live in a subtree of their own (systemd roots its tree at the
cgroup it starts in, as in any container), removed again by :meth:`stop`.

Not usable where systemd is already the host's init (two managers would
fight over the same cgroups) or without root: :func:`unavailable_reason`
says why, and the tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

#: where a test's share directory appears inside the namespace
SHARE = Path("/run/slmfleet-test")

_SYSTEMD_CANDIDATES = (Path("/usr/lib/systemd/systemd"), Path("/lib/systemd/systemd"))
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_USER_DBS = ("passwd", "group", "shadow", "gshadow")

#: Units that services with default dependencies require or order against.
_STUB_TARGETS = ("default", "sysinit", "basic", "shutdown", "network", "network-online")

# PID 1 of the new namespaces: move into a cgroup subtree of our own, hide
# the host's units and state, then become systemd. "$@" is: cgroup name,
# work directory, systemd binary.
_INIT_SCRIPT = r"""
set -eu
cg="$1"; work="$2"; systemd="$3"
for h in "$work"/cgroup-hierarchies/*; do
    dir="$(cat "$h")/$cg"
    mkdir -p "$dir"
    echo 0 > "$dir/cgroup.procs"
done
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd /run/slmfleet-test
mount --bind "$work/share" /run/slmfleet-test
mount -t tmpfs -o mode=0755 tmpfs /var/lib
for d in /etc/systemd/system /usr/lib/systemd/system /lib/systemd/system \
         /etc/systemd/system-generators /usr/lib/systemd/system-generators \
         /lib/systemd/system-generators /usr/lib/systemd/system-environment-generators; do
    if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 tmpfs "$d"; fi
done
cp "$work"/units/* /etc/systemd/system/
for f in passwd group shadow gshadow; do
    mount --bind "$work/etc/$f" "/etc/$f"
done
export container=slmfleet-test
exec "$systemd" --system --log-target=console --log-level=notice
"""


def _systemd_binary() -> Path | None:
    return next((p for p in _SYSTEMD_CANDIDATES if p.is_file()), None)


def _cgroup_hierarchies() -> list[Path]:
    """The hierarchies systemd tracks services in: cgroup2 and/or name=systemd."""
    if (_CGROUP_ROOT / "cgroup.controllers").exists():  # unified (cgroup v2 only)
        return [_CGROUP_ROOT]
    return [_CGROUP_ROOT / h for h in ("unified", "systemd") if (_CGROUP_ROOT / h).is_dir()]


def unavailable_reason() -> str | None:
    """Why a namespaced systemd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, cgroups, nsenter)"
    if _systemd_binary() is None:
        return "systemd is not installed (scripts/bootstrap.sh installs it)"
    for tool in ("unshare", "nsenter", "systemd-sysusers"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if Path("/run/systemd/system").exists():
        return "systemd is this host's init; a second manager would share its cgroups"
    if not _cgroup_hierarchies():
        return "no cgroup hierarchy systemd can use under /sys/fs/cgroup"
    probe = _cgroup_hierarchies()[0] / f"slmfleet-probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot create cgroups: {exc}"
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount", "true"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"cannot create namespaces: {result.stderr.strip()}"
    return None


class NamespacedSystemd:
    """One systemd system manager in private namespaces; a context manager.

    Units and drop-ins are installed with :meth:`install`, commands run inside
    with :meth:`run` (``systemctl`` talks to the manager over its private
    socket, so no D-Bus is needed).
    """

    def __init__(self, workdir: Path, sysusers_conf: Path) -> None:
        self.workdir = workdir
        self.share = workdir / "share"
        self._sysusers_conf = sysusers_conf
        self._cgroup = f"slmfleet-test-{secrets.token_hex(4)}"
        self._unshare: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> NamespacedSystemd:
        """Boot the manager; return once ``systemctl is-system-running`` answers."""
        systemd = _systemd_binary()
        if systemd is None:
            raise RuntimeError("systemd is not installed")
        self._prepare()
        with open(self.workdir / "systemd.log", "ab") as log:
            self._unshare = subprocess.Popen(
                # --kill-child: should unshare die first, take the namespace with it
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc",
                 "--mount-proc", "bash", "-c", _INIT_SCRIPT, "init", self._cgroup,
                 str(self.workdir), str(systemd)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._unshare.poll() is not None:
                raise RuntimeError(f"systemd exited at start:\n{self.log()}")
            self._pid1 = self._pid1 or self._find_pid1()
            if self._pid1 is not None:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"systemd did not come up in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the namespace (SIGKILL to its PID 1 ends every process in it)."""
        if self._unshare is not None:
            if self._pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid1, signal.SIGKILL)
            else:
                self._unshare.kill()
            self._unshare.wait(timeout=10)
            self._unshare = None
        self._pid1 = None
        self._remove_cgroups()

    def __enter__(self) -> NamespacedSystemd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        """What the manager printed on its console."""
        path = self.workdir / "systemd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- inside the namespace ---------------------------------------------------

    def run(self, *argv: str, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespaces (as root); output captured as text."""
        if self._pid1 is None:
            raise RuntimeError("the namespaced systemd is not running")
        result = subprocess.run(
            ["nsenter", f"--target={self._pid1}", "--mount", "--pid", "--uts", "--ipc",
             "--", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def install(self, name: str, unit_text: str, dropin: str | None = None) -> None:
        """Write a unit (and a ``test.conf`` drop-in) and reload the manager."""
        units = self.root / "etc/systemd/system"
        (units / name).write_text(unit_text)
        if dropin is not None:
            (units / f"{name}.d").mkdir(exist_ok=True)
            (units / f"{name}.d" / "test.conf").write_text(dropin)
        self.run("systemctl", "daemon-reload")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    @property
    def root(self) -> Path:
        """The namespace's ``/`` as seen from the host (via /proc/PID/root)."""
        if self._pid1 is None:
            raise RuntimeError("the namespaced systemd is not running")
        return Path(f"/proc/{self._pid1}/root")

    # -- internals --------------------------------------------------------------

    def _prepare(self) -> None:
        self.share.mkdir(parents=True, exist_ok=True)
        # Units run as slmfleet-agent: the share directory is bind-mounted on its
        # own, so only its own mode matters, not that of the 0700 pytest parents.
        self.share.chmod(0o755)
        etc = self.workdir / "etc"
        etc.mkdir(exist_ok=True)
        for name in _USER_DBS:
            host = Path("/etc") / name
            if host.exists():
                shutil.copy2(host, etc / name)
            else:
                (etc / name).touch()
        # sysusers resolves a relative config path inside --root: pass it absolute.
        conf = str(self._sysusers_conf.resolve())
        subprocess.run(["systemd-sysusers", f"--root={self.workdir}", conf],
                       check=True, capture_output=True)
        units = self.workdir / "units"
        units.mkdir(exist_ok=True)
        for target in _STUB_TARGETS:
            (units / f"{target}.target").write_text(
                f"[Unit]\nDescription=test stub for {target}.target\n"
            )
        hierarchies = self.workdir / "cgroup-hierarchies"
        hierarchies.mkdir(exist_ok=True)
        for i, path in enumerate(_cgroup_hierarchies()):
            (hierarchies / str(i)).write_text(str(path))

    def _find_pid1(self) -> int | None:
        """The host PID of the namespace's init: the child ``unshare --fork`` made."""
        assert self._unshare is not None
        try:
            children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
            pids = children.read_text().split()
        except OSError:
            return None
        if not pids:
            return None
        pid = int(pids[0])
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None
        # Until the init script has exec'd, the child is still bash setting up.
        return pid if comm == "systemd" else None

    def _remove_cgroups(self) -> None:
        """Remove this manager's cgroup subtree from every hierarchy, leaves first."""
        deadline = time.monotonic() + 5.0
        for hierarchy in _CGROUP_ROOT.iterdir():
            top = hierarchy / self._cgroup
            if not top.is_dir():
                continue
            nested = sorted((p for p in top.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True)
            for path in [*nested, top]:
                # A killed process leaves its cgroup a moment after it is reaped.
                while True:
                    try:
                        path.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)
