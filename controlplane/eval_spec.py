"""A release spec's evaluation set: the file, where it goes, its time budget on the device.

In the release spec (``controlplane/release_spec.py``)::

    eval_set:
      path: smollm2.eval.json     # relative to the spec's directory
      time_budget_s: 30           # the device stops scoring there
      artifact: smollm2/evals/smollm2.eval.json   # optional

Publishing checks the file (:func:`protocol.eval_set_ref` parses it, so a
bad file is refused before anything is signed), pins it in the signed
manifest and uploads it like a variant's artifact. ``artifact`` defaults to
``<name>/<version>/eval/<file name>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from protocol import EvalSetRef, ProtocolError, eval_set_ref
from protocol.eval_set import MAX_EVAL_BUDGET_S, MAX_EVAL_SET_BYTES


class EvalSetSpec(BaseModel):
    """The ``eval_set`` section of a release spec."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    time_budget_s: Annotated[float, Field(gt=0, le=MAX_EVAL_BUDGET_S)] = 60.0
    artifact: str | None = None

    def resolved(self, base: Path) -> EvalSetSpec:
        """With ``path`` absolute (``~`` and ``$VARS`` expanded, relative to ``base``)."""
        expanded = Path(os.path.expandvars(os.path.expanduser(str(self.path))))
        return self.model_copy(update={"path": expanded if expanded.is_absolute()
                                       else base / expanded})

    def artifact_path(self, name: str, version: str) -> str:
        """Where the file goes in the artifact store."""
        return self.artifact or f"{name}/{version}/eval/{self.path.name}"

    def pin(self, name: str, version: str) -> EvalSetRef:
        """Read, check and pin the file; ValueError naming what is wrong."""
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise ValueError(f"eval_set.path: {self.path} cannot be read: {exc}") from None
        if size > MAX_EVAL_SET_BYTES:
            raise ValueError(f"eval_set.path: {self.path} is {size} bytes, "
                             f"the limit is {MAX_EVAL_SET_BYTES}")
        try:
            return eval_set_ref(self.path.read_bytes(), self.artifact_path(name, version),
                                time_budget_s=self.time_budget_s)
        except (ProtocolError, ValueError) as exc:
            raise ValueError(f"eval_set.path: {self.path}: {exc}") from None
