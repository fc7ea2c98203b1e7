"""GPUs and NPUs of this device, for the capability report.

Reported:

* NVIDIA GPUs from ``nvidia-smi``. ``memory_bytes`` is the GPU's dedicated
  memory; ``0`` means it shares system RAM (Jetson), so the RAM figure
  already counts it.
* The integrated GPU of an NVIDIA Tegra SoC (Jetson), from the devicetree
  ``compatible`` list, when ``nvidia-smi`` reported none (JetPack 5 ships
  without it).
* NPUs: every ``/dev/accel/accel*`` node of the kernel's compute-accelerator
  subsystem (Intel NPU driver ``intel_vpu``, AMD ``amdxdna``, ...), and a
  misc device named ``npu`` (``/sys/class/misc/npu``, used by some vendor
  NPU drivers). NPUs behind DRM render nodes (e.g. Rockchip ``rknpu``) are
  not detected; match such boards by ``board_model`` in a firmware profile.

File reads go through ``root`` (``/`` on a device) so tests can feed
recorded ``/proc``, ``/sys`` and ``/dev`` trees. :mod:`agent.probe` puts
the parts together, each guarded.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from protocol import Accelerator

from .probe_text import short_text

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 5.0

#: Tegra SoC (devicetree ``nvidia,<soc>``) to the name nvidia-smi gives its iGPU.
_TEGRA_GPUS = {"tegra234": "Orin", "tegra194": "Xavier", "tegra210": "Tegra X1"}

#: Kernel driver of a ``/dev/accel`` node to (vendor, name).
_ACCEL_DRIVERS = {
    "intel_vpu": ("Intel", "Intel NPU"),
    "amdxdna": ("AMD", "AMD XDNA NPU"),
    "qaic": ("Qualcomm", "Qualcomm Cloud AI"),
}


def _mib_to_bytes(value: str) -> int:
    """nvidia-smi memory in MiB; ``[N/A]`` (shared-memory iGPU) reads as 0."""
    try:
        return int(float(value)) * 1024 * 1024
    except ValueError:
        return 0


def parse_nvidia_smi(text: str) -> list[Accelerator]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.splitlines():
        name, sep, memory = line.rpartition(",")
        if not sep or not name.strip():
            continue
        gpus.append(
            Accelerator(
                kind="gpu",
                vendor="NVIDIA",
                name=short_text(name),
                memory_bytes=_mib_to_bytes(memory.strip()),
            )
        )
    return gpus


def probe_nvidia_gpus(
    nvidia_smi: str = "nvidia-smi", timeout_s: float = NVIDIA_SMI_TIMEOUT_S
) -> list[Accelerator]:
    """NVIDIA GPUs as ``nvidia-smi`` lists them; none when it is absent or fails."""
    binary = shutil.which(nvidia_smi)
    if binary is None:
        return []
    try:
        result = subprocess.run(
            [binary, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("capability probe: nvidia-smi skipped: %s", exc)
        return []
    if result.returncode != 0:
        # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the driver"
        log.warning(
            "capability probe: nvidia-smi exited %d: %s",
            result.returncode,
            (result.stdout + result.stderr).strip()[:200],
        )
        return []
    return parse_nvidia_smi(result.stdout)


def probe_tegra_gpu(root: Path = Path("/")) -> list[Accelerator]:
    """The iGPU of an NVIDIA Tegra SoC (Jetson), from devicetree ``compatible``."""
    try:
        raw = (root / "proc/device-tree/compatible").read_bytes()
    except FileNotFoundError:
        return []  # no devicetree: not an ARM board
    # a NUL-separated list, most specific first: "nvidia,p3768-0000+p3767-0005",
    # ..., "nvidia,tegra234"
    for entry in raw.decode("ascii", "replace").split("\0"):
        vendor, _, soc = entry.partition(",")
        if vendor == "nvidia" and soc.startswith("tegra"):
            name = _TEGRA_GPUS.get(soc, "Tegra")
            # memory_bytes 0: the iGPU shares system RAM
            return [Accelerator(kind="gpu", vendor="NVIDIA", name=name)]
    return []


def _accel_node(root: Path, name: str) -> Accelerator:
    driver_link = root / "sys/class/accel" / name / "device/driver"
    driver = driver_link.resolve().name if driver_link.exists() else ""
    vendor, label = _ACCEL_DRIVERS.get(driver, ("", driver or name))
    return Accelerator(kind="npu", vendor=vendor, name=short_text(label))


def probe_npus(root: Path = Path("/")) -> list[Accelerator]:
    """NPUs: ``/dev/accel/accel*`` nodes and a ``/sys/class/misc/npu`` device.

    Presence is all that is checked: an NPU shares system RAM, so there is
    no memory figure to report.
    """
    npus = [_accel_node(root, node.name) for node in sorted((root / "dev/accel").glob("accel*"))]
    if (root / "sys/class/misc/npu").exists():
        npus.append(Accelerator(kind="npu", name="npu"))
    return npus
