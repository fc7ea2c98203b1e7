"""Measure what this device can do: the capability report sent in ``hello``.

The probe runs at every agent start, so it stays cheap: a few small files
under ``/proc``, ``/sys`` and ``/etc``, psutil, at most one ``nvidia-smi``
call and one short-lived Python child for onnxruntime's providers. The agent
runs it in a child interpreter of its own (:mod:`agent.hardware`), so none
of this module, psutil included, stays in the agent's memory. It never
imports ``llama_cpp`` or ``onnxruntime`` into the agent process (importing
onnxruntime alone adds about 40 MB of RSS to an agent that should idle under
40 MB; native provider libraries are also better kept out of the agent, see
DESIGN.md "Inference runs in a worker subprocess").

Every optional part of the probe is guarded: if it fails, it is logged and
skipped, so an odd board still reports what could be measured instead of
keeping the agent from starting.

File reads go through ``root`` (``/`` on a device) so tests can feed recorded
``/proc``, ``/sys``, ``/dev`` and ``/etc`` trees. psutil and :mod:`platform`
always describe the running machine.

Accelerators: see :mod:`agent.accelerators`.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from protocol import Accelerator, Capabilities, CpuInfo, OsInfo, Runtime

from .accelerators import probe_npus, probe_nvidia_gpus, probe_tegra_gpu
from .disk import disk_free_bytes
from .probe_text import read_text, short_text

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``CpuInfo.flags`` and ``Capabilities.accelerators`` caps on the wire.
MAX_FLAGS = 64
MAX_ACCELERATORS = 16
MAX_PROVIDERS = 16

#: Importing onnxruntime from a cold SD card on a Pi 4 takes a few seconds.
ONNX_PROVIDERS_TIMEOUT_S = 20.0

#: CPU flags that select inference kernels in llama.cpp / onnxruntime; the
#: rest of ``/proc/cpuinfo`` is noise on the wire. Kernel spellings: x86
#: ``flags`` and ARM ``Features`` (``asimddp`` is the dot-product extension,
#: llama.cpp's DOTPROD; ``neon``/``vfpv4`` appear on 32-bit ARM only).
INFERENCE_FLAGS = frozenset(
    {
        # x86
        "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
        "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512vbmi",
        "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
        # ARM
        "neon", "vfpv4", "asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16",
        "sve", "sve2", "svei8mm", "svebf16", "sme",
    }
)  # fmt: skip

#: ``CPU part`` of ARM Ltd (implementer 0x41) cores, as ``/proc/cpuinfo`` on
#: arm64 gives no ``model name``.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}

#: DMI strings firmware vendors leave unfilled; they identify nothing.
_DMI_PLACEHOLDERS = frozenset(
    {
        "", "default string", "not specified", "none", "o.e.m.", "system manufacturer",
        "system product name", "to be filled by o.e.m.",
    }
)  # fmt: skip

#: ``platform.machine()`` spellings of other OSes to the Linux ones profiles use.
_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}

_ONNX_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
)
#: Run in a child interpreter: reports installed runtime versions and
#: onnxruntime's providers as one JSON line. importlib.metadata alone costs
#: ~6 MB and onnxruntime ~40 MB of RSS; the agent keeps neither.
_RUNTIMES_SCRIPT = """
import importlib.metadata as md, importlib.util, json, sys
def version(*names):
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            pass
    return None
out = {"llama": version("llama-cpp-python"), "onnx": version(*sys.argv[1:]), "providers": []}
if out["onnx"] and importlib.util.find_spec("onnxruntime") is not None:
    try:
        import onnxruntime
        out["providers"] = list(onnxruntime.get_available_providers())
    except Exception as exc:
        out["providers_error"] = repr(exc)[:300]
