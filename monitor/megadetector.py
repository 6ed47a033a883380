"""``monitor predict --format megadetector``: camera-trap results in the MegaDetector batch-output format.

The format (https://lila.science/megadetector-output-format, ``FORMAT_VERSION``
1.6, the one the ``megadetector`` package writes and its
``validate_batch_results`` checks) is what Timelapse, AddaxAI and the
package's postprocessing read. One ``images[]`` entry per file, ``file``
relative to the folder given (``base_folder``) with forward slashes:

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

Checkpoints: with ``every`` set, ``<output>.checkpoint.json`` is rewritten
every ``every`` files (a video counts as one), atomically (temp file, fsync,
``os.replace``), as ``{"info", "detection_categories", "checkpoint": [entries]}``
(MegaDetector's ``load_checkpoint`` reads it too). A run whose output has a
checkpoint beside it resumes from it, skipping the files it lists, if it was
written by the same weights and options; otherwise the run is refused. The
checkpoint is removed once the output is written, itself atomically.

Memory: each finished file is kept as its serialised JSON entry (a ``str``),
keyed by ``file``; that dictionary is also what tells a file already done, so
nothing else grows with the number of files, and a checkpoint or the output
is written from those strings without serialising anything again. A
checkpoint write costs the size of the results so far: for 100k files choose
``every`` in the thousands.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import supervision as sv
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from tqdm import tqdm

from monitor.errors import ConfigError, DetectorError, MonitorError
from monitor.predict import ImageError, Video, input_files, is_video, read_image
from monitor.settings import ModelSettings

logger = logging.getLogger(__name__)

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
#: MegaDetector's recommended thresholds for a detector it does not know (``run_detector``).
TYPICAL_THRESHOLD = 0.2
CONSERVATIVE_THRESHOLD = 0.1
#: The most crops of one picture classified in one forward pass.
CROP_BATCH = 64
#: Classifier input sizes accepted (as classifier.imgsz in the configuration).
MIN_CLASSIFIER_IMGSZ = 32
MAX_CLASSIFIER_IMGSZ = 1024
CHECKPOINT_SUFFIX = ".checkpoint.json"
#: The exit code of a run in which some file failed (its output is complete all the same).
EXIT_FAILURES = 1
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


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
class BatchOptions:
    """One ``monitor predict --format megadetector`` run.

    Attributes:
        paths: Folders, images and videos (``input_files`` lists them).
        output: The results file.
        conf: Detector confidence floor (the ``--conf`` flag).
        imgsz: Inference size (recorded in ``info``).
        vid_stride: Every ``vid_stride``-th video frame is read into the results.
        checkpoint_every: Files between checkpoints, or None for none.
        classifier: Classification weights for each box's crop, or None (``predict`` loads them).
        classifier_imgsz: The classifier's input size.

    Raises:
        ConfigError: A value out of range; the message names the flag.
    """

    paths: tuple[Path, ...]
    output: Path
    conf: float
    imgsz: int
    vid_stride: int = 1
    checkpoint_every: int | None = None
    classifier: Path | None = None
    classifier_imgsz: int = 224

    def __post_init__(self) -> None:
        problems = []
        if not self.paths:
            problems.append("paths: at least one folder, image or video is needed")
        if not 0.0 <= self.conf <= 1.0:
            problems.append(f"--conf: must be between 0 and 1, got {self.conf}")
        if self.vid_stride < 1:
            problems.append(f"--vid-stride: must be at least 1, got {self.vid_stride}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            problems.append(f"--checkpoint: must be at least 1 file, got {self.checkpoint_every}")
        if (
            not MIN_CLASSIFIER_IMGSZ <= self.classifier_imgsz <= MAX_CLASSIFIER_IMGSZ
            or self.classifier_imgsz % 32
        ):
            problems.append(
                f"--classifier-imgsz: must be a multiple of 32 from {MIN_CLASSIFIER_IMGSZ} to "
                f"{MAX_CLASSIFIER_IMGSZ}, got {self.classifier_imgsz}"
            )
        if self.output.is_dir():
            problems.append(f"--output: {self.output} is a folder; expected a file name such as results.json")
        if problems:
            raise ConfigError(problems)

    @property
    def checkpoint(self) -> Path:
        """The checkpoint file: ``<output>.checkpoint.json``."""
        return checkpoint_path(self.output)


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


def checkpoint_path(output: Path) -> Path:
    """Where the checkpoint of ``output`` lies: beside it, ``results.json.checkpoint.json``."""
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


def base_folder(paths: Sequence[Path]) -> Path:
    """The folder ``file`` names are relative to: the folder given, or the common folder of all paths.

    A folder counts as itself, a file as the folder holding it.

    Raises:
        ImageError: A path that does not exist (422).
    """
    folders = []
    for path in paths:
        if path.is_dir():
            folders.append(os.path.abspath(path))
        elif path.is_file():
            folders.append(os.path.dirname(os.path.abspath(path)))
        else:
            raise ImageError(422, f"{path}: no such file or folder")
    return Path(os.path.commonpath(folders))


def file_key(path: Path, base: Path) -> str:
    """``path`` relative to ``base``, with forward slashes (the format's ``file``)."""
    return Path(os.path.relpath(os.path.abspath(path), base)).as_posix()


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


def write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` to ``path`` through a temporary file beside it: readers see the old file or the new.

    Raises:
        MonitorError: The file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MonitorError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Checkpoint:
    """``<output>.checkpoint.json``: the entries done so far, to resume from.

    Args:
        path: The checkpoint file.
        every: Files between writes, or None to never write one (one found is still resumed).
    """

    def __init__(self, path: Path, every: int | None) -> None:
        self.path = path
        self.every = every
        self._since = 0

    def restore(self, header: Header, results: Results) -> int:
        """Add the checkpoint's entries to ``results``, if there is a checkpoint; how many.

        Raises:
            ConfigError: The checkpoint is unreadable, or was written with other weights,
                options or categories than ``header`` says (each difference is listed).
        """
        if not self.path.exists():
            return 0
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                [f"checkpoint {self.path}: unreadable ({exc}); delete it to start over"]
            ) from exc
        entries = data.get("checkpoint") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ConfigError([f"checkpoint {self.path}: no checkpoint list; delete it to start over"])
        differences = _differences(_identity(header.model_dump(mode="json")), _identity(data))
        if differences:
            raise ConfigError(
                [f"checkpoint {self.path} was written by another run: {d}" for d in differences]
                + ["use the same model and options to resume, or delete the checkpoint to start over"]
            )
        try:
            for item in entries:
                results.add(MdImage.model_validate(item))
        except (ValidationError, ValueError) as exc:
            raise ConfigError(
                [f"checkpoint {self.path}: invalid entry ({exc}); delete it to start over"]
            ) from exc
        return len(entries)

    def done(self, header: Header, results: Results) -> None:
        """Count one more file done; write the checkpoint when ``every`` were done since the last write."""
        if self.every is None:
            return
        self._since += 1
        if self._since >= self.every:
            write_atomic(self.path, document(header, "checkpoint", results.serialised()))
            self._since = 0

    def remove(self) -> None:
        """Delete the checkpoint (the output is complete)."""
        self.path.unlink(missing_ok=True)


def header_for(options: BatchOptions, inference: Inference) -> Header:
    """The file's header (without completion times) for a run of ``options``."""
    detector, classifier = inference.detector, inference.classifier
    settings = RunSettings(
        detector=detector.label,
        imgsz=options.imgsz,
        conf=options.conf,
        vid_stride=options.vid_stride,
        classifier=classifier.label if classifier is not None else None,
        classifier_imgsz=classifier.imgsz if classifier is not None else None,
    )
    metadata = DetectorMetadata(
        image_size=options.imgsz,
        # MegaDetector's defaults for an unknown detector; below --conf there is nothing to show.
        typical_detection_threshold=max(TYPICAL_THRESHOLD, options.conf),
        conservative_detection_threshold=max(CONSERVATIVE_THRESHOLD, options.conf),
    )
    info = MdInfo(
        detector=detector.label,
        detector_metadata=metadata,
        classifier=settings.classifier,
        monitor=settings,
    )
    classes = inference.classification_categories
    return Header(
        info=info,
        detection_categories=inference.detection_categories.names,
        classification_categories=classes.names if classes is not None else None,
    )


def predict(options: BatchOptions, model: ModelSettings) -> Summary:
    """Load the detector of ``model`` (and ``options.classifier``) and ``run``; paths are checked first.

    The classifier runs on the detector's device and backend choice.

    Raises:
        ImageError: A path that does not exist (before any model loads).
        DetectorError: The weights cannot be used.
        ConfigError, MonitorError: As ``run``.
    """
    from monitor.classifier import Classifier  # torch and Ultralytics load here
    from monitor.detector import Detector

    base_folder(options.paths)
    detector = Detector(model, max_batch=1)  # one picture per call
    classifier = None
    if options.classifier is not None:
        classifier = Classifier(options.classifier, options.classifier_imgsz, model.device, model.backend)
    return run(options, detector, classifier)


def run(options: BatchOptions, detector: Detects, classifier: Classifies | None = None) -> Summary:
    """Process ``options.paths`` into ``options.output``, resuming from its checkpoint if there is one.

    A progress bar (tqdm, on stderr when it is a terminal) counts the files still to do. An
    output already there without a checkpoint is replaced.

    Returns:
        The counts of what the output holds.

    Raises:
        ImageError: A path that does not exist.
        ConfigError: A checkpoint that cannot be resumed, or a blank class name.
        MonitorError: The output or the checkpoint cannot be written.
    """
    base = base_folder(options.paths)
    inference = Inference(detector, classifier, options.conf)
    header = header_for(options, inference)
    _check_writable(options.output)
    results = Results()
    checkpoint = Checkpoint(options.checkpoint, options.checkpoint_every)
    resumed = checkpoint.restore(header, results)
    if resumed:
        logger.info("resuming from %s: %d files already done", checkpoint.path, resumed)
    todo = sum(1 for path in input_files(list(options.paths)) if file_key(path, base) not in results)
    pending = _pending(options.paths, base, results)
    desc = f"megadetector ({resumed} resumed)" if resumed else "megadetector"
    for path, file in tqdm(pending, total=todo, unit="file", disable=None, desc=desc):
        entry = inference.entry(path, file, options.vid_stride)
        if entry.failure is not None:
            logger.warning("%s: %s", file, entry.failure)
        results.add(entry)
        checkpoint.done(header, results)
    write_atomic(options.output, document(header.completed(datetime.now()), "images", results.serialised()))
    checkpoint.remove()
    return results.summary(resumed, options.output)


def _pending(paths: Sequence[Path], base: Path, results: Results) -> Iterator[tuple[Path, str]]:
    """Files with no entry yet and their ``file`` names; checked as reached: a file given twice runs once."""
    for path in input_files(list(paths)):
        file = file_key(path, base)
        if file not in results:
            yield path, file


def _check_writable(output: Path) -> None:
    """Create the output's folder and try its temporary file, so a bad --output fails before any work."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MonitorError(f"--output {output}: cannot create its folder: {exc.strerror or exc}") from exc
    probe = output.with_name(output.name + ".tmp")
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise MonitorError(f"--output {output}: cannot write there: {exc.strerror or exc}") from exc


def _failed(file: str, failure: str, video: bool = False) -> MdImage:
    if video:  # as process_video writes a failed video: frame rate -1, no frames
        return MdImage(file=file, detections=None, failure=failure, frame_rate=-1.0, frames_processed=[])
    return MdImage(file=file, detections=None, failure=failure)


def _reason(exc: ImageError, path: Path) -> str:
    """The message of ``exc`` without the path it starts with (``file`` names the file already)."""
    return str(exc).removeprefix(f"{path}: ")


def _identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it: ``info.monitor`` and the categories."""
    info = data.get("info")
    monitor = info.get("monitor") if isinstance(info, dict) else None
    return {
        **(monitor if isinstance(monitor, dict) else {"monitor": monitor}),
        "detection_categories": data.get("detection_categories"),
        "classification_categories": data.get("classification_categories"),
    }


def _differences(run: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    return [
        f"{key} {saved.get(key)!r} there, {run.get(key)!r} here"
        for key in sorted(set(run) | set(saved))
        if run.get(key) != saved.get(key)
    ]
