"""Zones and masks of one camera: supervision's ``PolygonZone`` on the box's bottom centre.

Coordinates are pixels, or fractions of the frame when every value is at most
1; they are resolved once per frame size. An object is in a zone (or a mask)
when the bottom centre of its box is: where it stands, as in Frigate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import supervision as sv

from monitor.settings import CameraSettings, ObjectsSettings, Point

ANCHOR = (sv.Position.BOTTOM_CENTER,)


def to_pixels(points: list[Point], width: int, height: int) -> np.ndarray:
    """A polygon's corners in pixels of a ``width`` x ``height`` frame (Nx2 int32).

    Fractions are used when every coordinate is at most 1, else the points are pixels already.
    """
    fractions = all(x <= 1 and y <= 1 for x, y in points)
    scale = np.array([width, height] if fractions else [1, 1], dtype=np.float64)
    return np.round(np.array(points, dtype=np.float64) * scale).astype(np.int32)


class Regions:
    """Masks, size filters and named zones of one camera.

    Args:
        camera: The camera's settings (zones, masks).
        objects: The camera's effective ``objects`` settings (labels, filters).
        also: Labels kept besides ``objects.track`` (those the classifier may name a tracked one).
    """

    def __init__(
        self, camera: CameraSettings, objects: ObjectsSettings, also: Callable[[str], bool] | None = None
    ) -> None:
        self._camera = camera
        self._objects = objects
        self._tracked = frozenset(objects.track)
        self._also = also
        self._shape: tuple[int, int] | None = None
        self._masks: list[sv.PolygonZone] = []
        self._zones: list[tuple[str, sv.PolygonZone, set[str] | None]] = []

    def _resolve(self, height: int, width: int) -> None:
        if self._shape == (height, width):
            return
        self._shape = (height, width)
        self._masks = [
            sv.PolygonZone(to_pixels(m, width, height), triggering_anchors=ANCHOR) for m in self._camera.masks
        ]
        self._zones = [
            (
                name,
                sv.PolygonZone(to_pixels(z.coordinates, width, height), triggering_anchors=ANCHOR),
                set(z.objects) if z.objects is not None else None,
            )
            for name, z in self._camera.zones.items()
        ]

    def keep(self, detections: sv.Detections, height: int, width: int) -> sv.Detections:
        """The detections worth tracking: tracked labels, outside every mask, within their size limits."""
        if len(detections) == 0:
            return detections
        self._resolve(height, width)
        names = detections.data["class_name"]
        tracked = self._tracked
        keep = np.fromiter((n in tracked for n in names), bool, len(names))
        if self._also is not None:
            keep |= np.fromiter((self._also(str(n)) for n in names), bool, len(names))
        for mask in self._masks:
            keep &= ~mask.trigger(detections)
        frame_area = float(height * width)
        areas = detections.area
        for i in np.flatnonzero(keep):
            keep[i] = self._objects.filter_for(str(names[i])).area_ok(float(areas[i]), frame_area)
        if keep.all():  # nothing to drop: no copy (supervision's indexing costs tens of microseconds)
            return detections
        kept: sv.Detections = detections[keep]  # type: ignore[assignment]
        return kept

    def zones_of(self, detections: sv.Detections, height: int, width: int) -> list[list[str]]:
        """For each detection, the names of the zones it stands in (respecting each zone's labels)."""
        if not self._camera.zones or len(detections) == 0:
            return [[] for _ in range(len(detections))]
        self._resolve(height, width)
        names = detections.data["class_name"]
        inside = [(name, zone.trigger(detections), labels) for name, zone, labels in self._zones]
        return [
            [name for name, hits, labels in inside if hits[i] and (labels is None or names[i] in labels)]
            for i in range(len(detections))
        ]
