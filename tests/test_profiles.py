"""Firmware profiles: the shipped YAML loads, recorded devices match the right profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.profiles import (
    GENERIC_PROFILE_ID,
    FirmwareProfile,
    MatchRules,
    compute_tier,
    default_profiles_dir,
    load_profiles,
    match_profile,
)
from agent.simulated import SIMULATED_PRESETS, simulated_capabilities
from protocol import Accelerator, Capabilities, Tier

REPO = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO / "firmware-profiles"
SNAPSHOTS = Path(__file__).parent / "fixtures" / "capabilities"
GIB = 1024**3

#: snapshot file -> (profile id it must match, tier it must get)
EXPECTED = {
    "raspberry-pi-4-4gb": ("raspberry-pi-4-4gb", Tier.MICRO),
    "raspberry-pi-5-8gb": ("raspberry-pi-5-8gb", Tier.SMALL),
    "jetson-orin-nano-8gb": ("jetson-orin-nano-8gb", Tier.SMALL),
    "x86_64-npu-laptop-16gb": ("x86_64-npu-laptop-16gb", Tier.SMALL),
    "x86_64-gpu-workstation": ("x86_64-gpu-workstation", Tier.MEDIUM),
    "generic-x86_64-vm-2gb": (GENERIC_PROFILE_ID, Tier.MICRO),
    "generic-x86_64-server-64gb": (GENERIC_PROFILE_ID, Tier.MEDIUM),
    "generic-aarch64-board-12gb": (GENERIC_PROFILE_ID, Tier.SMALL),
}

VALID_PROFILE = """\
id: {id}
description: test board
tier: small
priority: 10
match:
  arch: [aarch64]
  board_model: '^Test Board'
runtime:
  threads: 4
"""


def snapshot(name: str) -> Capabilities:
    return Capabilities.model_validate_json((SNAPSHOTS / f"{name}.json").read_bytes())


def with_changes(caps: Capabilities, **changes: object) -> Capabilities:
    """A copy of ``caps`` with fields replaced, validated like a real report."""
    return Capabilities.model_validate(caps.model_dump() | changes)


@pytest.fixture(scope="module")
def profiles() -> list[FirmwareProfile]:
    return load_profiles(PROFILES_DIR)


# -- shipped profiles ----------------------------------------------------------


def test_every_shipped_profile_loads(profiles: list[FirmwareProfile]) -> None:
    files = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    assert [p.id for p in profiles] == files
    assert set(files) >= {
        "raspberry-pi-4-4gb",
        "raspberry-pi-5-8gb",
        "jetson-orin-nano-8gb",
        "x86_64-npu-laptop-16gb",
        "x86_64-gpu-workstation",
    }
    for profile in profiles:
        assert profile.description
        assert profile.match != MatchRules(), f"{profile.id} would match every device"


def test_shipped_runtime_settings(profiles: list[FirmwareProfile]) -> None:
    by_id = {p.id: p for p in profiles}
    pi4 = by_id["raspberry-pi-4-4gb"].runtime
    assert (pi4.threads, pi4.os_reserved_mb, pi4.gpu_layers) == (4, 512, 0)
    for gpu_profile in ("jetson-orin-nano-8gb", "x86_64-gpu-workstation"):
        runtime = by_id[gpu_profile].runtime
        assert runtime.gpu_layers == 99
        assert runtime.onnx_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert by_id["x86_64-npu-laptop-16gb"].runtime.onnx_providers == [
        "OpenVINOExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_every_snapshot_has_an_expectation() -> None:
    assert sorted(p.stem for p in SNAPSHOTS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED.items()))
def test_snapshot_matches_expected_profile(
    profiles: list[FirmwareProfile], name: str, expected: tuple[str, Tier]
) -> None:
    profile = match_profile(snapshot(name), profiles)
    assert (profile.id, profile.tier) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_tier_agrees_with_computed_tier(profiles: list[FirmwareProfile], name: str) -> None:
    """Profiles refine runtime settings; none should contradict DESIGN.md's size classes."""
    caps = snapshot(name)
    assert match_profile(caps, profiles).tier == compute_tier(caps)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_only_the_expected_profile_matches(profiles: list[FirmwareProfile], name: str) -> None:
    """Specificity: e.g. a Pi 5 does not match the Pi 4 profile at a lower priority."""
    matching = [p.id for p in profiles if p.matches(snapshot(name))]
    expected_id = EXPECTED[name][0]
    assert matching == ([] if expected_id == GENERIC_PROFILE_ID else [expected_id])


