"""Every reason the agent can put in an event has an EventCode.

The agent fills an event's ``code`` with ``EventCode(exc.reason)`` from the
exception it caught. So every exception class that can end an update (the
protocol's refusals, the download, artifact and store errors, the state,
trust and staging errors) must carry a ``reason`` that is an EventCode
value. The classes are found by looking at the modules, not listed by hand:
a new error class with an unknown reason fails here.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import agent.errors
import agent.trust
import agent.update.state
import protocol.errors
from agent.update.staging import StagingError
from protocol import EventCode, FitResult, fit_check
from tests.support.signer import make_variant

ERROR_MODULES = (protocol.errors, agent.errors, agent.update.state, agent.trust)


def _errors(module: ModuleType) -> list[type[Exception]]:
    return [
        cls for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == module.__name__
    ]


ERRORS = [cls for module in ERROR_MODULES for cls in _errors(module)]


def test_every_error_module_is_searched() -> None:
    # Each module defines error classes: an emptied or renamed one would pass the table silently.
    assert all(_errors(module) for module in ERROR_MODULES)
    assert {"HashMismatch", "ReplayError", "StateCorrupt", "TrustUnavailable"} <= {
        cls.__name__ for cls in ERRORS
    }


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_error_reason_is_an_event_code(cls: type[Exception]) -> None:
    reason = getattr(cls, "reason", None)  # its own or inherited from its root
    assert isinstance(reason, str), f"{cls.__name__} has no reason"
    assert EventCode(reason).value == reason


@pytest.mark.parametrize("code", [EventCode.STORE_CORRUPT, EventCode.TOKENIZER_MISMATCH])
def test_staging_error_takes_its_code(code: EventCode) -> None:
    # StagingError's reason is given per raise, typed EventCode: whatever it carries is a code.
    assert EventCode(StagingError(code, "detail").reason) is code


def test_fit_check_reasons_are_event_codes() -> None:
    variant = make_variant()
    refusals: list[FitResult] = [
        fit_check(variant, ram_bytes=1, disk_free_bytes=1 << 40, os_reserved_bytes=0),
        fit_check(variant, ram_bytes=1 << 40, disk_free_bytes=1, os_reserved_bytes=0),
    ]
    assert [EventCode(r.reason) for r in refusals] == [
        EventCode.INSUFFICIENT_RAM, EventCode.INSUFFICIENT_DISK,
    ]
