"""``monitor predict --format megadetector``: camera-trap results in the MegaDetector batch-output format.

``predict`` loads the models and ``run`` processes ``BatchOptions``: every
file under the paths given becomes one ``images[]`` entry
(``monitor.megadetector_inference``), ``file`` relative to ``base_folder``,
and the entries with their header are written as one format 1.6 file
(``monitor.megadetector_format``), resuming from a checkpoint beside the
output and rewriting it as asked (``monitor.megadetector_checkpoint``). The
names tests and callers use are importable from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from monitor.errors import ConfigError, MonitorError
from monitor.megadetector_checkpoint import Checkpoint, write_atomic
from monitor.megadetector_checkpoint import checkpoint_path as checkpoint_path
from monitor.megadetector_format import FORMAT_VERSION as FORMAT_VERSION
from monitor.megadetector_format import Categories as Categories
from monitor.megadetector_format import DetectorMetadata, Header, MdInfo, Results, RunSettings, document
from monitor.megadetector_format import Summary as Summary
from monitor.megadetector_format import normalised_box as normalised_box
from monitor.megadetector_format import top_classes as top_classes
from monitor.megadetector_inference import Classifies as Classifies
from monitor.megadetector_inference import Detects as Detects
from monitor.megadetector_inference import Inference
from monitor.predict import ImageError, input_files
from monitor.settings import ModelSettings

logger = logging.getLogger(__name__)

#: MegaDetector's recommended thresholds for a detector it does not know (``run_detector``).
TYPICAL_THRESHOLD = 0.2
CONSERVATIVE_THRESHOLD = 0.1
#: Classifier input sizes accepted (as classifier.imgsz in the configuration).
MIN_CLASSIFIER_IMGSZ = 32
MAX_CLASSIFIER_IMGSZ = 1024
#: The exit code of a run in which some file failed (its output is complete all the same).
EXIT_FAILURES = 1


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
