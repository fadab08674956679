"""The base of the pydantic models of the bundle's files (bundle.json, atlas/atlas.json).

Unknown keys are refused, so a misspelt key in a hand-edited file is an error naming it instead of a
setting silently ignored, and parsed values are frozen (a manifest read once is not changed later).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A frozen pydantic model that refuses keys it does not declare."""

    model_config = ConfigDict(extra="forbid", frozen=True)
