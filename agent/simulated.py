"""SIMULATED hardware. These capability reports are RECORDED DATA, NEVER A REAL PROBE.

``slmfleet dev`` and the fleet simulator run many agents on one machine; each
one presents a different board from the presets below instead of probing the
host (``simulate.preset`` in the agent config). Every hello sent under a
preset carries ``simulated: true`` so the control plane never mistakes it for
a measured device. Real devices always go through :mod:`agent.probe`.

Preset names are the ids of the firmware profiles each one is recorded from,
and ``tests/test_profiles.py`` checks that each preset still matches its own
profile and equals its snapshot in ``tests/fixtures/capabilities/``.
"""

from __future__ import annotations

from typing import Any, Final

from protocol import Capabilities

_ARM_DOTPROD = ["asimd", "fphp", "asimdhp", "asimddp"]
_ZEN4_FLAGS = [
    "ssse3", "fma", "sse4_1", "sse4_2", "avx", "f16c", "avx2", "avx512f", "avx512dq",
    "avx512cd", "avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi", "avx512_vnni",
]  # fmt: skip

#: Preset name -> ``Capabilities.model_dump(mode="json")`` of a recorded board.
SIMULATED_PRESETS: Final[dict[str, dict[str, Any]]] = {
    "raspberry-pi-4-4gb": {
        "cpu": {
            "model": "Cortex-A72",
            "arch": "aarch64",
            "cores": 4,
            "threads": 4,
            "flags": ["asimd"],
        },
        "ram_bytes": 3_977_547_776,  # MemTotal 3884324 kB, ~3.7 GiB
        "disk_free_bytes": 22_548_578_304,
        "accelerators": [],
        "os": {
            "system": "Linux",
            "release": "6.6.51+rpt-rpi-v8",
            "distro": "Debian GNU/Linux 12 (bookworm)",
        },
        "board_model": "Raspberry Pi 4 Model B Rev 1.4",
    },
    "raspberry-pi-5-8gb": {
        "cpu": {
            "model": "Cortex-A76",
            "arch": "aarch64",
            "cores": 4,
            "threads": 4,
            "flags": _ARM_DOTPROD,
        },
        "ram_bytes": 8_443_215_872,  # MemTotal 8245328 kB, ~7.9 GiB
        "disk_free_bytes": 98_784_247_808,
        "accelerators": [],
        "os": {
            "system": "Linux",
            "release": "6.6.51+rpt-rpi-2712",
            "distro": "Debian GNU/Linux 12 (bookworm)",
        },
        "board_model": "Raspberry Pi 5 Model B Rev 1.0",
    },
    "jetson-orin-nano-8gb": {
        "cpu": {
            "model": "Cortex-A78AE",
            "arch": "aarch64",
            "cores": 6,
            "threads": 6,
            "flags": _ARM_DOTPROD,
        },
        "ram_bytes": 7_989_424_128,  # MemTotal 7802172 kB, ~7.4 GiB shared with the iGPU
        "disk_free_bytes": 187_904_819_200,
        # memory_bytes 0: the iGPU has no memory of its own (nvidia-smi says [N/A])
        "accelerators": [{"kind": "gpu", "vendor": "NVIDIA", "name": "Orin", "memory_bytes": 0}],
        "os": {
            "system": "Linux",
            "release": "5.15.148-tegra",
            "distro": "Ubuntu 22.04.5 LTS",
        },
        "board_model": "NVIDIA Jetson Orin Nano Developer Kit",
    },
    "x86_64-npu-laptop-16gb": {
        "cpu": {
            "model": "Intel(R) Core(TM) Ultra 7 155H",
            "arch": "x86_64",
            "cores": 16,
            "threads": 22,
            "flags": ["ssse3", "fma", "sse4_1", "sse4_2", "avx", "f16c", "avx2", "avx_vnni"],
        },
        "ram_bytes": 16_426_614_784,  # ~15.3 GiB: the iGPU reserves part of 16 GB
        "disk_free_bytes": 301_989_888_000,
        "accelerators": [
            {"kind": "npu", "vendor": "Intel", "name": "Intel NPU", "memory_bytes": 0}
        ],
        "os": {
            "system": "Linux",
            "release": "6.8.0-48-generic",
            "distro": "Ubuntu 24.04.1 LTS",
        },
        "board_model": "Dell Inc. XPS 16 9640",
    },
    "x86_64-gpu-workstation": {
        "cpu": {
            "model": "AMD Ryzen 9 7950X 16-Core Processor",
            "arch": "x86_64",
            "cores": 16,
            "threads": 32,
            "flags": _ZEN4_FLAGS,
        },
        "ram_bytes": 66_927_255_552,  # ~62.3 GiB of 64 GB
        "disk_free_bytes": 1_431_655_765_000,
        "accelerators": [
            {
                "kind": "gpu",
                "vendor": "NVIDIA",
                "name": "NVIDIA GeForce RTX 4090",
                "memory_bytes": 25_757_220_864,  # 24564 MiB
            }
        ],
        "os": {
            "system": "Linux",
            "release": "6.8.0-48-generic",
            "distro": "Ubuntu 22.04.5 LTS",
        },
        "board_model": "Micro-Star International Co., Ltd. MS-7E12",
    },
}


def simulated_capabilities(preset: str) -> Capabilities:
    """The recorded (SIMULATED, not probed) capabilities of board ``preset``.

    Raises ``ValueError`` naming the known presets for an unknown name.
    """
    try:
        data = SIMULATED_PRESETS[preset]
    except KeyError:
        known = ", ".join(sorted(SIMULATED_PRESETS))
        raise ValueError(f"unknown simulated hardware preset {preset!r}; known: {known}") from None
    return Capabilities.model_validate(data)
