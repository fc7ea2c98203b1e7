"""Which variant of a release a device gets: the tier policy.

The director uses it for every assignment and the rollout engine for every
stage's cohort, so both give a device the same variant for the same facts.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, cast

from protocol import ReleaseManifest, Tier, ram_needed_bytes

from .db.models import Device


def choose_tier(
    manifest: ReleaseManifest, device_tier: Tier | None, ram_bytes: int | None = None
) -> tuple[Tier | None, str]:
    """The variant tier to give a device, or None and why not.

    The device's own tier when the release has it; otherwise the highest
    variant *below* it (a medium device runs a small model; agents accept a
    variant at or below their tier). A variant the device's reported RAM
    cannot hold is skipped for the next lower one. Never a tier above the
    device's: the agent would refuse it.
    """
    if device_tier is None:
        return None, "the device has not reported its tier yet (no hello)"
    candidates = sorted(
        (tier for tier in manifest.variants if tier.rank <= device_tier.rank),
        key=lambda tier: tier.rank,
        reverse=True,
    )
    if not candidates:
        have = ", ".join(sorted(t.value for t in manifest.variants))
        return None, (
            f"{manifest.ref} has no variant at or below tier {device_tier.value} (has: {have})"
        )
    for tier in candidates:
        variant = manifest.variants[tier]
        if ram_bytes is None or ram_needed_bytes(variant) <= ram_bytes:
            return tier, "ok"
    return None, f"no variant of {manifest.ref} fits the device's {ram_bytes} bytes of RAM"


#: the RAM of a device's latest capability report, read in the database: a
#: stage of thousands needs this one number, not every whole report parsed
#: (reports were validated at ingest)
#: (BIGINT: PostgreSQL's integer, what ``as_integer`` casts to, stops at 2 GiB)
RAM_BYTES = cast(Device.latest_capabilities["ram_bytes"].as_string(), BigInteger)
