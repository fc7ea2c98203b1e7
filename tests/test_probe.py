"""The capability probe: on this machine, and its parsers on recorded /proc, /sys, /dev trees."""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.accelerators import parse_nvidia_smi, probe_npus, probe_nvidia_gpus, probe_tegra_gpu
from agent.probe import (
    INFERENCE_FLAGS,
    MAX_FLAGS,
    disk_free_bytes,
    parse_cpuinfo,
    parse_os_release,
    probe_accelerators,
    probe_board_model,
    probe_capabilities,
    probe_cpu,
    probe_os,
    probe_runtimes,
)
from protocol import Accelerator, Capabilities

PROC = Path(__file__).parent / "fixtures" / "proc"
PI4_CPUINFO = PROC / "cpuinfo-raspberry-pi-4-aarch64.txt"
XEON_CPUINFO = PROC / "cpuinfo-xeon-x86_64.txt"
MISSING_NVIDIA_SMI = "/nonexistent/bin/nvidia-smi"
MIB = 1024**2


def write(root: Path, relative: str, content: str | bytes) -> Path:
    """Put a file into a fake root, creating its directories."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def fake_nvidia_smi(tmp_path: Path, script: str) -> str:
    """An executable standing in for nvidia-smi; ``script`` is its shell body."""
    path = write(tmp_path / "bin", "nvidia-smi", f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


# -- the real probe on this machine --------------------------------------------


def test_real_probe_is_sane(tmp_path: Path) -> None:
    model_dir = tmp_path / "state" / "models"  # not created yet, as on first start
    caps = probe_capabilities(model_dir)
    assert caps.cpu.cores >= 1
    assert caps.cpu.threads >= caps.cpu.cores
    assert caps.cpu.arch
    assert set(caps.cpu.flags) <= INFERENCE_FLAGS
    assert caps.ram_bytes > 0
    assert caps.disk_free_bytes > 0
    assert caps.os.system
    assert not model_dir.exists(), "probing must not create the model directory"
    assert Capabilities.model_validate(caps.model_dump(mode="json")) == caps


def test_probe_without_nvidia_smi_or_devicetree_reports_no_gpu(tmp_path: Path) -> None:
    # A root of our own: the host's /proc may hold a Tegra devicetree (the iGPU fallback).
    write(tmp_path, "proc/cpuinfo", XEON_CPUINFO.read_text())
    caps = probe_capabilities(tmp_path, root=tmp_path, nvidia_smi=MISSING_NVIDIA_SMI)
    assert caps.accelerators == []
    write(tmp_path, "proc/device-tree/compatible", b"nvidia,p3767-0005\0nvidia,tegra234\0")
    caps = probe_capabilities(tmp_path, root=tmp_path, nvidia_smi=MISSING_NVIDIA_SMI)
    assert [(a.kind, a.name) for a in caps.accelerators] == [("gpu", "Orin")]


@pytest.mark.parametrize(
    ("package", "runtime", "provider"),
    [
        ("llama-cpp-python", "llama.cpp", None),
        ("onnxruntime", "onnxruntime", "CPUExecutionProvider"),
    ],
)
def test_runtimes_match_installed_packages(
    package: str, runtime: str, provider: str | None
) -> None:
    runtimes = {r.name: r for r in probe_runtimes()}
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        assert runtime not in runtimes
    else:
        assert runtimes[runtime].version == version
        if provider is not None:
            assert provider in runtimes[runtime].providers


def test_runtime_probe_imports_neither_runtime() -> None:
    """Importing llama_cpp or onnxruntime would cost the agent seconds and tens of MB."""
    check = (
        "import sys; from agent.probe import probe_runtimes; probe_runtimes(); "
        "loaded = {'llama_cpp', 'onnxruntime'} & set(sys.modules); "
        "sys.exit(f'imported {sorted(loaded)}' if loaded else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- /proc/cpuinfo -------------------------------------------------------------


def test_parse_pi4_cpuinfo() -> None:
    facts = parse_cpuinfo(PI4_CPUINFO.read_text())
    assert facts.model == "Cortex-A72"
    assert facts.flags == ["asimd"]
    assert facts.board_model == "Raspberry Pi 4 Model B Rev 1.4"


def test_parse_x86_cpuinfo() -> None:
    facts = parse_cpuinfo(XEON_CPUINFO.read_text())
    assert facts.model == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni"} <= set(facts.flags)
    # only inference-relevant flags, once each although every processor lists them
    assert set(facts.flags) <= INFERENCE_FLAGS
    assert len(facts.flags) == len(set(facts.flags)) <= MAX_FLAGS
    assert "vmx" not in facts.flags and "fpu" not in facts.flags
    assert facts.board_model == ""


def test_parse_big_little_cpuinfo() -> None:
    blocks = [(n, "0xd05") for n in range(4)] + [(n, "0xd0b") for n in range(4, 8)]
    text = "\n".join(
        f"processor\t: {n}\nFeatures\t: fp asimd asimddp\n"
        f"CPU implementer\t: 0x41\nCPU part\t: {part}\n"
        for n, part in blocks
    )
    facts = parse_cpuinfo(text)
    assert facts.model == "Cortex-A55 + Cortex-A76"
    assert facts.flags == ["asimd", "asimddp"]


def test_parse_unknown_arm_core_and_empty_cpuinfo() -> None:
    text = "processor\t: 0\nCPU implementer\t: 0x61\nCPU part\t: 0x022\n"
    assert parse_cpuinfo(text).model == "implementer 0x61 part 0x022"
    assert parse_cpuinfo("") == parse_cpuinfo("garbage without colons")


def test_probe_cpu_reads_cpuinfo_under_root(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", PI4_CPUINFO.read_text())
    cpu = probe_cpu(tmp_path)
    assert (cpu.model, cpu.flags) == ("Cortex-A72", ["asimd"])
    assert cpu.cores >= 1  # counts come from psutil, i.e. this machine


def test_probe_cpu_without_cpuinfo(tmp_path: Path) -> None:
    cpu = probe_cpu(tmp_path)
    assert cpu.model == "" and cpu.flags == [] and cpu.cores >= 1


# -- board model ---------------------------------------------------------------


def test_board_model_from_devicetree(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\0")
    # an ARM board with UEFI may have DMI too; the devicetree string wins
    write(tmp_path, "sys/class/dmi/id/product_name", "Something else\n")
    assert probe_board_model(tmp_path) == "Raspberry Pi 4 Model B Rev 1.4"


@pytest.mark.parametrize(
    ("vendor", "product", "expected"),
    [
        pytest.param("Dell Inc.", "XPS 16 9640", "Dell Inc. XPS 16 9640", id="vendor_and_product"),
        pytest.param(
            "NVIDIA",
            "NVIDIA Jetson Orin Nano Developer Kit",
            "NVIDIA Jetson Orin Nano Developer Kit",
            id="vendor_not_repeated",
        ),
        pytest.param("System manufacturer", "System Product Name", "", id="placeholders_dropped"),
        pytest.param(
            "System manufacturer", "PRIME X670E-PRO", "PRIME X670E-PRO", id="placeholder_vendor"
        ),
    ],
)
def test_board_model_from_dmi(tmp_path: Path, vendor: str, product: str, expected: str) -> None:
    write(tmp_path, "sys/class/dmi/id/sys_vendor", f"{vendor}\n")
    write(tmp_path, "sys/class/dmi/id/product_name", f"{product}\n")
    assert probe_board_model(tmp_path) == expected


def test_board_model_falls_back_to_cpuinfo(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", PI4_CPUINFO.read_text())
    assert probe_board_model(tmp_path) == "Raspberry Pi 4 Model B Rev 1.4"
    assert probe_board_model(tmp_path / "empty") == ""


# -- NVIDIA GPUs ---------------------------------------------------------------


def test_parse_nvidia_smi() -> None:
    gpus = parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564\nNVIDIA RTX A4000, 16376\n\n")
    assert gpus == [
        Accelerator(kind="gpu", vendor="NVIDIA", name="NVIDIA GeForce RTX 4090",
                    memory_bytes=24564 * MIB),
        Accelerator(kind="gpu", vendor="NVIDIA", name="NVIDIA RTX A4000",
                    memory_bytes=16376 * MIB),
    ]  # fmt: skip


def test_parse_nvidia_smi_shared_memory_gpu() -> None:
    # Jetson: the iGPU has no memory of its own to report
    assert parse_nvidia_smi("Orin (nvgpu), [N/A]\n")[0].memory_bytes == 0


def test_missing_nvidia_smi_yields_no_gpu(tmp_path: Path) -> None:
    assert probe_nvidia_gpus(MISSING_NVIDIA_SMI) == []
    assert probe_accelerators(tmp_path, MISSING_NVIDIA_SMI) == []


def test_nvidia_smi_output_is_used(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, 'echo "NVIDIA GeForce RTX 4090, 24564"')
    [gpu] = probe_accelerators(tmp_path / "root", smi)
    assert (gpu.name, gpu.memory_bytes) == ("NVIDIA GeForce RTX 4090", 24564 * MIB)


def test_failing_nvidia_smi_yields_no_gpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    smi = fake_nvidia_smi(
        tmp_path,
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\n'
        "exit 9",
    )
    with caplog.at_level(logging.WARNING, logger="agent.accelerators"):
        assert probe_nvidia_gpus(smi) == []
    assert "exited 9" in caplog.text


def test_hanging_nvidia_smi_is_bounded(tmp_path: Path) -> None:
    smi = fake_nvidia_smi(tmp_path, "exec sleep 30")
    started = time.monotonic()
    assert probe_nvidia_gpus(smi, timeout_s=0.5) == []
    assert time.monotonic() - started < 10


# -- Tegra iGPU and NPUs -------------------------------------------------------


def test_tegra_igpu_from_devicetree(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/compatible",
          b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0")  # fmt: skip
    expected = [Accelerator(kind="gpu", vendor="NVIDIA", name="Orin", memory_bytes=0)]
    assert probe_tegra_gpu(tmp_path) == expected
    # used when nvidia-smi is missing (JetPack 5)
    assert probe_accelerators(tmp_path, MISSING_NVIDIA_SMI) == expected


def test_no_tegra_igpu_on_other_boards(tmp_path: Path) -> None:
    assert probe_tegra_gpu(tmp_path) == []
    write(tmp_path, "proc/device-tree/compatible", b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    assert probe_tegra_gpu(tmp_path) == []


def test_intel_npu_from_dev_accel(tmp_path: Path) -> None:
    write(tmp_path, "dev/accel/accel0", b"")
    driver = tmp_path / "sys/bus/pci/drivers/intel_vpu"
    driver.mkdir(parents=True)
    device = tmp_path / "sys/class/accel/accel0/device"
    device.mkdir(parents=True)
    (device / "driver").symlink_to(driver)
    assert probe_npus(tmp_path) == [Accelerator(kind="npu", vendor="Intel", name="Intel NPU")]


def test_unknown_accel_driver_and_misc_npu(tmp_path: Path) -> None:
    write(tmp_path, "dev/accel/accel0", b"")  # no sysfs driver link
    write(tmp_path, "sys/class/misc/npu/dev", "10:123\n")
    assert probe_npus(tmp_path) == [
        Accelerator(kind="npu", name="accel0"),
        Accelerator(kind="npu", name="npu"),
    ]


def test_no_npu(tmp_path: Path) -> None:
    assert probe_npus(tmp_path) == []


def test_failing_probe_part_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a directory where a file should be makes the Tegra probe raise
    (tmp_path / "proc/device-tree/compatible").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="agent.probe"):
        caps = probe_capabilities(tmp_path, root=tmp_path, nvidia_smi=MISSING_NVIDIA_SMI)
    assert caps.accelerators == []
    assert "tegra gpu skipped" in caplog.text


# -- OS and disk ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "distro"),
    [
        ('NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
         "Debian GNU/Linux 12 (bookworm)"),
        ("PRETTY_NAME='Ubuntu 22.04.5 LTS'\n", "Ubuntu 22.04.5 LTS"),
        ("PRETTY_NAME=Alpine\n", "Alpine"),
        ('PRETTY_NAME="unterminated\n', "unterminated"),
        ("NAME=NoPretty\n", ""),
    ],
)  # fmt: skip
def test_parse_os_release(text: str, distro: str) -> None:
    assert parse_os_release(text) == distro


def test_probe_os_reads_os_release_under_root(tmp_path: Path) -> None:
    write(tmp_path, "usr/lib/os-release", 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\n')
    assert probe_os(tmp_path).distro == "Ubuntu 22.04.5 LTS"
    write(tmp_path, "etc/os-release", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    info = probe_os(tmp_path)
    assert info.distro == "Debian GNU/Linux 12 (bookworm)"
    assert info.system  # platform.system() of this machine


def test_disk_free_of_a_model_dir_not_created_yet(tmp_path: Path) -> None:
    missing = tmp_path / "a" / "b" / "models"
    free = disk_free_bytes(missing)
    assert free > 0
    assert abs(free - shutil.disk_usage(tmp_path).free) < 1024**3
    assert not missing.exists()