# -- specificity and rules -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "changes", "expected_id"),
    [
        # a 2 GB Pi 4 is outside the 4 GB profile's RAM range
        ("raspberry-pi-4-4gb", {"ram_bytes": int(1.8 * GIB)}, GENERIC_PROFILE_ID),
        # the Pi 400 is the same 4 GB BCM2711 board in a keyboard
        ("raspberry-pi-4-4gb", {"board_model": "Raspberry Pi 400 Rev 1.0"}, "raspberry-pi-4-4gb"),
        ("raspberry-pi-4-4gb", {"board_model": "Raspberry Pi Compute Module 4 Rev 1.0"},
         GENERIC_PROFILE_ID),
        # a 4 GB Pi 5 is not the 8 GB profile
        ("raspberry-pi-5-8gb", {"ram_bytes": int(3.9 * GIB)}, GENERIC_PROFILE_ID),
        # a 32-bit OS on a Pi 5 reports armv7l
        ("raspberry-pi-5-8gb", {"cpu": {"arch": "armv7l", "cores": 4, "threads": 4}},
         GENERIC_PROFILE_ID),
        # a Jetson with no CUDA GPU reported gets no CUDA offload profile
        ("jetson-orin-nano-8gb", {"accelerators": []}, GENERIC_PROFILE_ID),
        # a 12 GB card is not a >= 16 GB workstation GPU
        ("x86_64-gpu-workstation",
         {"accelerators": [{"kind": "gpu", "vendor": "NVIDIA", "name": "NVIDIA GeForce RTX 4070",
                            "memory_bytes": 12282 * 1024**2}]},
         GENERIC_PROFILE_ID),
        # a "16 GB" card reports 16376 MiB and still counts
        ("x86_64-gpu-workstation",
         {"accelerators": [{"kind": "gpu", "vendor": "NVIDIA", "name": "NVIDIA RTX A4000",
                            "memory_bytes": 16376 * 1024**2}]},
         "x86_64-gpu-workstation"),
        # OpenVINO does not drive AMD's NPU
        ("x86_64-npu-laptop-16gb",
         {"accelerators": [{"kind": "npu", "vendor": "AMD", "name": "AMD XDNA NPU"}]},
         GENERIC_PROFILE_ID),
        ("x86_64-npu-laptop-16gb", {"ram_bytes": 31 * GIB}, GENERIC_PROFILE_ID),
    ],
)  # fmt: skip
def test_specificity(
    profiles: list[FirmwareProfile], name: str, changes: dict, expected_id: str
) -> None:
    assert match_profile(with_changes(snapshot(name), **changes), profiles).id == expected_id


def _profile(id: str, priority: int, **match: object) -> FirmwareProfile:
    return FirmwareProfile.model_validate(
        {"id": id, "description": id, "tier": "small", "priority": priority, "match": match}
    )


def test_highest_priority_wins_and_ties_go_to_the_smaller_id() -> None:
    caps = snapshot("raspberry-pi-5-8gb")
    broad = _profile("any-aarch64", 10, arch=["aarch64"])
    narrow = _profile("pi5", 100, board_model="raspberry pi 5")  # case-insensitive
    twin = _profile("a-pi5", 100, cpu_model="A76")
    assert match_profile(caps, [broad, narrow]).id == "pi5"
    assert match_profile(caps, [narrow, twin, broad]).id == "a-pi5"
    assert match_profile(caps, [twin, narrow]).id == "a-pi5"


def test_accelerator_rule_needs_one_accelerator_satisfying_every_field() -> None:
    caps = with_changes(
        snapshot("x86_64-gpu-workstation"),
        accelerators=[
            {"kind": "gpu", "vendor": "NVIDIA", "name": "small card", "memory_bytes": 4 * GIB},
            {"kind": "npu", "vendor": "Intel", "name": "big npu", "memory_bytes": 32 * GIB},
        ],
    )
    # GPU kind from one accelerator and memory from the other must not combine
    assert not _profile("x", 0, accelerator={"kind": "gpu", "min_memory_gib": 16}).matches(caps)
    assert _profile("x", 0, accelerator={"kind": "npu", "min_memory_gib": 16}).matches(caps)
    assert _profile("x", 0, accelerator={"name": "^small"}).matches(caps)
    assert _profile("x", 0, accelerator={}).matches(caps)
    assert not _profile("x", 0, accelerator={}).matches(snapshot("raspberry-pi-4-4gb"))


def test_empty_match_matches_everything() -> None:
    for name in EXPECTED:
        assert _profile("catch-all", 0).matches(snapshot(name))


