"""The bench's null runtime: detections recorded from a real run of the model, replayed per camera.

``monitor bench --runtime null --replay-detections CLIP`` first runs the real
model over ``CLIP`` (sampled at the bench's detect fps, batched) and keeps
each frame's detections with their boxes as fractions of the frame. During
the measured window ``ReplayedDetector`` stands in for the model: each camera
gets the recorded frames in order (its own cursor, looping), scaled to its
frame size, at no inference cost. Tracking, zones and alert rules then see
real people walking and cost what they really cost; the bench measures
everything but the network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import supervision as sv

from monitor.detections import trusted
from monitor.detector import BatchTimings, Detected, Detector
from monitor.errors import SourceError
from monitor.letterbox import BatchBuffer, Letterboxed, Placement, put


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One frame's detections, boxes as fractions of the frame (x1, y1, x2, y2)."""

    boxes: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    class_name: np.ndarray


def record_detections(detector: Detector, clip: Path, fps: float, batch: int) -> list[RecordedFrame]:
    """Run ``detector`` over ``clip`` at ``fps`` frames per second of video; each frame's detections.

    Raises:
        SourceError: The clip has no frame that can be decoded.
    """
    info = sv.VideoInfo.from_video_path(str(clip))
    stride = max(1, round((info.fps or fps) / fps))
    recorded: list[RecordedFrame] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        for image, found in zip(pending, detector.detect(pending), strict=True):
            height, width = image.shape[:2]
            names = found.data.get("class_name", np.array([""] * len(found)))
            recorded.append(
                RecordedFrame(
                    found.xyxy / np.array([width, height, width, height], dtype=np.float32),
                    found.confidence if found.confidence is not None else np.ones(len(found), np.float32),
                    found.class_id if found.class_id is not None else np.zeros(len(found), int),
                    np.asarray(names),
                )
            )
        pending.clear()

    for image in sv.get_video_frames_generator(str(clip), stride=stride):
        pending.append(image)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    if not recorded:
        raise SourceError(f"{clip}: no frame could be decoded to record detections from")
    return recorded


class ReplayedDetector:
    """Stands in for ``Detector`` in the pipeline step: recorded detections, per camera, no inference."""

    runtime = "null"

    def __init__(self, recorded: Sequence[RecordedFrame]) -> None:
        if not recorded:
            raise ValueError("recorded: need at least one frame of detections")
        self._recorded = list(recorded)
        self._cursor: dict[str | None, int] = {}
        self._batch = BatchBuffer()
        self._floors: dict[tuple[int, float | None], RecordedFrame] = {}

    def _kept(self, at: int, conf: float | None) -> RecordedFrame:
        """Recorded frame ``at``'s detections scoring ``conf`` or more (worked out once per floor)."""
        kept = self._floors.get((at, conf))
        if kept is None:
            frame = self._recorded[at]
            keep = frame.confidence >= conf if conf is not None else slice(None)
            kept = RecordedFrame(
                frame.boxes[keep], frame.confidence[keep], frame.class_id[keep], frame.class_name[keep]
            )
            self._floors[(at, conf)] = kept
        return kept

    def detect_timed(
        self,
        images: list[np.ndarray],
        conf: float | None = None,
        keys: Sequence[str | None] | None = None,
        prepared: Sequence[Letterboxed | None] | None = None,
    ) -> Detected:
        """Each image's next recorded detections (its camera's, by ``keys``), scaled to its size.

        The frames' letterboxes are packed into one uint8 batch kept from call to call,
        as the detector's preprocessing does before the network (on CUDA, into its pinned
        staging buffers): only the network is left out.
        """
        started = time.perf_counter()
        boxes = [b for b in prepared or () if b is not None]
        if boxes:
            height = max(b.placement.input_height for b in boxes)
            width = max(b.placement.input_width for b in boxes)
            batch = self._batch.take(len(boxes), height, width)
            for row, box in zip(batch, boxes, strict=True):
                if box.image.shape == row.shape:  # the usual case: every box of the batch one shape
                    np.copyto(row, box.image)
                else:
                    h, w = box.image.shape[:2]
                    put(row, box.image, Placement(0, 0, w, h, w, h))
        packed = time.perf_counter()
        keys = keys if keys is not None else [None] * len(images)
        found = []
        for image, key in zip(images, keys, strict=True):
            at = self._cursor.get(key, 0)
            self._cursor[key] = (at + 1) % len(self._recorded)
            frame = self._kept(at, conf)
            height, width = image.shape[:2]
            scale = np.array([width, height, width, height], dtype=np.float32)
            found.append(trusted(frame.boxes * scale, frame.confidence, frame.class_id, frame.class_name))
        return Detected(found, BatchTimings(packed - started, 0.0, time.perf_counter() - packed))