print(json.dumps(out))
"""


# -- helpers -------------------------------------------------------------------


def _guarded(part: str, probe: Callable[[], T], default: T) -> T:
    """Run one probe part; on any error log it and return ``default``.

    Catching everything is deliberate: a capability report missing one part
    is worth more than an agent that does not start on an unusual board.
    """
    try:
        return probe()
    except Exception as exc:
        log.warning("capability probe: %s skipped: %s", part, exc)
        log.debug("capability probe: %s traceback", part, exc_info=True)
        return default


# -- CPU -----------------------------------------------------------------------


@dataclass(frozen=True)
class CpuinfoFacts:
    """What ``/proc/cpuinfo`` says beyond core counts."""

    model: str = ""
    flags: list[str] = field(default_factory=list)
    #: the ``Model`` line Raspberry Pi kernels add (a board, not a CPU)
    board_model: str = ""


def _cpuinfo_fields(text: str) -> list[tuple[str, str]]:
    pairs = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            pairs.append((key.strip(), value.strip()))
    return pairs


def _arm_core_names(pairs: list[tuple[str, str]]) -> list[str]:
    """Distinct ARM core names in order (big.LITTLE SoCs list two or three)."""
    names: list[str] = []
    implementer = ""
    for key, value in pairs:
        if key == "CPU implementer":
            implementer = value.lower()
        elif key == "CPU part":
            part = value.lower()
            if implementer == "0x41" and part in _ARM_PARTS:
                name = _ARM_PARTS[part]
            else:
                name = f"implementer {implementer} part {part}"
            if name not in names:
                names.append(name)
    return names


def parse_cpuinfo(text: str) -> CpuinfoFacts:
    """Extract CPU model, inference-relevant flags and a board model from cpuinfo text."""
    pairs = _cpuinfo_fields(text)
    first: dict[str, str] = {}
    for key, value in pairs:
        first.setdefault(key, value)
    # x86 and 32-bit ARM say "model name"; MIPS "cpu model"; RISC-V "uarch";
    # arm64 says only implementer/part codes.
    model = first.get("model name") or first.get("cpu model") or first.get("uarch") or ""
    if not model:
        model = " + ".join(_arm_core_names(pairs))
    raw_flags = (first.get("flags") or first.get("Features") or "").split()
    flags = [f for f in dict.fromkeys(raw_flags) if f in INFERENCE_FLAGS][:MAX_FLAGS]
    return CpuinfoFacts(
        model=short_text(model), flags=flags, board_model=short_text(first.get("Model", ""))
    )


def _normalise_arch(machine: str) -> str:
    return _ARCH_ALIASES.get(machine.lower(), machine)


def probe_cpu(root: Path = Path("/")) -> CpuInfo:
    """CPU model, arch, core and thread counts, inference-relevant flags."""
    facts = _guarded(
        "/proc/cpuinfo", lambda: parse_cpuinfo(read_text(root / "proc/cpuinfo")), CpuinfoFacts()
    )
    threads = psutil.cpu_count(logical=True) or 1
    # psutil returns None for physical cores where the topology is hidden
    # (some ARM kernels, containers); logical count is the honest fallback.
    cores = min(psutil.cpu_count(logical=False) or threads, threads)
    return CpuInfo(
        model=facts.model,
        arch=_normalise_arch(platform.machine()) or "unknown",
        cores=cores,
        threads=threads,
        flags=facts.flags,
    )


# -- board ---------------------------------------------------------------------


def _devicetree_model(root: Path) -> str:
    return read_text(root / "proc/device-tree/model")


def _dmi_model(root: Path) -> str:
    dmi = root / "sys/class/dmi/id"
    vendor = read_text(dmi / "sys_vendor")
    product = read_text(dmi / "product_name")
    vendor = "" if vendor.lower() in _DMI_PLACEHOLDERS else vendor
    product = "" if product.lower() in _DMI_PLACEHOLDERS else product
    if not product:
        return ""
    # "NVIDIA" + "NVIDIA Jetson ..." must not read "NVIDIA NVIDIA Jetson ..."
    if vendor and not product.lower().startswith(vendor.split()[0].lower()):
        return f"{vendor} {product}"
    return product


def probe_board_model(root: Path = Path("/")) -> str:
    """The board's model string: devicetree, else DMI vendor + product, else cpuinfo.

    The devicetree wins on ARM boards because it is the string board vendors
    document ("Raspberry Pi 4 Model B Rev 1.4") and profiles are written against.
    """
    model = _devicetree_model(root) or _dmi_model(root)
    if not model:
        model = parse_cpuinfo(read_text(root / "proc/cpuinfo")).board_model
    return short_text(model)


# -- accelerators --------------------------------------------------------------


def probe_accelerators(root: Path = Path("/"), nvidia_smi: str = "nvidia-smi") -> list[Accelerator]:
    """GPUs and NPUs of this device (:mod:`agent.accelerators` says what is detected)."""
    gpus = _guarded("nvidia-smi", lambda: probe_nvidia_gpus(nvidia_smi), [])
    if not gpus:
        gpus = _guarded("tegra gpu", lambda: probe_tegra_gpu(root), [])
    npus = _guarded("npu", lambda: probe_npus(root), [])
    return (gpus + npus)[:MAX_ACCELERATORS]


# -- OS and disk ---------------------------------------------------------------


def parse_os_release(text: str) -> str:
    """``PRETTY_NAME`` from os-release text (shell-quoted per os-release(5)), or ``""``."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "PRETTY_NAME":
            try:
                words = shlex.split(value)
            except ValueError:
                words = [value.strip().strip("\"'")]
            return short_text(" ".join(words))
    return ""


