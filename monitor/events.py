"""What the alert rules emit: ``Event`` (the JSON on ``<prefix>/events``) and ``Alert``.

``monitor.alerts`` makes them and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from monitor.objects_settings import Category

EventType = Literal["new", "update", "end"]


class Event(BaseModel):
    """An event on ``<prefix>/events`` (JSON)."""

    type: EventType
    event_id: str = Field(description="Stable for one track's new, update and end.")
    camera: str
    label: str = Field(description="The detector's class (after model.labels).")
    sub_label: str | None = Field(
        None, description="The classifier's class by vote over the track's crops; null below its min_score."
    )
    sub_label_score: float | None = Field(None, description="The sub_label's vote score (0-1), else null.")
    category: Category = Field("other", description="wildlife, person, vehicle or other (of the sub_label).")
    score: float = Field(description="Score in the frame this event reports.")
    top_score: float = Field(description="Best score of the track so far.")
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in frame pixels.")
    track_id: int
    start_time: float = Field(description="Capture time (Unix seconds) the track was first seen.")
    end_time: float | None = Field(description="Capture time of its last sighting; set on end.")
    frame_time: float = Field(description="Capture time of the frame this event reports.")
    current_zones: list[str] = Field(default_factory=list, description="Zones the object stands in now.")
    entered_zones: list[str] = Field(default_factory=list, description="Zones it has stood in, in order.")
    stationary: bool = Field(False, description="It has not moved for objects.stationary_after.")
    model: str = Field(description="Weights file and the start of its SHA-256.")
    instance: str | None = Field(None, description="Id of the daemon that saw it (cluster.instance_id).")
    snapshot: str | None = Field(description="Topic of this event's annotated JPEG, else null.")
    clip: str | None = Field(
        None, description="On end, where recording is on: HTTP path of the event's MP4 clip."
    )
    clip_error: str | None = Field(None, description="On end, why the clip could not be made, else null.")


@dataclass(frozen=True, slots=True)
class Alert:
    """An event ready to publish, with its optional snapshot.

    Attributes:
        suppressed: ``cooldown`` or ``rate_limit`` when the event is not to be sent.
    """

    event: Event
    snapshot: bytes | None
    #: Capture time of the frame that decided the event (for an ``end``: the frame, or the
    #: moment, in which the track was found missing), the start of ``monitor_alert_latency_seconds``.
    capture_time: float
    suppressed: str | None = None
