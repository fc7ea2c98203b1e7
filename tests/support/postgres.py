"""A private PostgreSQL cluster for tests (Debian package `postgresql`).

initdb refuses to run as root, so under root the server runs as the
`postgres` system user, in a directory that user owns. Tests that need it
skip when no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from controlplane.devfleet.mosquitto import free_port


def server_bin() -> Path | None:
    """The newest installed PostgreSQL ``bin`` directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """initdb + pg_ctl on a free loopback port, trust auth, torn down on ``stop``."""

    def __init__(self) -> None:
        bin_dir = server_bin()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL server binaries not found")
        self._bin = bin_dir
        self.port = free_port()
        # Under /tmp, not pytest's tmp_path: the postgres user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="slmfleet-pg-"))
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self._bin / tool), *args], check=True, capture_output=True, timeout=60
        )

    def start(self) -> PostgresCluster:
        """Create and start the cluster; return once it accepts connections."""
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.root / "log"),
                  "-w", "start")
        return self

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL (psycopg 3)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server and delete everything it wrote."""
        # A cluster that failed to start has nothing to stop.
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
