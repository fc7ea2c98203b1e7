"""Fixtures for test modules that publish signed releases: one trust simulator
and its key files per module.

Use with ``pytest_plugins = ["tests.support.trust_fixtures"]`` in the module.
"""

from __future__ import annotations

import pytest

from tests.support.registry import TrustFiles, write_trust
from tests.support.signer import TrustSimulator


@pytest.fixture(scope="module")
def sim() -> TrustSimulator:
    """The module's signing keys (release and director), held in memory."""
    return TrustSimulator()


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory, sim: TrustSimulator) -> TrustFiles:
    """``sim``'s public keys and director key written where a control plane reads them."""
    return write_trust(tmp_path_factory.mktemp("keys"), sim)
