"""Event snapshots: the best frame is the one kept, zones are drawn on it, the store stays bounded."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from monitor.alerts import Alert, AlertRules
from monitor.camera import CameraPipeline
from monitor.frames import Frame
from monitor.settings import FilterSettings, ObjectsSettings, Settings
from monitor.snapshots import ZONE_COLORS, SnapshotStore, encode_jpeg
from monitor.topics import Topics
from tests.conftest import TEST_LABELS

HEIGHT, WIDTH = 120, 160
BOX = [10.0, 10.0, 50.0, 90.0]
#: A pixel far from the box and its label: it shows which frame a snapshot was taken from.
PROBE = (100, 140)
#: Corners (fractions) of the zone drawn in the zone tests, away from BOX.
PORCH = [[0.6, 0.1], [0.95, 0.1], [0.95, 0.9], [0.6, 0.9]]


def person(score: float) -> sv.Detections:
    """One tracked person at BOX."""
    return sv.Detections(
        xyxy=np.array([BOX], dtype=np.float32),
        confidence=np.array([score], dtype=np.float32),
        class_id=np.array([0]),
        tracker_id=np.array([1]),
        data={"class_name": np.array(["person"], dtype=object)},
    )


def grey(level: int) -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), level, np.uint8)


def decode(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def keep(alerts: list[Alert], store: SnapshotStore) -> None:
    """What the daemon does with sent alerts: save each snapshot under its event id."""
    for alert in alerts:
        if alert.suppressed is None and alert.snapshot is not None:
            store.save(alert.event.event_id, alert.snapshot)


@pytest.mark.parametrize(
    ("times", "scores"),
    [
        # the peak comes within update_interval of the new, then the person is lost
        ([0.0, 0.2, 0.4, 0.6, 0.8], [0.6, 0.7, 0.9, 0.8, 0.65]),
        # the peak comes after an update, and the next update is due only when the score has fallen
        ([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0], [0.6, 0.62, 0.64, 0.66, 0.7, 0.9, 0.8, 0.7, 0.6]),
    ],
    ids=["peak-then-lost", "peak-between-updates"],
)
def test_kept_snapshot_is_the_frame_with_the_highest_score(tmp_path, times, scores):
    objects = ObjectsSettings(
        track=["person"],
        filters={"person": FilterSettings(min_score=0.4, threshold=0.5)},
        score_history=1,
        update_interval=2.0,
        max_disappeared=1.0,
    )
    rules = AlertRules("gate", objects, "m.pt@abc", Topics("p"))
    store = SnapshotStore(tmp_path, max_count=10)
    levels = [40 + 20 * i for i in range(len(times))]  # each frame its own shade of grey
    alerts = []
    for index, (t, score) in enumerate(zip(times, scores, strict=True)):
        alerts += rules.update(person(score), Frame("gate", index, t, grey(levels[index])))
    alerts += rules.expire(times[-1] + 10.0)
    keep(alerts, store)
    assert alerts[0].event.type == "new"
    assert alerts[-1].event.type == "end"
    (event_id,) = {a.event.event_id for a in alerts}
    kept = store.load(event_id)
    assert kept is not None
    best = levels[scores.index(max(scores))]
    shade = int(decode(kept)[PROBE].mean())
    assert min(levels, key=lambda level: abs(level - shade)) == best, (shade, levels)


def jpeg_of(level: int) -> bytes:
    return encode_jpeg(grey(level))


def test_store_keeps_the_newest_max_count_and_serves_them(tmp_path):
    store = SnapshotStore(tmp_path, max_count=2)
    ids = ["1.000000-aaaaaa", "2.000000-bbbbbb", "3.000000-cccccc"]
    pictures = [jpeg_of(level) for level in (50, 120, 200)]
    for event_id, jpeg in zip(ids, pictures, strict=True):
        store.save(event_id, jpeg)
    assert store.load(ids[0]) is None
    assert not (tmp_path / f"{ids[0]}.jpg").exists()
    assert store.load(ids[1]) == pictures[1]
    assert store.load(ids[2]) == pictures[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.jpg" for i in ids[1:]]
    # After a restart the bound still holds, oldest first.
    again = SnapshotStore(tmp_path, max_count=2)
    again.save("4.000000-dddddd", jpeg_of(90))
    assert again.load(ids[1]) is None
    assert again.load(ids[2]) == pictures[2]
    assert again.load("4.000000-dddddd") is not None


def test_store_never_touches_paths_that_are_not_event_ids(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots", max_count=2)
    assert store.load("../secret") is None
    with pytest.raises(ValueError, match="not an event id"):
        store.save("../../etc/passwd", jpeg_of(10))
    assert list((tmp_path / "snapshots").iterdir()) == []


def pipeline_snapshot(weights: Path, zones: dict) -> np.ndarray:
    """The `new` snapshot of a person at BOX through a camera's pipeline (tracker, zones, rules)."""
    settings = Settings(
        model={"path": weights, "device": "cpu", "labels": TEST_LABELS},
        objects={"track": ["person"], "filters": {"person": {"threshold": 0.5}}},
        cameras={"gate": {"url": "gate.mp4", "zones": zones}},
    )
    camera = CameraPipeline("gate", settings, "m.pt@abc", Topics("p"), None)
    found = sv.Detections(
        xyxy=np.array([BOX], dtype=np.float32),
        confidence=np.array([0.9], dtype=np.float32),
        class_id=np.array([0]),
        data={"class_name": np.array(["person"], dtype=object)},
    )
    for index in range(10):
        alerts = camera.process(found, Frame("gate", index, index * 0.2, grey(0))).alerts
        if alerts:
            (new,) = alerts
            assert new.event.type == "new"
            assert new.snapshot is not None
            return decode(new.snapshot)
    raise AssertionError("the person was never confirmed")


