"""Masks, size filters and zones of one camera: where an object stands is its box's bottom centre."""

from __future__ import annotations

import numpy as np
import pytest
import supervision as sv

from monitor.settings import CameraSettings, FilterSettings, ObjectsSettings, ZoneSettings
from monitor.zones import Regions, to_pixels

HEIGHT, WIDTH = 100, 200
LEFT_HALF = [(2, 2), (100, 2), (100, 100), (2, 100)]  # pixels (a point at 0, 0 would read as fractions)


def detections(*rows: tuple[tuple[float, float, float, float], str]) -> sv.Detections:
    return sv.Detections(
        xyxy=np.array([box for box, _ in rows], dtype=np.float32).reshape(-1, 4),
        confidence=np.full(len(rows), 0.9, dtype=np.float32),
        class_id=np.zeros(len(rows), dtype=int),
        data={"class_name": np.array([label for _, label in rows], dtype=object)},
    )


def regions(objects: ObjectsSettings | None = None, **camera: object) -> Regions:
    return Regions(
        CameraSettings(url="cam.mp4", **camera), objects or ObjectsSettings(track=["person", "dog"])
    )


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([(0.5, 0.0), (1.0, 0.0), (1.0, 1.0)], [[100, 0], [200, 0], [200, 100]]),  # fractions
        ([(10, 20), (30, 20), (30, 40)], [[10, 20], [30, 20], [30, 40]]),  # pixels
        ([(1, 1), (2, 1), (2, 2)], [[1, 1], [2, 1], [2, 2]]),  # one value over 1: all pixels
    ],
)
def test_polygon_points_are_fractions_only_when_every_value_is_at_most_one(points, expected):
    assert to_pixels(points, WIDTH, HEIGHT).tolist() == expected


def test_an_object_is_in_a_zone_where_it_stands_not_where_its_box_reaches():
    zone = regions(zones={"left": ZoneSettings(coordinates=LEFT_HALF)})
    found = detections(
        ((20, 10, 60, 90), "person"),  # feet at x=40: inside
        ((80, 10, 160, 90), "person"),  # box overlaps the zone, feet at x=120: outside
    )
    assert zone.zones_of(found, HEIGHT, WIDTH) == [["left"], []]


def test_a_zone_with_objects_counts_only_those_labels():
    zone = regions(zones={"left": ZoneSettings(coordinates=LEFT_HALF, objects=["dog"])})
    found = detections(((20, 10, 60, 90), "person"), ((20, 10, 60, 90), "dog"))
    assert zone.zones_of(found, HEIGHT, WIDTH) == [[], ["left"]]


def test_zones_follow_the_frame_size_when_given_as_fractions():
    zone = regions(zones={"right": ZoneSettings(coordinates=[(0.5, 0), (1, 0), (1, 1), (0.5, 1)])})
    found = detections(((120, 10, 160, 90), "person"))
    assert zone.zones_of(found, HEIGHT, WIDTH) == [["right"]]
    assert zone.zones_of(found, 2 * HEIGHT, 4 * WIDTH) == [[]]  # the same box is left of 400 px now


def test_masks_untracked_labels_and_size_limits_drop_detections_before_tracking():
    objects = ObjectsSettings(
        track=["person", "dog"], filters={"dog": FilterSettings(min_area=0.1)}
    )  # dogs cover at least 10 % of the frame (2,000 px)
    keep = regions(objects, masks=[LEFT_HALF])
    found = detections(
        ((20, 10, 60, 90), "person"),  # stands in the mask
        ((120, 10, 160, 90), "person"),  # kept
        ((120, 10, 160, 90), "car"),  # not tracked
        ((120, 50, 140, 90), "dog"),  # 800 px: too small
        ((110, 10, 190, 90), "dog"),  # 6,400 px: kept
    )
    kept = keep.keep(found, HEIGHT, WIDTH)
    assert kept.xyxy.tolist() == [[120, 10, 160, 90], [110, 10, 190, 90]]
    assert list(kept.data["class_name"]) == ["person", "dog"]
