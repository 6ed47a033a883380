"""ByteTrack per camera: only the tracked labels, confirmed ids, and ids across a stream gap."""

from __future__ import annotations

import numpy as np
import supervision as sv

from monitor.settings import TrackerSettings
from monitor.tracking import CameraTracker

FPS = 5.0


def boxes(*xyxy: tuple[float, float, float, float], label: str = "person") -> sv.Detections:
    return sv.Detections(
        xyxy=np.array(xyxy, dtype=np.float32),
        confidence=np.full(len(xyxy), 0.9, dtype=np.float32),
        class_id=np.zeros(len(xyxy), dtype=int),
        data={"class_name": np.array([label] * len(xyxy), dtype=object)},
    )


def track_for(
    tracker: CameraTracker, box: tuple[float, float, float, float], start: float, frames: int
) -> set[int]:
    ids: set[int] = set()
    for i in range(frames):
        tracked = tracker.update(boxes(box), start + i / FPS)
        ids.update(int(t) for t in tracked.tracker_id if tracked.tracker_id is not None)
    return ids


def test_only_the_tracked_labels_get_ids():
    tracker = CameraTracker(TrackerSettings(), FPS, ["person"])
    for i in range(4):
        tracked = tracker.update(boxes((10, 10, 50, 90), label="dog"), i / FPS)
        assert len(tracked) == 0


def test_a_track_is_continued_across_a_reconnect_shorter_than_lost_seconds():
    tracker = CameraTracker(TrackerSettings(lost_seconds=2.0), FPS, ["person"])
    before = track_for(tracker, (100, 100, 160, 260), 0.0, 5)
    after = track_for(tracker, (102, 100, 162, 260), 0.8 + 1.0, 5)  # a 1 s gap
    assert len(before) == 1
    assert after == before


def test_after_an_outage_longer_than_lost_seconds_new_objects_get_new_ids_never_old_ones():
    # The stream restarts after minutes: what is seen next is a new track, and its id
    # was never used before on this camera (so the alert rules cannot mistake it for
    # an old track, as they would if ByteTrack's ids started again at 1).
    tracker = CameraTracker(TrackerSettings(lost_seconds=2.0), FPS, ["person"])
    first = track_for(tracker, (100, 100, 160, 260), 0.0, 5)
    second = track_for(tracker, (300, 100, 360, 260), 2.0, 5)
    after_outage = track_for(tracker, (100, 100, 160, 260), 300.0, 5)  # same place, 5 min later
    assert len(first) == len(second) == len(after_outage) == 1
    assert after_outage.isdisjoint(first | second)
    assert min(after_outage) > max(first | second)
