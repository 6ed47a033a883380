"""Tracking: one ByteTrack per camera, fed with the camera's capture times.

ByteTrack left ``supervision`` in 0.27; Roboflow maintains it in the
``trackers`` package (``ByteTrackTracker``), which takes and returns
``sv.Detections`` and accepts real timestamps, so a camera analysed at an
uneven rate still predicts motion correctly.

A camera whose stream restarts keeps its tracker: ByteTrack counts a lost
track's time in capture seconds, so after a gap longer than
``objects.tracker.lost_seconds`` (a reconnect after an outage) every old
track is gone and what is seen next gets new ids, never an earlier one; a
reconnect within that time continues the tracks. The tracker is never reset:
ByteTrack's reset restarts its ids at 1, and the alert rules would take a new
object for the track that had that id before.
"""

from __future__ import annotations

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from monitor.settings import TrackerSettings


class CameraTracker:
    """ByteTrack for one camera's detections.

    Args:
        settings: The ``objects.tracker`` section.
        fps: The camera's detect fps (ByteTrack's reference frame rate).
        labels: Only detections with these class names are tracked (None: every detection).
    """

    def __init__(self, settings: TrackerSettings, fps: float, labels: list[str] | None) -> None:
        self._labels = None if labels is None else frozenset(labels)
        self._tracker = ByteTrackTracker(
            lost_track_buffer=max(1, round(settings.lost_seconds * 30)),  # counted in 30 fps frames
            frame_rate=fps,
            track_activation_threshold=settings.activation_threshold,
            minimum_consecutive_frames=settings.min_frames,
            minimum_iou_threshold=settings.match_iou,
            high_conf_det_threshold=settings.high_threshold,
        )

    def update(self, detections: sv.Detections, timestamp: float) -> sv.Detections:
        """Track one frame's detections.

        Args:
            detections: The detector's output for the frame.
            timestamp: The frame's capture time, strictly increasing per camera.

        Returns:
            The tracked detections (``tracker_id`` >= 0) of the tracked labels.
        """
        labels = self._labels
        if len(detections) and labels is not None:
            names = detections.data["class_name"]
            keep = np.fromiter((n in labels for n in names), bool, len(names))
            if not keep.all():  # supervision's indexing costs tens of microseconds: only when needed
                detections = detections[keep]  # type: ignore[assignment]  # mask indexing gives Detections
        tracked: sv.Detections = self._tracker.update(detections, timestamp=timestamp)
        if len(tracked) == 0 or tracked.tracker_id is None:
            return tracked
        confirmed = tracked.tracker_id >= 0
        if confirmed.all():
            return tracked
        kept: sv.Detections = tracked[confirmed]  # type: ignore[assignment]
        return kept
