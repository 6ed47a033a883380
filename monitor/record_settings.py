"""The ``record`` and ``visits`` sections, a camera's ``record`` override and its ``alerts`` rules.

``monitor.settings`` assembles these into ``Settings`` and re-exports them:
import them from there.

Recording keeps only what events need: a short ring of stream-copied
segments per camera, and one MP4 clip per event and per visit cut from it
(``monitor.recording``, ``monitor.recorder``). ``alerts`` rules decide a
visit's severity (``monitor.visits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from monitor.classifier_settings import Seconds
from monitor.names import TopicName


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionSettings(_Section):
    """How long clips are kept, and how much disk a camera's recordings may take."""

    days: float = Field(7.0, gt=0, description="Clips older than this are deleted.")
    max_bytes: ByteSize = Field(
        ByteSize(20_000_000_000),
        ge=1_000_000,
        description="Most bytes of one camera's clips and segments (20GB, 500MiB); oldest clips go first.",
    )


class RecordSettings(_Section):
    """Clips of events with pre- and post-roll, stream-copied from the camera (no re-encode)."""

    enabled: bool = Field(False, description="Record this camera's events (only clips are kept, no 24/7).")
    path: Path = Field(
        Path("recordings"), description="Folder of segments and clips, one subfolder per camera."
    )
    pre_capture: Seconds = Field(5.0, ge=0, le=300, description="Seconds of video kept before an event.")
    post_capture: Seconds = Field(5.0, ge=0, le=300, description="Seconds of video kept after an event.")
    segment: Seconds = Field(
        10.0, ge=1, le=600, description="Length of one segment of the ring (cut at the next keyframe)."
    )
    retention: RetentionSettings = Field(default_factory=RetentionSettings)


class CameraRecordSettings(_Section):
    """A camera's changes to ``record`` (``record: true`` turns it on with the defaults)."""

    enabled: bool | None = None
    pre_capture: Seconds | None = Field(None, ge=0, le=300)
    post_capture: Seconds | None = Field(None, ge=0, le=300)
    segment: Seconds | None = Field(None, ge=1, le=600)
    retention: RetentionSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        if isinstance(value, bool):  # record: true
            return {"enabled": value}
        return value

    def merge(self, base: RecordSettings) -> RecordSettings:
        """``base`` with this camera's changes."""
        updates: dict[str, Any] = {
            k: getattr(self, k)
            for k in ("enabled", "pre_capture", "post_capture", "segment", "retention")
            if getattr(self, k) is not None
        }
        return base.model_copy(update=updates)


class AlertRule(_Section):
    """One rule for a visit of severity ``alert``: all of what it sets must hold for one event."""

    labels: list[TopicName] = Field(
        default_factory=list,
        description="The event's label, sub_label or category (wildlife, person...) is one of these; "
        "empty: any.",
    )
    zones: list[TopicName] = Field(
        default_factory=list, description="The event entered one of these zones; empty: anywhere."
    )


#: A camera without ``alerts``: people and wildlife anywhere make a visit an alert.
DEFAULT_ALERTS = (AlertRule(labels=["person"]), AlertRule(labels=["wildlife"]))


class VisitSettings(_Section):
    """Visits (review items): a camera's overlapping or adjacent events, one notification each."""

    gap: Seconds = Field(
        30.0, gt=0, le=3600, description="Events closer than this on one camera belong to one visit."
    )
