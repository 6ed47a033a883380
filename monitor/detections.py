"""``sv.Detections`` of arrays the daemon made itself, without supervision's checks.

supervision checks every field's shape and type when a ``Detections`` is
made: about 5 microseconds, several times per frame (the detector's output,
a tracking worker's answer), for arrays whose shapes this daemon set
itself. ``trusted`` makes the same object without the checks. Should a
supervision release change the fields of ``Detections``, it makes them the
checked way instead (``UNCHECKED`` is then False).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import supervision as sv

_FIELDS = ("xyxy", "mask", "confidence", "class_id", "tracker_id", "data", "metadata")
#: True while ``sv.Detections`` has exactly the fields ``trusted`` sets.
UNCHECKED = tuple(f.name for f in dataclasses.fields(sv.Detections)) == _FIELDS


def trusted(
    xyxy: np.ndarray,
    confidence: np.ndarray,
    class_id: np.ndarray,
    names: np.ndarray,
    tracker_id: np.ndarray | None = None,
) -> sv.Detections:
    """Detections of ``n`` boxes: ``xyxy`` (n x 4), ``confidence``, ``class_id``, ``names`` (n, object).

    The caller guarantees the shapes; nothing is copied.
    """
    if not UNCHECKED:
        return sv.Detections(
            xyxy=xyxy,
            confidence=confidence,
            class_id=class_id,
            tracker_id=tracker_id,
            data={"class_name": names},
        )
    detections: sv.Detections = object.__new__(sv.Detections)
    detections.xyxy = xyxy
    detections.mask = None
    detections.confidence = confidence
    detections.class_id = class_id
    detections.tracker_id = tracker_id
    detections.data = {"class_name": names}
    detections.metadata = {}
    return detections
