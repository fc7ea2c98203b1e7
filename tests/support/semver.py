"""Version strings in known semver precedence, shared by the ordering tests."""

from __future__ import annotations

#: semver.org's own precedence example (spec item 11), lowest first
SPEC_PRECEDENCE_CHAIN: tuple[str, ...] = (
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
)
