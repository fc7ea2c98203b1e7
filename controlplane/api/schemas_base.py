"""The base of every response body read from a table row."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FromRow(BaseModel):
    """A response body that ``model_validate`` fills from a row's attributes."""

    model_config = ConfigDict(from_attributes=True)
