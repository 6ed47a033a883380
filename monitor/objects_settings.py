"""The ``objects`` section of the settings: which labels alert, and when a track becomes an alert.

It holds each label's filter (scores, size), the label categories, the
tracker's parameters, the cooldown and stationary rules, and a camera's
overrides of ``objects.track`` and ``objects.filters``. ``monitor.settings``
assembles it into ``Settings`` and re-exports every type: import them from there.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from monitor.names import TopicName


class _Section(BaseModel):
    """As every settings section: unknown keys are errors, and values cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FilterSettings(_Section):
    """When a tracked object becomes an alert."""

    min_score: float = Field(0.5, ge=0.0, le=1.0, description="Scores below this count as a miss (0).")
    threshold: float = Field(
        0.7, ge=0.0, le=1.0, description="Median of the track's recent scores needed to alert."
    )
    min_frames: int = Field(1, ge=1, description="Frames the track must have been seen in before `new`.")
    min_area: float = Field(
        0.0, ge=0, description="Smallest box: pixels, or a fraction of the frame when at most 1."
    )
    max_area: float | None = Field(
        None, gt=0, description="Largest box: pixels, or a fraction of the frame when at most 1."
    )

    def area_ok(self, box_area: float, frame_area: float) -> bool:
        """True when a box of ``box_area`` pixels passes min_area/max_area in a frame of ``frame_area``."""
        low = self.min_area * frame_area if self.min_area <= 1 else self.min_area
        if box_area < low:
            return False
        if self.max_area is None:
            return True
        high = self.max_area * frame_area if self.max_area <= 1 else self.max_area
        return box_area <= high


Category = Literal["wildlife", "person", "vehicle", "other"]

#: Labels of COCO and of the seed's 18-class wildlife model, by category.
DEFAULT_CATEGORIES: dict[str, Category] = {
    "person": "person",
    **{
        label: "wildlife"
        for label in (
            # COCO's animals
            "bird",
            "cat",
            "dog",
            "horse",
            "sheep",
            "cow",
            "elephant",
            "bear",
            "zebra",
            "giraffe",
            # the seed model's wildlife classes
            "buffalo",
            "deer",
            "gaur",
            "raccoon",
            "boar",
            "wild_boar",
            "fox",
            "leopard",
            "tiger",
            "monkey",
            "peacock",
            "porcupine",
            "rabbit",
            "squirrel",
            "wolf",
            "hyena",
            "rhino",
            "antelope",
            "bison",
        )
    },
    **{label: "vehicle" for label in ("car", "truck", "bus", "motorcycle", "bicycle", "train", "boat")},
}


class TrackerSettings(_Section):
    """ByteTrack parameters (one tracker per camera)."""

    high_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Detections at or above this are matched first."
    )
    activation_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Unmatched detections at or above this start a track."
    )
    match_iou: float = Field(
        0.1, ge=0.0, le=1.0, description="Least IoU for a detection to continue a track."
    )
    lost_seconds: float = Field(2.0, gt=0, description="How long ByteTrack keeps a lost track.")
    min_frames: int = Field(2, ge=1, description="Consecutive frames before a track gets an id.")


class ObjectsSettings(_Section):
    """Which labels are tracked and when they alert."""

    track: list[TopicName] = Field(default_factory=lambda: ["person"], description="Labels that alert.")
    filters: dict[TopicName, FilterSettings] = Field(
        default_factory=dict, description="Per-label filters; labels not listed use the defaults."
    )
    score_history: int = Field(10, ge=1, le=100, description="Scores in the median window.")
    update_interval: float = Field(
        5.0, ge=0, description="Least seconds between two `update` events of one track."
    )
    max_disappeared: float = Field(
        2.0, gt=0, description="Seconds a track may be unseen before its `end` event."
    )
    tracker: TrackerSettings = Field(default_factory=TrackerSettings)
    categories: dict[TopicName, Category] = Field(
        default_factory=dict,
        description="Label -> wildlife | person | vehicle | other; added to the built-in table.",
    )
    cooldown: float = Field(
        0.0,
        ge=0,
        description="After a `new` of a label on a camera, others of that label stay silent this long.",
    )
    max_events_per_minute: int | None = Field(
        None, ge=1, description="Most `new` events per camera per minute; the rest stay silent."
    )
    stationary_after: float = Field(
        30.0, gt=0, description="Seconds without moving after which a track is stationary (no updates)."
    )
    stationary_iou: float = Field(
        0.85, gt=0, le=1, description="A box overlapping its resting place this much has not moved."
    )
    stationary_max_disappeared: float = Field(
        60.0, gt=0, description="Seconds a stationary object may be unseen before its `end` event."
    )

    def filter_for(self, label: str) -> FilterSettings:
        """The filter of ``label``, or the defaults."""
        return self.filters.get(label, _DEFAULT_FILTER)

    def category_of(self, label: str) -> Category:
        """The label's category (``other`` when nobody said)."""
        return self.categories.get(label) or DEFAULT_CATEGORIES.get(label, "other")

    def merged(self, override: CameraObjectsSettings | None) -> ObjectsSettings:
        """These settings with a camera's overrides applied (its filters replace per label)."""
        if override is None:
            return self
        updates: dict[str, Any] = {"filters": {**self.filters, **override.filters}}
        if override.track is not None:
            updates["track"] = override.track
        return self.model_copy(update=updates)


class CameraObjectsSettings(_Section):
    """Per-camera overrides of ``objects``."""

    track: list[TopicName] | None = Field(None, description="Replaces objects.track for this camera.")
    filters: dict[TopicName, FilterSettings] = Field(
        default_factory=dict, description="Replace objects.filters per label for this camera."
    )


_DEFAULT_FILTER = FilterSettings()
