"""Annotated pictures: zones, boxes and labels drawn with supervision, encoded as JPEG.

Used for event snapshots (MQTT, and the bounded on-disk store behind
``/api/events/{event_id}/snapshot.jpg``) and for ``/predict_image`` and
``monitor predict --save``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import supervision as sv

logger = logging.getLogger(__name__)

JPEG_QUALITY = 85
#: What event ids look like (``alerts``: ``f"{start_time:.6f}-{token_hex(3)}"``, at most 12
#: digits of seconds); anything else never touches the disk (nor makes a file name too long).
EVENT_ID = re.compile(r"[0-9]{1,12}\.[0-9]{6}-[0-9a-f]{6}")
#: Zone outlines, by the zone's position in the camera's config; none of them is the box colour of
#: class 0 (``sv.ColorPalette.DEFAULT``), which every event snapshot uses.
ZONE_COLORS = sv.ColorPalette.from_hex(["#ffff00", "#00ffff", "#ff8000", "#00ff00", "#ff00ff", "#ffffff"])
ZONE_THICKNESS = 2


class Annotator:
    """Draws detections (and zones) on a copy of a frame. One per thread (annotators keep state)."""

    def __init__(self) -> None:
        self._boxes = sv.BoxAnnotator(thickness=2)
        self._labels = sv.LabelAnnotator(text_scale=0.5, text_padding=4)

    def draw(
        self,
        image: np.ndarray,
        detections: sv.Detections,
        labels: list[str],
        zones: Sequence[tuple[str, np.ndarray]] = (),
    ) -> np.ndarray:
        """A copy of ``image`` (HxWx3 BGR) with each zone, then each detection's box and label.

        Args:
            image: The frame.
            detections: Boxes in frame pixels.
            labels: One text per detection.
            zones: ``(name, corners)`` with corners Nx2 in frame pixels; outlined and named
                under the boxes, coloured by position (``ZONE_COLORS``).
        """
        scene = image.copy()
        for index, (name, corners) in enumerate(zones):
            color = ZONE_COLORS.by_idx(index)
            polygon = corners.astype(np.int64)
            scene = sv.draw_polygon(scene, polygon, color, ZONE_THICKNESS)
            x1, y1 = polygon.min(axis=0)
            x2 = polygon[:, 0].max()
            anchor = sv.Point(x=int(x1 + x2) // 2, y=int(y1) + ZONE_THICKNESS + 8)
            scene = sv.draw_text(scene, name, anchor, text_scale=0.4, text_padding=2, background_color=color)
        scene = self._boxes.annotate(scene, detections)
        return self._labels.annotate(scene, detections, labels=labels)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a BGR image.

    Raises:
        ValueError: OpenCV could not encode it.
    """
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode a {image.shape} image as JPEG")
    return bytes(data.tobytes())


def labels_of(detections: sv.Detections) -> list[str]:
    """``"label 0.87"`` for each detection (class name from ``data["class_name"]``)."""
    names = detections.data.get("class_name", [])
    scores = detections.confidence if detections.confidence is not None else [None] * len(detections)
    return [f"{n} {s:.2f}" if s is not None else str(n) for n, s in zip(names, scores, strict=True)]


class SnapshotStore:
    """The latest snapshot of each event on disk, at most ``max_count`` files (oldest go first).

    The store is a convenience behind the HTTP API, never on the alert path: a
    disk that is full, read-only or out of descriptors makes ``save`` return
    False (the event is still published, its MQTT snapshot too), logged once per
    burst of failures and once when saving works again; ``problem`` says why
    meanwhile. A folder that cannot be created or listed at start is the same.

    Args:
        directory: Where ``<event_id>.jpg`` files live; created if missing.
        max_count: Most files kept.
    """

    def __init__(self, directory: Path, max_count: int) -> None:
        self.directory = directory
        self.max_count = max_count
        self._lock = threading.Lock()
        self._order: OrderedDict[str, None] = OrderedDict()
        #: Why the last save failed, while saves fail; None once one succeeds.
        self.problem: str | None = None
        self._failures = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._order.update((stem, None) for stem in _oldest_first(directory))
        except OSError as exc:
            self._failed(f"snapshots.path {str(directory)!r} cannot be used: {_reason(exc)}")

    def save(self, event_id: str, jpeg: bytes) -> bool:
        """Store (or replace) an event's snapshot, then drop the oldest beyond ``max_count``.

        Returns:
            False when the disk refused it (logged; see ``problem``).

        Raises:
            ValueError: ``event_id`` is not an event id.
        """
        path = self._path(event_id)
        temporary = path.with_suffix(".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # gone, or never made at start
            temporary.write_bytes(jpeg)
            temporary.replace(path)  # readers never see half a file
        except OSError as exc:
            with contextlib.suppress(OSError):  # half a JPEG would keep the disk full
                temporary.unlink(missing_ok=True)
            self._failed(f"cannot save the snapshot of {event_id} in {str(self.directory)!r}: {_reason(exc)}")
            return False
        with self._lock:
            self._order[event_id] = None
            self._order.move_to_end(event_id)
            while len(self._order) > self.max_count:
                oldest, _ = self._order.popitem(last=False)
                try:
                    self._path(oldest).unlink(missing_ok=True)
                except OSError as exc:  # left behind; the count stays bounded all the same
                    logger.warning("cannot delete the old snapshot %s: %s", oldest, _reason(exc))
            failures, self._failures = self._failures, 0
            self.problem = None
        if failures:
            logger.warning("event snapshots are saved again after %d failure(s)", failures)
        return True

    def load(self, event_id: str) -> bytes | None:
        """An event's snapshot, or None (also when it cannot be read)."""
        try:
            return self._path(event_id).read_bytes()
        except (OSError, ValueError):
            return None

    def _failed(self, problem: str) -> None:
        """Log the first failure of a burst as an error, the rest at debug level."""
        with self._lock:
            first = self._failures == 0
            self._failures += 1
            self.problem = problem
        if first:
            logger.error(
                "%s; events are still published (with their MQTT snapshot), further failures are "
                "counted in monitor_snapshot_save_failures_total",
                problem,
            )
        else:
            logger.debug("%s", problem)

    def _path(self, event_id: str) -> Path:
        if not EVENT_ID.fullmatch(event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        return self.directory / f"{event_id}.jpg"


def _oldest_first(directory: Path) -> list[str]:
    """Stems of the ``*.jpg`` files in ``directory``, oldest first (files gone meanwhile skipped)."""
    found = []
    for path in directory.glob("*.jpg"):
        with contextlib.suppress(FileNotFoundError):
            found.append((path.stat().st_mtime, path.stem))
    return [stem for _, stem in sorted(found)]


def _reason(exc: OSError) -> str:
    """``[Errno 28] No space left on device``, without the file name (the message has it)."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)
