"""Detections made without supervision's checks are the same objects as checked ones."""

from __future__ import annotations

import numpy as np
import supervision as sv

from monitor import detections


def test_unchecked_detections_equal_checked_ones_and_work_with_supervision():
    xyxy = np.array([[10, 20, 110, 220], [300, 40, 350, 90]], np.float32)
    confidence = np.array([0.9, 0.4], np.float32)
    class_id = np.array([0, 3])
    names = np.array(["person", "deer"], dtype=object)
    ids = np.array([7, 8])
    checked = sv.Detections(
        xyxy=xyxy, confidence=confidence, class_id=class_id, tracker_id=ids, data={"class_name": names}
    )
    # The supervision this project pins has the fields ``trusted`` sets: the fast path runs.
    assert detections.UNCHECKED
    made = detections.trusted(xyxy, confidence, class_id, names, ids)
    assert made == checked
    assert len(made) == 2
    assert np.array_equal(made.area, checked.area)
    kept = made[made.confidence > 0.5]
    assert list(kept.data["class_name"]) == ["person"]
    assert list(kept.tracker_id) == [7]
    assert sv.Detections.merge([made, checked]) == sv.Detections.merge([checked, checked])
    empty = detections.trusted(
        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int), np.zeros(0, object)
    )
    assert len(empty) == 0
    assert empty.is_empty()