def probe_os(root: Path = Path("/")) -> OsInfo:
    """Kernel name and release of the running system, distro from os-release."""

    def distro() -> str:
        # os-release(5): /etc/os-release, falling back to /usr/lib/os-release
        text = read_text(root / "etc/os-release") or read_text(root / "usr/lib/os-release")
        return parse_os_release(text)

    return OsInfo(
        system=short_text(platform.system()) or "unknown",
        release=short_text(platform.release()),
        distro=_guarded("os-release", distro, ""),
    )


# -- the report ----------------------------------------------------------------


def probe_capabilities(
    model_dir: Path, *, root: Path = Path("/"), nvidia_smi: str = "nvidia-smi"
) -> Capabilities:
    """Measure this device: CPU, RAM, disk free for models, accelerators, OS, board."""
    return Capabilities(
        cpu=probe_cpu(root),
        ram_bytes=_guarded("ram", lambda: psutil.virtual_memory().total, 0),
        disk_free_bytes=_guarded("disk", lambda: disk_free_bytes(model_dir), 0),
        accelerators=probe_accelerators(root, nvidia_smi),
        os=probe_os(root),
        board_model=_guarded("board model", lambda: probe_board_model(root), ""),
    )


# -- runtimes ------------------------------------------------------------------


def runtime_facts(timeout_s: float = ONNX_PROVIDERS_TIMEOUT_S) -> dict[str, Any]:
    """Installed runtime versions and onnxruntime providers, asked of a child interpreter.

    A child keeps package metadata parsing and onnxruntime's native provider
    libraries out of the agent process; it costs a fraction of a second once
    per start.
    """
    result = subprocess.run(
        [sys.executable, "-c", _RUNTIMES_SCRIPT, *_ONNX_DISTRIBUTIONS],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    if not isinstance(facts, dict) or not isinstance(facts.get("providers"), list):
        raise RuntimeError(f"unexpected runtime probe output: {facts!r}")
    if "providers_error" in facts:
        log.warning("onnxruntime providers unavailable: %s", facts["providers_error"])
    return facts


def probe_runtimes(*, onnx_timeout_s: float = ONNX_PROVIDERS_TIMEOUT_S) -> list[Runtime]:
    """Inference runtimes installed for the agent: llama.cpp and onnxruntime.

    The llama.cpp version is that of the ``llama-cpp-python`` binding (read
    from package metadata; importing ``llama_cpp`` loads the native library).
    """
    facts = _guarded("runtimes", lambda: runtime_facts(onnx_timeout_s), {})
    runtimes = []
    if facts.get("llama"):
        runtimes.append(Runtime(name="llama.cpp", version=short_text(str(facts["llama"]))))
    if facts.get("onnx"):
        providers = [short_text(str(p)) for p in facts["providers"]][:MAX_PROVIDERS]
        runtimes.append(
            Runtime(name="onnxruntime", version=short_text(str(facts["onnx"])), providers=providers)
        )
    return runtimes
