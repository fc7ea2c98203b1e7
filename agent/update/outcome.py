"""How a running update stops short of its next step: stopped, or failed with a code."""

from __future__ import annotations

from typing import Protocol

from protocol import EventCode, UpdateState


class Reasoned(Protocol):
    """An error that names its :class:`EventCode` value in ``reason`` (every error root here)."""

    reason: str


class Stopped(Exception):
    """The running update must stop here: superseded, or the agent is shutting down.

    Its persisted state stays as it is; the next start (or nothing, if it
    was superseded) takes it from there.
    """


class Failed(Exception):
    """The update ends in ``state``, reported with ``code`` and ``reason``."""

    def __init__(self, state: UpdateState, code: EventCode, detail: str) -> None:
        self.state = state
        self.code = code
        #: the event's human reason: ``"<code>: <detail>"``, as agents have always written it
        self.reason = f"{code.value}: {detail}"
        super().__init__(self.reason)

    @classmethod
    def of(
        cls, exc: Reasoned, *, state: UpdateState = UpdateState.FAILED, detail: str | None = None
    ) -> Failed:
        """The failure ``exc`` means: its ``reason`` is the code, its message the detail."""
        return cls(state, EventCode(exc.reason), str(exc) if detail is None else detail)
