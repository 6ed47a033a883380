"""A two-class classification data set built from real footage: people and pavement of the test clip.

``walker`` crops are the people the real test detector finds in ``vtest.mp4``;
``pavement`` crops are squares of the same frames that no person box
overlaps (ground, walls, benches). Both are cut with
``monitor.classifier.square_crop``, as the daemon cuts the crops it
classifies. Frames of the first 20 s make the train split, frames of the last
10 s the val split, so no person or patch of ground is in both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from monitor.classifier import MARGIN, square_crop
from monitor.detector import Detector
from monitor.settings import ModelSettings

CLASSES = ("pavement", "walker")
CROP_SIZE = 64  # the crop side and the classifier's imgsz
TRAIN_EPOCHS = 10  # top-1 1.0 on val; 5 epochs reach only about 0.7
DETECT_IMGSZ = 416
#: Boxes at least this confident are walkers (the fall detector is unsure of people at imgsz 416, most
#: score 0.2-0.6); any box above LOOSE_CONF keeps pavement squares away.
WALKER_CONF = 0.25
LOOSE_CONF = 0.05
#: Frames before TRAIN_END_S go to train, frames from VAL_START_S on to val; the gap between keeps
#: one pose of a walker out of both splits.
TRAIN_END_S = 18.0
VAL_START_S = 20.0
FRAME_STRIDE = 6  # every 6th frame (0.6 s at 10 fps): people have moved between two of them
MAX_PER_CLASS = {"train": 150, "val": 80}
#: Walkers' long sides in pixels: smaller boxes are too few pixels to call a person, larger ones
#: (250-300 px in this clip) hold groups, never one person.
MIN_WALKER_SIDE = 24
MAX_WALKER_SIDE = 160
PAVEMENT_TRIES = 300  # random squares tried per frame
NEAR_WALKER = 0.75  # share of pavement squares drawn near a walker rather than anywhere
LABELS = {"Normal": "person", "Fall": "person"}


@dataclass(frozen=True, slots=True)
class BuiltDataSet:
    """What ``build`` wrote: the folder and the crop count per split and class.

    Attributes:
        root: The data set folder (``train/<class>/*.png``, ``val/<class>/*.png``).
        counts: ``{split: {class: crops}}``.
    """

    root: Path
    counts: dict[str, dict[str, int]]


def clip_frames(clip: Path, stride: int = FRAME_STRIDE) -> Iterator[tuple[float, np.ndarray]]:
    """Every ``stride``-th frame of ``clip`` with its time in seconds."""
    capture = cv2.VideoCapture(str(clip))
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            if index % stride == 0:
                yield index / fps, frame
            index += 1
    finally:
        capture.release()


def crop_extent(box: np.ndarray | list[float], margin: float = MARGIN) -> tuple[float, float, float, float]:
    """The square (x1, y1, x2, y2) that ``square_crop`` cuts around ``box``."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    half = max(x2 - x1, y2 - y1, 1.0) * (1.0 + margin) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - half, cy - half, cx + half, cy + half


def pavement_boxes(
    shape: tuple[int, ...],
    people: np.ndarray,
    walkers: list[np.ndarray],
    rng: np.random.Generator,
    count: int,
) -> list[list[float]]:
    """Up to ``count`` square boxes whose crops lie inside the frame and touch no box in ``people``.

    Sides are the walkers' long sides, so both classes are cut at the same
    scales. Most squares are placed a little away from a walker, on the ground
    people walk on: drawn anywhere, they would nearly all be the lawn, and
    "grey ground" would then mean walker. Chosen squares do not overlap each other.
    """
    height, width = shape[:2]
    sides = [float(max(b[2] - b[0], b[3] - b[1])) for b in walkers] or [float(MIN_WALKER_SIDE * 2)]
    chosen: list[list[float]] = []
    taken = [crop_extent(box, margin=0.0) for box in people]
    for _ in range(PAVEMENT_TRIES):
        if len(chosen) >= count:
            break
        k = int(rng.integers(len(sides)))
        side = sides[k]
        if walkers and rng.random() < NEAR_WALKER:
            x1, y1, x2, y2 = (float(v) for v in walkers[k][:4])
            angle, distance = rng.uniform(0, 2 * np.pi), side * rng.uniform(1.2, 3.0)
            cx, cy = (x1 + x2) / 2 + distance * np.cos(angle), (y1 + y2) / 2 + distance * np.sin(angle)
        else:
            cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        ex1, ey1, ex2, ey2 = crop_extent(box)
        if ex1 < 0 or ey1 < 0 or ex2 > width or ey2 > height:
            continue
        if any(ex1 < bx2 and bx1 < ex2 and ey1 < by2 and by1 < ey2 for bx1, by1, bx2, by2 in taken):
            continue
        chosen.append(box)
        taken.append((ex1, ey1, ex2, ey2))
    return chosen


def build(root: Path, clip: Path, weights: Path, seed: int = 0) -> BuiltDataSet:
    """Write the walker/pavement data set under ``root``.

    Args:
        root: An empty or missing folder.
        clip: The test clip (``tests/data/vtest.mp4``).
        weights: The real test detector (both classes are people).
        seed: Seed of the pavement squares' places and sizes.

    Returns:
        The folder and its counts.
    """
    detector = Detector(
        ModelSettings(path=weights, imgsz=DETECT_IMGSZ, device="cpu", backend="torch", labels=LABELS), 8
    )
    rng = np.random.default_rng(seed)
    counts = {split: dict.fromkeys(CLASSES, 0) for split in MAX_PER_CLASS}
    for split in MAX_PER_CLASS:
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for seconds, frame in clip_frames(clip):
        split = "train" if seconds < TRAIN_END_S else "val" if seconds >= VAL_START_S else None
        if split is None:
            continue
        (found,) = detector.detect([frame], conf=LOOSE_CONF)
        assert found.confidence is not None
        walkers = [
            box
            for box, score in zip(found.xyxy, found.confidence, strict=True)
            if score >= WALKER_CONF
            and MIN_WALKER_SIDE <= max(box[2] - box[0], box[3] - box[1]) <= MAX_WALKER_SIDE
        ]
        boxes = {
            "walker": [list(map(float, b)) for b in walkers],
            "pavement": pavement_boxes(frame.shape, found.xyxy, walkers, rng, count=max(len(walkers), 4)),
        }
        for name, class_boxes in boxes.items():
            for box in class_boxes:
                if counts[split][name] >= MAX_PER_CLASS[split]:
                    break
                crop = square_crop(frame, box, CROP_SIZE)
                path = root / split / name / f"{seconds:05.1f}s-{counts[split][name]:03d}.png"
                assert cv2.imwrite(str(path), crop), path
                counts[split][name] += 1
    return BuiltDataSet(root, counts)
