"""The MegaDetector batch-output format, version 1.6: the records of a results file, and its JSON text.

The format (https://lila.science/megadetector-output-format, ``FORMAT_VERSION``
1.6, the one the ``megadetector`` package writes and its
``validate_batch_results`` checks) is what Timelapse, AddaxAI and the
package's postprocessing read. One ``images[]`` entry per file, ``file``
relative to the folder given (``monitor.megadetector.base_folder``) with
forward slashes:

- an image: ``detections`` with ``category`` (a string id of
  ``detection_categories``), ``conf`` and ``bbox`` ``[x_min, y_min, width,
  height]`` relative to the picture's size (upright, EXIF orientation applied),
  plus ``classifications`` ``[[id, score], ...]`` when a classifier ran;
- a video, as MegaDetector's ``process_video`` writes it: ``frame_rate``,
  ``frames_processed`` (the frame numbers read, every ``vid_stride``-th) and
  the detections of all those frames in one list, each with its
  ``frame_number``;
- a file that cannot be used: ``failure`` (a string starting with
  MegaDetector's ``image access failure``, ``inference failure`` or ``Failure
  processing video``) and ``detections: null``; a failed video has
  ``frame_rate`` -1 and no frames, as MegaDetector writes it.

Detection categories are the detector's class names after ``--label``
renames, ids from "1" (MegaDetector keeps "0" for "empty"); names that are the
same share one id. Classification categories are the classifier's names,
ids from "0", merged the same way (their probabilities summed).

Memory: each finished file is kept (``Results``) as its serialised JSON entry
(a ``str``), keyed by ``file``; that dictionary is also what tells a file
already done, so nothing else grows with the number of files, and a checkpoint
or the output is written from those strings without serialising anything
again (``document``). A checkpoint write costs the size of the results so far:
for 100k files choose ``every`` in the thousands.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from monitor.errors import ConfigError, DetectorError

#: The format version written: the current one (``megadetector`` 10's ``current_format_version``).
FORMAT_VERSION = "1.6"
#: MegaDetector's failure strings (``run_detector.FAILURE_*``, ``process_video``); ours add ": reason".
FAILURE_IMAGE_OPEN = "image access failure"
FAILURE_INFER = "inference failure"
FAILURE_VIDEO = "Failure processing video"
#: Digits kept, as MegaDetector rounds (``run_detector.COORD_DIGITS``, ``CONF_DIGITS``).
COORD_DIGITS = 4
CONF_DIGITS = 3
#: Classifications kept per detection: the top class, and up to TOP_CLASSES with at least MIN_CLASS_SCORE.
TOP_CLASSES = 5
MIN_CLASS_SCORE = 0.01
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class _Model(BaseModel):
    """A frozen part of the file; fields that are None are left out, except those in KEEP_NULL."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEEP_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.KEEP_NULL}


class MdDetection(_Model):
    """One box: ``bbox`` is x_min, y_min, width, height relative to the picture (0..1)."""

    category: str
    conf: float = Field(ge=0.0, le=1.0)
    bbox: tuple[float, float, float, float]
    classifications: list[tuple[str, float]] | None = Field(
        None, description="[category id, score], highest first; only when a classifier ran."
    )
    frame_number: int | None = Field(None, ge=0, description="Videos only.")


class MdImage(_Model):
    """One ``images[]`` entry: an image, or a video with ``frame_rate`` and ``frames_processed``."""

    KEEP_NULL: ClassVar[frozenset[str]] = frozenset({"detections"})

    file: str = Field(min_length=1)
    detections: list[MdDetection] | None
    failure: str | None = None
    frame_rate: float | None = None
    frames_processed: list[int] | None = None

    @model_validator(mode="after")
    def _failure_or_detections(self) -> MdImage:
        if (self.failure is None) == (self.detections is None):
            raise ValueError(f"{self.file}: expected either detections or a failure, not both or neither")
        return self

    @property
    def video(self) -> bool:
        """Whether this entry is a video's."""
        return self.frames_processed is not None


class DetectorMetadata(_Model):
    """``info.detector_metadata``: defaults that Timelapse offers for thresholds."""

    megadetector_version: str = "unknown"
    image_size: int
    typical_detection_threshold: float
    conservative_detection_threshold: float


class RunSettings(_Model):
    """``info.monitor``: what produced the entries; a checkpoint resumes only under the same."""

    detector: str = Field(description="Weights file name @ sha256 prefix.")
    imgsz: int
    conf: float
    vid_stride: int
    classifier: str | None = None
    classifier_imgsz: int | None = None


class MdInfo(_Model):
    """The file's ``info``."""

    format_version: str = FORMAT_VERSION
    detector: str
    detection_completion_time: str | None = None
    detector_metadata: DetectorMetadata
    classifier: str | None = None
    classification_completion_time: str | None = None
    monitor: RunSettings


class Header(_Model):
    """Everything in the file but ``images``."""

    info: MdInfo
    detection_categories: dict[str, str]
    classification_categories: dict[str, str] | None = None

    def completed(self, when: datetime) -> Header:
        """This header with the completion times set to ``when``."""
        stamp = when.strftime(TIME_FORMAT)
        info = self.info.model_copy(
            update={
                "detection_completion_time": stamp,
                "classification_completion_time": stamp if self.info.classifier else None,
            }
        )
        return self.model_copy(update={"info": info})