# -- computed tier -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ram_gib", "accelerators", "tier"),
    [
        (1.9, [], Tier.MICRO),
        (3.7, [], Tier.MICRO),
        (7.0, [], Tier.MICRO),
        (7.4, [], Tier.SMALL),  # an "8 GB" board as measured
        (15.3, [], Tier.SMALL),
        (28.0, [], Tier.SMALL),
        (31.2, [], Tier.MEDIUM),  # a "32 GB" machine as measured
        (3.7, [Accelerator(kind="npu", vendor="Intel")], Tier.SMALL),
        (15.3, [Accelerator(kind="gpu", memory_bytes=16376 * 1024**2)], Tier.MEDIUM),
        (15.3, [Accelerator(kind="gpu", memory_bytes=12 * GIB)], Tier.SMALL),
        # a shared-memory iGPU reports 0 bytes of its own: RAM decides
        (7.4, [Accelerator(kind="gpu", vendor="NVIDIA", name="Orin")], Tier.SMALL),
    ],
)
def test_compute_tier(ram_gib: float, accelerators: list[Accelerator], tier: Tier) -> None:
    caps = with_changes(
        snapshot("generic-x86_64-vm-2gb"),
        ram_bytes=int(ram_gib * GIB),
        accelerators=[a.model_dump() for a in accelerators],
    )
    assert compute_tier(caps) == tier


def test_generic_fallback_is_cpu_only() -> None:
    profile = match_profile(snapshot("generic-x86_64-server-64gb"), [])
    assert profile.id == GENERIC_PROFILE_ID
    assert profile.runtime.gpu_layers == 0
    assert profile.runtime.onnx_providers == ["CPUExecutionProvider"]


# -- malformed profiles --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("id: [unclosed\n", ["not valid YAML"]),
        ("- just\n- a list\n", ["mapping"]),
        (VALID_PROFILE.format(id="bad").replace("tier: small", "tier: huge"), ["tier"]),
        (VALID_PROFILE.format(id="bad").replace("threads: 4", "threads: 0"), ["runtime.threads"]),
        (VALID_PROFILE.format(id="bad").replace("threads: 4", "thread: 4"), ["runtime.thread"]),
        (VALID_PROFILE.format(id="bad").replace("'^Test Board'", "'(unclosed'"),
         ["match.board_model", "regular expression"]),
        (VALID_PROFILE.format(id="bad") + "  os_reserved_mb: lots\n", ["runtime.os_reserved_mb"]),
        (VALID_PROFILE.format(id="bad").replace("  arch: [aarch64]\n",
                                                "  ram_gib: {min: 8, max: 4}\n"),
         ["match.ram_gib", "above max"]),
        (VALID_PROFILE.format(id="bad").replace("description: test board\n", ""),
         ["description"]),
        (VALID_PROFILE.format(id="not-bad"), ["id", "must equal"]),
    ],
)  # fmt: skip
def test_malformed_profile_names_file_and_field(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    (tmp_path / "good.yaml").write_text(VALID_PROFILE.format(id="good"))
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError) as excinfo:
        load_profiles(tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "bad.yaml") in message
    for name in names:
        assert name in message


def test_generic_id_is_reserved(tmp_path: Path) -> None:
    (tmp_path / "generic.yaml").write_text(VALID_PROFILE.format(id="generic"))
    with pytest.raises(ValueError, match="reserved"):
        load_profiles(tmp_path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_profiles(tmp_path / "nowhere")


def test_only_yaml_files_are_profiles(tmp_path: Path) -> None:
    (tmp_path / "test-board.yaml").write_text(VALID_PROFILE.format(id="test-board"))
    (tmp_path / "README.md").write_text("not a profile")
    (tmp_path / "old.yaml.bak").write_text("id: [broken")
    assert [p.id for p in load_profiles(tmp_path)] == ["test-board"]


# -- where profiles live -------------------------------------------------------


def test_default_profiles_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMFLEET_PROFILES_DIR", str(tmp_path))
    assert default_profiles_dir() == tmp_path


def test_default_profiles_dir_skips_missing_env_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLMFLEET_PROFILES_DIR", str(tmp_path / "missing"))
    found = default_profiles_dir()
    assert found != tmp_path / "missing"
    if not Path("/etc/slmfleet/firmware-profiles").is_dir():
        assert found == PROFILES_DIR  # source checkout


# -- simulated presets ---------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(SIMULATED_PRESETS))
def test_simulated_preset_matches_its_own_profile(
    profiles: list[FirmwareProfile], preset: str
) -> None:
    caps = simulated_capabilities(preset)
    assert match_profile(caps, profiles).id == preset
    # the demo fleet and the tests must describe the same boards
    recorded = json.loads((SNAPSHOTS / f"{preset}.json").read_text())
    assert caps.model_dump(mode="json") == recorded


def test_every_preset_names_a_shipped_profile(profiles: list[FirmwareProfile]) -> None:
    assert set(SIMULATED_PRESETS) <= {p.id for p in profiles}


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="raspberry-pi-4-4gb"):
        simulated_capabilities("commodore-64")