def edge_points(corners: np.ndarray, skip_top: bool) -> list[tuple[int, int]]:
    """(row, column) of points along the polygon's sides, every 5 pixels, corners excluded."""
    points = []
    sides = list(zip(corners, np.roll(corners, -1, axis=0), strict=True))
    for (x1, y1), (x2, y2) in sides[1:] if skip_top else sides:  # the top side carries the zone name
        for f in np.linspace(0.1, 0.9, 9):
            points.append((round(y1 + f * (y2 - y1)), round(x1 + f * (x2 - x1))))
    return points


def test_snapshot_draws_the_cameras_zones(weights):
    with_zone = pipeline_snapshot(weights, {"porch": {"coordinates": PORCH}})
    without = pipeline_snapshot(weights, {})
    corners = np.round(np.array(PORCH) * [WIDTH, HEIGHT]).astype(int)
    colour = np.array(ZONE_COLORS.by_idx(0).as_bgr(), dtype=float)
    along = edge_points(corners, skip_top=True)
    drawn = np.array([with_zone[p] for p in along], dtype=float)
    plain = np.array([without[p] for p in along], dtype=float)
    # Colour per point (JPEG blurs a 2-pixel line): nearer the zone's colour than black, with it only.
    assert (np.abs(drawn - colour).max(axis=1) < np.abs(drawn).max(axis=1)).all(), drawn
    assert (np.abs(plain).max(axis=1) < 20).all(), plain
    # The box and label are still there in both (same pixels inside the box's outline).
    assert np.abs(with_zone[10:90, 10:13].astype(int) - without[10:90, 10:13].astype(int)).max() < 30


EVENTS = [f"1700000000.{i:06d}-abcdef" for i in range(4)]
JPEG = b"\xff\xd8" + bytes(60_000)


def test_a_full_disk_neither_raises_nor_leaves_half_a_file_and_saving_resumes(small_disk, caplog):
    disk = small_disk(512)
    store = SnapshotStore(disk.path / "snapshots", max_count=10)
    assert store.save(EVENTS[0], JPEG)
    disk.fill()
    caplog.set_level(logging.DEBUG, logger="monitor.snapshots")
    assert not store.save(EVENTS[1], JPEG)
    assert not store.save(EVENTS[2], JPEG)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, "one error per burst of failures"
    assert "No space left on device" in errors[0].getMessage()
    assert store.problem is not None
    assert "No space left on device" in store.problem
    assert sorted(p.name for p in store.directory.iterdir()) == [f"{EVENTS[0]}.jpg"], "half a file left"
    assert store.load(EVENTS[0]) == JPEG  # what was saved is still served

    disk.free()
    caplog.clear()
    assert store.save(EVENTS[3], JPEG)
    assert store.problem is None
    assert store.load(EVENTS[3]) == JPEG
    assert any("saved again after 2 failure(s)" in r.getMessage() for r in caplog.records)


def test_a_snapshot_folder_that_cannot_be_made_is_reported_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = SnapshotStore(blocker / "snapshots", max_count=10)
    assert store.problem is not None
    assert "snapshots.path" in store.problem
    assert not store.save(EVENTS[0], JPEG)
    assert store.load(EVENTS[0]) is None
    assert [r.levelno for r in caplog.records if r.name == "monitor.snapshots"] == [logging.ERROR]
