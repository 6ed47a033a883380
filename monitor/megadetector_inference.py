"""Files into MegaDetector entries: the detector on each image or video frame, the classifier on each box.

``Detects`` and ``Classifies`` are what a batch run needs of the models. A
file that cannot be read, or whose inference raises, gets a ``failure`` entry
instead of stopping the run (a ``MemoryError`` still stops it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import supervision as sv

from monitor.errors import DetectorError
from monitor.megadetector_format import (
    CONF_DIGITS,
    FAILURE_IMAGE_OPEN,
    FAILURE_INFER,
    FAILURE_VIDEO,
    Categories,
    MdDetection,
    MdImage,
    normalised_box,
    top_classes,
)
from monitor.predict import ImageError, Video, is_video, read_image

#: The most crops of one picture classified in one forward pass.
CROP_BATCH = 64


class Detects(Protocol):
    """What a batch run needs of the detector (``monitor.detector.Detector``)."""

    label: str
    names: dict[int, str]

    def detect(self, images: list[np.ndarray], conf: float | None = None) -> list[sv.Detections]: ...


class Classifies(Protocol):
    """What a batch run needs of the classifier (``monitor.classifier.Classifier``)."""

    label: str
    names: dict[int, str]
    imgsz: int

    def crops(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]: ...

    def probabilities(self, crops: Sequence[np.ndarray]) -> np.ndarray: ...


class Inference:
    """Turns files into entries: detection, and classification of each box when a classifier is given.

    Args:
        detector: The detector.
        classifier: The classifier, or None.
        conf: Detector confidence floor.
    """

    def __init__(self, detector: Detects, classifier: Classifies | None, conf: float) -> None:
        self.detector = detector
        self.classifier = classifier
        self.conf = conf
        self.detection_categories = Categories.from_names(detector.names, first=1, model="detector")
        self.classification_categories = (
            Categories.from_names(classifier.names, first=0, model="classifier")
            if classifier is not None
            else None
        )
        if self.classification_categories is not None:
            self._merge = self.classification_categories.merge_matrix()
            self._class_ids = list(self.classification_categories.names)

    def entry(self, path: Path, file: str, vid_stride: int) -> MdImage:
        """The entry of one image or video file; a file that cannot be used gets a failure entry."""
        return self.video(path, file, vid_stride) if is_video(path) else self.image(path, file)

    def image(self, path: Path, file: str) -> MdImage:
        """The entry of one image file."""
        try:
            picture = read_image(path)
        except ImageError as exc:
            return _failed(file, f"{FAILURE_IMAGE_OPEN}: {_reason(exc, path)}")
        try:
            detections = self.detections(picture)
        except MemoryError:
            raise
        except Exception as exc:  # whatever the model raises is this file's failure, counted
            return _failed(file, f"{FAILURE_INFER}: {type(exc).__name__}: {exc}")
        return MdImage(file=file, detections=detections)

    def video(self, path: Path, file: str, vid_stride: int) -> MdImage:
        """The entry of one video: every ``vid_stride``-th frame's detections, with their frame numbers."""
        frames: list[int] = []
        detections: list[MdDetection] = []
        try:
            with Video(path) as video:
                fps = video.fps
                for index, frame in video.frames(vid_stride):
                    detections.extend(self.detections(frame, frame_number=index))
                    frames.append(index)
        except ImageError as exc:
            return _failed(file, f"{FAILURE_VIDEO}: {_reason(exc, path)}", video=True)
        except MemoryError:
            raise
        except Exception as exc:  # as for images: a model error fails this video, counted
            return _failed(file, f"{FAILURE_VIDEO}: {FAILURE_INFER}: {type(exc).__name__}: {exc}", video=True)
        if not frames:
            return _failed(file, f"{FAILURE_VIDEO}: no frame could be decoded", video=True)
        if fps <= 0:
            return _failed(file, f"{FAILURE_VIDEO}: the container declares no frame rate", video=True)
        return MdImage(file=file, detections=detections, frame_rate=fps, frames_processed=frames)

    def detections(self, picture: np.ndarray, frame_number: int | None = None) -> list[MdDetection]:
        """One picture's detections, most confident first.

        Raises:
            DetectorError: The detector gave boxes without classes.
        """
        (found,) = self.detector.detect([picture], conf=self.conf)
        if len(found) and found.class_id is None:
            raise DetectorError("the detector returned boxes without class ids")
        height, width = picture.shape[:2]
        confidence = found.confidence if found.confidence is not None else np.ones(len(found))
        classes = found.class_id if found.class_id is not None else np.zeros(len(found), int)
        classified = self._classify(picture, found.xyxy) if self.classifier is not None else None
        out = [
            MdDetection(
                category=self.detection_categories.of_class[int(c)],
                conf=round(float(score), CONF_DIGITS),
                bbox=normalised_box(box, width, height),
                classifications=classified[i] if classified is not None else None,
                frame_number=frame_number,
            )
            for i, (box, score, c) in enumerate(zip(found.xyxy, confidence, classes, strict=True))
        ]
        return sorted(out, key=lambda d: -d.conf)

    def _classify(self, picture: np.ndarray, boxes: np.ndarray) -> list[list[tuple[str, float]]]:
        assert self.classifier is not None  # only called with one
        crops = self.classifier.crops(picture, boxes.tolist())
        if not crops:
            return []
        chunks = range(0, len(crops), CROP_BATCH)
        probs = np.concatenate([self.classifier.probabilities(crops[i : i + CROP_BATCH]) for i in chunks])
        if probs.shape[1] != self._merge.shape[0]:
            raise DetectorError(
                f"the classifier has {self._merge.shape[0]} classes but gave {probs.shape[1]} scores a crop"
            )
        return [top_classes(row, self._class_ids) for row in probs @ self._merge]


def _failed(file: str, failure: str, video: bool = False) -> MdImage:
    if video:  # as process_video writes a failed video: frame rate -1, no frames
        return MdImage(file=file, detections=None, failure=failure, frame_rate=-1.0, frames_processed=[])
    return MdImage(file=file, detections=None, failure=failure)


def _reason(exc: ImageError, path: Path) -> str:
    """The message of ``exc`` without the path it starts with (``file`` names the file already)."""
    return str(exc).removeprefix(f"{path}: ")
