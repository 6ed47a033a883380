"""The ``classifier`` section, a camera's override of it, and durations written as ``2s``.

``monitor.settings`` assembles these into ``Settings`` and re-exports them:
import them from there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from monitor.names import TopicName

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def seconds(value: Any) -> Any:
    """``2s``, ``500ms``, ``1.5m``, ``1h`` or a plain number, as seconds (other values pass to pydantic)."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f"expected a duration such as 2s, 500ms, 1m or a number of seconds, got {value!r}"
            )
        return float(match.group(1)) * _UNIT[match.group(2)]
    return value


#: Seconds, written as a number or with a unit (``2s``, ``500ms``, ``1m``, ``1h``).
Seconds = Annotated[float, BeforeValidator(seconds)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassifierSettings(_Section):
    """A second stage that names the species (or any finer class) on crops of tracked objects."""

    path: Path = Field(description="Ultralytics classification weights (.pt) or their ONNX/OpenVINO export.")
    imgsz: int = Field(224, ge=32, le=1024, description="Input size of the square crops, multiple of 32.")
    labels_from: list[TopicName] = Field(
        default_factory=lambda: ["wildlife"],
        description="Categories (wildlife, person, vehicle, other) or detector labels it classifies.",
    )
    min_score: float = Field(
        0.6, ge=0.0, le=1.0, description="Below this vote score sub_label is null and label stays."
    )
    every: Seconds = Field(2.0, gt=0, description="Least time between two crops of one track.")
    max_per_track: int = Field(5, ge=1, le=1000, description="Most crops classified per track.")
    max_batch: int = Field(64, ge=1, le=1024, description="Most crops in one forward pass.")
    labels: dict[str, TopicName] = Field(
        default_factory=dict, description="Rename or merge classifier classes: {class: new_name}."
    )

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32, got {value}")
        return value

    @field_validator("labels_from")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one category or label to classify")
        return value

    def merged(self, override: CameraClassifierSettings | None) -> ClassifierSettings | None:
        """The classifier as one camera uses it (None: not on this camera)."""
        if override is None:
            return self
        if not override.enabled:
            return None
        updates = override.model_dump(exclude={"enabled"}, exclude_none=True)
        return self.model_copy(update=updates)


class CameraClassifierSettings(_Section):
    """A camera's changes to ``classifier``: ``false`` turns it off there."""

    enabled: bool = True
    labels_from: list[TopicName] | None = None
    min_score: float | None = Field(None, ge=0.0, le=1.0)
    every: Seconds | None = Field(None, gt=0)
    max_per_track: int | None = Field(None, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if isinstance(value, bool):  # classifier: false
            return {"enabled": value}
        return value
