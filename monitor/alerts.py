"""Alert rules: turn tracked detections into new / update / end events.

Per track (one camera's ByteTrack id):

* every analysed frame adds the track's score to its history, or 0 when the
  track was not seen or scored under the label's ``min_score``;
* ``new`` once the median of the last ``objects.score_history`` scores
  reaches the label's ``threshold`` (Frigate's true-positive rule: one good
  frame is not enough, one bad frame does not end it);
* ``update`` when the top score improves, at most every ``update_interval``;
* ``end`` when the track has not been seen for ``max_disappeared`` seconds.

``event_id`` is fixed at ``new`` and repeated in ``update`` and ``end`` so
consumers can de-duplicate (QoS 1 may deliver twice). Only confirmed tracks
produce events.
"""

from __future__ import annotations

import secrets
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import supervision as sv
from pydantic import BaseModel, Field

from monitor.settings import ObjectsSettings
from monitor.sources import Frame

SNAPSHOT_QUALITY = 85


class Event(BaseModel):
    """An event on ``<prefix>/events`` (JSON)."""

    type: Literal["new", "update", "end"]
    event_id: str = Field(description="Stable for one track's new, update and end.")
    camera: str
    label: str
    score: float = Field(description="Score in the frame this event reports.")
    top_score: float = Field(description="Best score of the track so far.")
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in frame pixels.")
    track_id: int
    start_time: float = Field(description="Capture time (Unix seconds) the track was first seen.")
    end_time: float | None = Field(description="Capture time of its last sighting; set on end.")
    frame_time: float = Field(description="Capture time of the frame this event reports.")
    model: str = Field(description="Weights file and the start of its SHA-256.")
    snapshot: str | None = Field(description="Topic of the annotated JPEG (new events), else null.")


@dataclass(frozen=True, slots=True)
class Alert:
    """An event ready to publish, with its optional snapshot."""

    event: Event
    snapshot: bytes | None
    capture_time: float


@dataclass(slots=True)
class _Track:
    track_id: int
    label: str
    start_time: float
    scores: deque[float]
    last_seen: float
    box: list[float]
    score: float
    top_score: float = 0.0
    event_id: str | None = None
    last_sent: float = 0.0
    sent_top: float = 0.0
    seen_now: bool = field(default=False)


class AlertRules:
    """The alert rules of one camera.

    Args:
        camera: Camera name.
        objects: The ``objects`` section.
        model: Model identity reported in events.
        snapshot_topic: Topic template for snapshots: ``{label}`` is filled in.
    """

    def __init__(self, camera: str, objects: ObjectsSettings, model: str, snapshot_topic: str) -> None:
        self.camera = camera
        self.objects = objects
        self.model = model
        self.snapshot_topic = snapshot_topic
        self._tracks: dict[int, _Track] = {}
        self._box_annotator = sv.BoxAnnotator(thickness=2)
        self._label_annotator = sv.LabelAnnotator(text_scale=0.5, text_padding=4)

    def update(self, tracked: sv.Detections, frame: Frame) -> list[Alert]:
        """Feed one analysed frame's tracked detections; return the events it causes."""
        now = frame.capture_time
        alerts: list[Alert] = []
        for track in self._tracks.values():
            track.seen_now = False
        rows: list[tuple[np.ndarray, float, int, str]] = []
        if len(tracked):
            assert tracked.confidence is not None
            assert tracked.tracker_id is not None
            rows = list(
                zip(
                    tracked.xyxy,
                    tracked.confidence,
                    tracked.tracker_id,
                    tracked.data["class_name"],
                    strict=True,
                )
            )
        for xyxy, score, track_id, label in rows:
            box = [round(float(v), 1) for v in xyxy]
            known = self._tracks.get(int(track_id))
            if known is None:
                history: deque[float] = deque(maxlen=self.objects.score_history)
                known = self._tracks[int(track_id)] = _Track(
                    int(track_id), str(label), now, history, now, box, 0.0
                )
            track = known
            track.seen_now = True
            track.last_seen, track.box, track.score = now, box, float(score)
            if track.event_id is None:
                track.label = str(label)  # the label may settle while the track is unconfirmed
            rule = self.objects.filter_for(track.label)
            track.scores.append(float(score) if score >= rule.min_score else 0.0)
            if score >= rule.min_score:
                track.top_score = max(track.top_score, float(score))
        for track in self._tracks.values():
            if not track.seen_now:
                track.scores.append(0.0)
            alert = self._decide(track, now, frame)
            if alert is not None:
                alerts.append(alert)
        alerts.extend(self.expire(now))
        return alerts

    def expire(self, now: float) -> list[Alert]:
        """End the tracks unseen for ``max_disappeared`` seconds (call while a camera is down, too)."""
        alerts = []
        for track_id, track in list(self._tracks.items()):
            if now - track.last_seen < self.objects.max_disappeared:
                continue
            del self._tracks[track_id]
            if track.event_id is not None:
                alerts.append(self._alert("end", track, track.last_seen, end_time=track.last_seen))
        return alerts

    def _decide(self, track: _Track, now: float, frame: Frame) -> Alert | None:
        if not track.seen_now:
            return None
        rule = self.objects.filter_for(track.label)
        if track.event_id is None:
            if track.score < rule.min_score or statistics.median(track.scores) < rule.threshold:
                return None
            track.event_id = f"{track.start_time:.6f}-{secrets.token_hex(3)}"
            track.last_sent, track.sent_top = now, track.top_score
            snapshot = self._snapshot(frame, track)
            return self._alert("new", track, now, snapshot=snapshot)
        if track.top_score > track.sent_top and now - track.last_sent >= self.objects.update_interval:
            track.last_sent, track.sent_top = now, track.top_score
            return self._alert("update", track, now)
        return None

    def _alert(
        self,
        kind: Literal["new", "update", "end"],
        track: _Track,
        frame_time: float,
        snapshot: bytes | None = None,
        end_time: float | None = None,
    ) -> Alert:
        assert track.event_id is not None
        event = Event(
            type=kind,
            event_id=track.event_id,
            camera=self.camera,
            label=track.label,
            score=round(track.score, 4),
            top_score=round(track.top_score, 4),
            box=track.box,
            track_id=track.track_id,
            start_time=track.start_time,
            end_time=end_time,
            frame_time=frame_time,
            model=self.model,
            snapshot=self.snapshot_topic.format(label=track.label) if snapshot is not None else None,
        )
        return Alert(event, snapshot, frame_time)

    def _snapshot(self, frame: Frame, track: _Track) -> bytes | None:
        detections = sv.Detections(
            xyxy=np.array([track.box], dtype=np.float32),
            confidence=np.array([track.score], dtype=np.float32),
            class_id=np.array([0]),
        )
        scene = self._box_annotator.annotate(frame.image.copy(), detections)
        scene = self._label_annotator.annotate(scene, detections, labels=[f"{track.label} {track.score:.2f}"])
        ok, jpeg = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, SNAPSHOT_QUALITY])
        return jpeg.tobytes() if ok else None
