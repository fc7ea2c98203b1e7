"""llama.cpp's own server (``llama-server``), the peer the inference benchmark measures against.

Built once by scripts/build-llama-server.sh from the llama.cpp sources the
pinned llama-cpp-python sdist vendors, with the wheel's CPU flags, into
``<cache>/llama-server/``; the first benchmark run pays for the build, the
test suite and bootstrap never do. Started here on 127.0.0.1 with the same
GGUF and the settings the agent's worker gives llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build-llama-server.sh"
#: prctl(2) option: the signal a process gets when its parent exits
PR_SET_PDEATHSIG = 1


def llama_server_binary() -> Path:
    """The cached ``llama-server``, built first if missing (several minutes, progress on stderr)."""
    done = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=sys.stderr,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed (exit {done.returncode}); "
                           "its output is above")
    binary = Path(done.stdout.strip().splitlines()[-1])
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{BUILD_SCRIPT.name} named {binary}, which is not executable")
    return binary


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What llama-server runs with, mirroring the agent's worker (llama_backend.py)."""

    model: Path
    threads: int
    #: llama-server's ``-np``: slots decoded in one batch
    slots: int
    #: context per slot; llama-server's ``-c`` is the total, shared by its slots
    context: int
    #: llama-cpp-python's default n_batch and n_ubatch, which the agent keeps
    batch: int = 512
    #: ``-lv``: 4 logs llama.cpp's buffer sizes at load (and more while serving)
    log_verbosity: int | None = None

    def argv(self, binary: Path, port: int) -> list[str]:
        """The command line: greedy sampling is asked per request (temperature 0)."""
        verbosity = [] if self.log_verbosity is None else ["-lv", str(self.log_verbosity)]
        return [str(binary), *verbosity, "-m", str(self.model), "--host", "127.0.0.1",
                "--port", str(port),
                "-t", str(self.threads), "-tb", str(self.threads),
                "-np", str(self.slots), "-c", str(self.slots * self.context),
                "-b", str(self.batch), "-ub", str(self.batch),
                # llama-cpp-python's Llama() default, which the agent does not change
                "-fa", "off",
                # a KV cache per slot and no prompt cache in host memory, as the
                # agent (batch_decoder.py): only what the slots hold is reused
                "--no-kv-unified", "--cache-ram", "0",
                "--no-webui", "--seed", "0"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by a signal
    that skips its clean-up, so no llama-server is left holding the cores."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Running:
    """A llama-server that answers its health check."""

    url: str
    pid: int
    #: its stdout and stderr (llama.cpp logs its buffer sizes there)
    log: Path

    def kv_cache_mib(self) -> float:
        """The KV cache llama.cpp allocated, from its log line ``llama_kv_cache: size = N MiB``."""
        for line in self.log.read_text(errors="replace").splitlines():
            found = re.search(r"llama_kv_cache: size =\s+([\d.]+) MiB", line)
            if found:
                return float(found.group(1))
        raise RuntimeError(f"no KV cache size in {self.log}")


@contextlib.contextmanager
def running(settings: ServerSettings, binary: Path | None = None,
            load_timeout_s: float = 120.0) -> Iterator[Running]:
    """Run llama-server until the block ends, once it is healthy.

    Its log is removed afterwards unless something failed (then its path is
    in the error)."""
    binary = binary or llama_server_binary()
    port = _free_port()
    fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(settings.argv(binary, port), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + load_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy in {load_timeout_s:g} s; "
                                   f"see {log}")
            time.sleep(0.2)
        yield Running(url, proc.pid, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.unlink()


if __name__ == "__main__":
    print(llama_server_binary())
