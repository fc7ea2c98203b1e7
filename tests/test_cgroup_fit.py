"""The fit check honours the agent's cgroup memory limit (the unit's MemoryMax=)."""

from __future__ import annotations

from pathlib import Path

from agent.cgroup import memory_limit_bytes
from agent.profiles import generic_profile
from agent.update.staging import disk_fit
from agent.update.store import ModelStore
from tests.support.signer import capabilities
from tests.support.updates import variant_for

GIB = 1 << 30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_limit_is_the_tightest_on_the_path_to_the_root(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    _write(proc, "0::/system.slice/slmfleet-agent.service\n")
    _write(root / "memory.max", "max\n")
    _write(root / "system.slice" / "memory.max", "max\n")
    _write(root / "system.slice" / "slmfleet-agent.service" / "memory.max", f"{3 * GIB}\n")
    assert memory_limit_bytes(proc, root) == 3 * GIB

    _write(root / "system.slice" / "memory.max", f"{GIB}\n")  # a tighter parent slice
    assert memory_limit_bytes(proc, root) == GIB


def test_v1_limit_and_no_limit(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    _write(proc, "5:cpu,cpuacct:/x\n4:memory:/box/agent\n0::/\n")
    limit_file = root / "memory" / "box" / "agent" / "memory.limit_in_bytes"
    _write(limit_file, "9223372036854771712\n")  # v1's "unlimited"
    assert memory_limit_bytes(proc, root) is None
    _write(limit_file, f"{2 * GIB}\n")
    assert memory_limit_bytes(proc, root) == 2 * GIB
    # Unreadable or absent: no limit known, the fit check uses physical RAM.
    assert memory_limit_bytes(tmp_path / "missing", root) is None
    _write(proc, "0::/\n")
    assert memory_limit_bytes(proc, tmp_path / "empty") is None


def test_fit_check_refuses_a_model_that_fits_ram_but_not_the_cgroup(
    tmp_path: Path, model_path: Path
) -> None:
    caps = capabilities(ram_bytes=8 * GIB)
    store = ModelStore(tmp_path / "models")
    variant = variant_for(model_path, "m.gguf", min_ram_bytes=600 << 20)

    unlimited = disk_fit(store, "m@1-micro", variant, capabilities=caps,
                         profile=generic_profile(caps), installed=False,
                         memory_limit=lambda: None)
    assert unlimited.result.ok, unlimited.result.detail

    capped = disk_fit(store, "m@1-micro", variant, capabilities=caps,
                      profile=generic_profile(caps), installed=False,
                      memory_limit=lambda: 512 << 20)
    assert not capped.result.ok
    assert capped.result.reason == "insufficient_ram"
    # Usable is the limit less this process's own memory, not the board's 8 GiB.
    usable = int(capped.result.detail.rsplit(" ", 2)[-2])
    assert 0 < usable < 512 << 20

    roomy = disk_fit(store, "m@1-micro", variant, capabilities=caps,
                     profile=generic_profile(caps), installed=False,
                     memory_limit=lambda: 6 * GIB)
    assert roomy.result.ok