@dataclass(frozen=True, slots=True)
class Categories:
    """A model's classes as the format's categories: string ids, one id per distinct name.

    Attributes:
        names: ``{id: name}`` as the file lists them; ids count up from the first in class order.
        of_class: ``{class index: id}``.
    """

    names: dict[str, str]
    of_class: dict[int, str]

    @classmethod
    def from_names(cls, names: Mapping[int, str], first: int, model: str) -> Categories:
        """Categories for ``names`` (``{class index: name}``), ids from ``first``.

        Raises:
            ConfigError: A blank name (format 1.6 refuses them); the message names ``model``.
        """
        blank = sorted(i for i, name in names.items() if not name.strip())
        if blank:
            raise ConfigError([f"{model}: class {blank[0]} has a blank name; the format needs one"])
        id_of: dict[str, str] = {}
        for index in sorted(names):
            id_of.setdefault(names[index], str(first + len(id_of)))
        return cls({i: name for name, i in id_of.items()}, {index: id_of[names[index]] for index in names})

    def merge_matrix(self) -> np.ndarray:
        """``(classes, categories)`` ones and zeros: class probabilities times it sum those sharing a name.

        Raises:
            DetectorError: Class indices are not 0..n-1 (probability columns need them so).
        """
        if sorted(self.of_class) != list(range(len(self.of_class))):
            raise DetectorError(f"expected classes 0..{len(self.of_class) - 1}, got {sorted(self.of_class)}")
        column = {cid: k for k, cid in enumerate(self.names)}
        matrix = np.zeros((len(self.of_class), len(column)), np.float32)
        for index, cid in self.of_class.items():
            matrix[index, column[cid]] = 1.0
        return matrix


@dataclass(frozen=True, slots=True)
class Summary:
    """What a run wrote: entries by kind, counted over the whole output (resumed ones included).

    Attributes:
        images: Images with results.
        videos: Videos with results.
        frames: Video frames read into results.
        failures: Files with a ``failure`` entry instead.
        resumed: Entries taken from a checkpoint rather than processed by this run.
        output: The results file.
    """

    images: int
    videos: int
    frames: int
    failures: int
    resumed: int
    output: Path

    def line(self) -> str:
        """One ``key=value`` line for stderr."""
        return (
            f"megadetector: images={self.images} videos={self.videos} frames={self.frames} "
            f"failures={self.failures} resumed={self.resumed} output={self.output}"
        )


def normalised_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """x1, y1, x2, y2 in pixels as the format's x_min, y_min, width, height relative to the picture."""
    x1, x2 = (min(max(float(v), 0.0), float(width)) for v in (box[0], box[2]))
    y1, y2 = (min(max(float(v), 0.0), float(height)) for v in (box[1], box[3]))
    return (
        round(x1 / width, COORD_DIGITS),
        round(y1 / height, COORD_DIGITS),
        round((x2 - x1) / width, COORD_DIGITS),
        round((y2 - y1) / height, COORD_DIGITS),
    )


def top_classes(scores: np.ndarray, ids: Sequence[str]) -> list[tuple[str, float]]:
    """The best class, then up to ``TOP_CLASSES`` in all scoring at least ``MIN_CLASS_SCORE``, best first."""
    order = np.argsort(-scores, kind="stable")[:TOP_CLASSES]
    kept = [int(k) for n, k in enumerate(order) if n == 0 or scores[k] >= MIN_CLASS_SCORE]
    return [(ids[k], round(float(scores[k]), CONF_DIGITS)) for k in kept]


class Results:
    """The entries so far, serialised, one per ``file`` in the order done, with counts by kind."""

    def __init__(self) -> None:
        self._entries: dict[str, str] = {}
        self.images = 0
        self.videos = 0
        self.frames = 0
        self.failures = 0

    def __contains__(self, file: object) -> bool:
        return file in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: MdImage) -> None:
        """Keep ``entry``, serialised.

        Raises:
            ValueError: An entry for the same file is already there.
        """
        if entry.file in self._entries:
            raise ValueError(f"{entry.file}: already has an entry")
        self._entries[entry.file] = entry.model_dump_json()
        if entry.failure is not None:
            self.failures += 1
        elif entry.video:
            self.videos += 1
            self.frames += len(entry.frames_processed or ())
        else:
            self.images += 1

    def serialised(self) -> Iterable[str]:
        """The entries as JSON objects, in the order added."""
        return self._entries.values()

    def summary(self, resumed: int, output: Path) -> Summary:
        """The counts, as a ``Summary``."""
        return Summary(self.images, self.videos, self.frames, self.failures, resumed, output)


def document(header: Header, key: str, entries: Iterable[str]) -> Iterator[str]:
    """The JSON text of ``header`` with ``key`` holding ``entries`` (JSON objects), in pieces."""
    head = header.model_dump_json(indent=1)
    yield head[: head.rindex("}")].rstrip()  # the header object, still open
    yield f',\n "{key}": [\n'
    for n, entry in enumerate(entries):
        yield ("  " if n == 0 else ",\n  ") + entry
    yield "\n ]\n}\n"
