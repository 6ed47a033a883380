"""Fine-tuning and validating classification models (the species classifier) on a folder of class folders.

``monitor train --task classify`` and ``monitor val --task classify``: the
same Ultralytics calls as detection (``YOLO(...).train`` and ``.val``), on a
data set laid out as Ultralytics' classification data sets are::

    DATA/train/<class>/*.jpg
    DATA/val/<class>/*.jpg      (or valid/, validation/)
    DATA/test/<class>/*.jpg     (optional)

The folder is checked before Ultralytics sees it, so a bad one fails with
one message naming what is wrong instead of a warning deep in a run:
at least two classes, the same class folders in every split, no empty class
folder, every image readable. A folder of class folders without splits is
refused rather than split: Ultralytics would split it at random into a
``DATA_split`` copy beside it, and frames of one animal's visit on both sides
of a random split make val accuracy say nothing about new visits. Split by
time or by camera instead.

``infer_task`` tells the commands which task a ``--data`` is for (a folder:
classify; a YAML: detect) and refuses a ``--task`` that contradicts it.
Nothing is downloaded: ``monitor.training.load_model`` refuses a missing
``.pt`` before Ultralytics would fetch it by name.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.model_reports import ClassifyValReport, ClassifyValRow, ModelCard, model_card_path
from monitor.runtime import resolve_device, sha256_of
from monitor.training import (
    ARCHITECTURE_SUFFIXES,
    TASKS,
    TaskMismatchError,
    TrainingError,
    check_imgsz,
    check_positive,
    keep_torch_threads,
    load_model,
    ultralytics_device,
)

if TYPE_CHECKING:
    from monitor.training import Task

logger = logging.getLogger(__name__)

#: The layout a classification data set must have, as error messages name it.
CLASSIFY_LAYOUT = "DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg (optionally DATA/test/<class>/)"
#: The val split's folder names Ultralytics accepts, in the order it looks for them.
VAL_NAMES = ("val", "validation", "valid")
MIN_CLASSES = 2
MIN_SIDE = 10  # px: Ultralytics drops smaller images as corrupt
_LISTED = 5  # unreadable images named in a message; the rest are counted
_CHECK_THREADS = 8


def infer_task(data: Path, task: Task | None = None) -> Task:
    """The task a data set is for: a YAML (or any file) is ``detect``, a folder ``classify``.

    Args:
        data: The data set: a detection YAML or a classification folder (that may not exist yet).
        task: The task asked for, or None to infer it.

    Returns:
        ``task`` when given and consistent with ``data``, else the inferred task.

    Raises:
        TaskMismatchError: ``task`` is given and ``data`` is the other kind.
        TrainingError: ``task`` is None and ``data`` does not exist, so nothing tells.
    """
    if data.is_dir():
        kind: Task | None = "classify"
    elif data.is_file() or data.suffix.lower() in ARCHITECTURE_SUFFIXES:
        kind = "detect"
    else:
        kind = None
    if task is None:
        if kind is None:
            raise TrainingError(
                f"data set {str(data)!r} does not exist (detection: a data set YAML; "
                f"classification: a folder laid out as {CLASSIFY_LAYOUT})"
            )
        return kind
    if task not in TASKS:
        raise TrainingError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if kind is not None and kind != task:
        if task == "classify":
            raise TaskMismatchError(
                f"task 'classify' needs a folder laid out as {CLASSIFY_LAYOUT}, "
                f"but {str(data)!r} is a file (a detection data set YAML?)"
            )
        raise TaskMismatchError(
            f"task 'detect' needs a data set YAML, but {str(data)!r} is a folder "
            "(a classification data set? use task 'classify')"
        )
    return task


@dataclass(frozen=True, slots=True)
class ClassifyData:
    """A checked classification data set.

    Attributes:
        root: The data set folder.
        splits: ``{"train": folder, "val": folder}`` and ``"test"`` when there is one.
        classes: Class names in class-id order (sorted, as Ultralytics numbers them).
        counts: Images per split and class: ``{split: {class: n}}``.
        images: Every image of every split, sorted.
    """

    root: Path
    splits: dict[str, Path]
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    images: tuple[Path, ...]


def check_classify_data(data: Path) -> ClassifyData:
    """Check a classification data set folder and list its images.

    Args:
        data: The folder (``train/<class>/``, ``val/<class>/``, optionally ``test/<class>/``).

    Returns:
        The splits, classes, per-class counts and images.

    Raises:
        TrainingError: The folder is missing or is a file, lacks a train or val split,
            has fewer than two classes, splits with different classes, an empty class
            folder, or an unreadable image.
    """
    from ultralytics.data.utils import IMG_FORMATS

    if not data.exists():
        raise TrainingError(f"classification data folder {str(data)!r} does not exist")
    if not data.is_dir():
        raise TrainingError(
            f"classification data {str(data)!r} is a file; expected a folder: {CLASSIFY_LAYOUT}"
        )
    splits = {"train": data / "train"}
    val = next((data / name for name in VAL_NAMES if (data / name).is_dir()), None)
    if not splits["train"].is_dir() or val is None:
        raise TrainingError(_missing_split_message(data, train=splits["train"].is_dir()))
    splits["val"] = val
    if (data / "test").is_dir():
        splits["test"] = data / "test"

    def images_of(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix[1:].lower() in IMG_FORMATS)

    classes = tuple(sorted(p.name for p in splits["train"].iterdir() if p.is_dir()))
    if len(classes) < MIN_CLASSES:
        found = f"only {classes[0]!r}" if classes else "none"
        raise TrainingError(
            f"classification data {str(data)!r}: train/ needs at least {MIN_CLASSES} class folders, "
            f"found {found}; expected {CLASSIFY_LAYOUT}"
        )
    counts: dict[str, dict[str, int]] = {}
    images: list[Path] = []
    problems: list[str] = []
    for split, folder in splits.items():
        names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        if names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            what = [f"lacks {', '.join(missing)}"] if missing else []
            what += [f"has {', '.join(extra)}, which train/ lacks"] if extra else []
            problems.append(f"{folder.name}/ {' and '.join(what)}")
            continue
        counts[split] = {}
        for name in classes:
            found_images = images_of(folder / name)
            counts[split][name] = len(found_images)
            images += found_images
            if not found_images:
                problems.append(f"{folder.name}/{name}/ holds no images")
    if problems:
        raise TrainingError(
            f"classification data {str(data)!r}: {'; '.join(problems)}; every split needs the same "
            f"class folders, each with images: {CLASSIFY_LAYOUT}"
        )
    _check_readable(data, images)
    return ClassifyData(data, splits, classes, counts, tuple(sorted(images)))


def _missing_split_message(data: Path, train: bool) -> str:
    if train:
        return f"classification data {str(data)!r} has train/ but no val/ split; expected {CLASSIFY_LAYOUT}"
    subfolders = sorted(p.name for p in data.iterdir() if p.is_dir())
    if subfolders:
        return (
            f"classification data {str(data)!r} has class folders ({', '.join(subfolders[:8])}"
            f"{', ...' if len(subfolders) > 8 else ''}) but no train/ and val/ splits; expected "
            f"{CLASSIFY_LAYOUT}. Split them yourself, by time or by camera: frames of one visit "
            "on both sides of a random split make val accuracy meaningless (nothing is split "
            "automatically)"
        )
    return f"classification data {str(data)!r} has no train/ and val/ splits; expected {CLASSIFY_LAYOUT}"


def _check_readable(data: Path, images: list[Path]) -> None:
    """Refuse images that Ultralytics would drop as corrupt (unreadable, or under 10 px a side)."""

    def problem(path: Path) -> str | None:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image.verify()
                width, height = image.size
        except Exception as exc:  # PIL raises many kinds; all mean "unreadable"
            return f"{path.relative_to(data)} ({type(exc).__name__}: {exc})"
        if min(width, height) < MIN_SIDE:
            return f"{path.relative_to(data)} ({width}x{height}, under {MIN_SIDE} px)"
        return None

    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        bad = [p for p in pool.map(problem, images) if p is not None]
    if bad:
        more = f" and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        raise TrainingError(
            f"classification data {str(data)!r}: {len(bad)} unreadable image(s): "
            f"{', '.join(bad[:_LISTED])}{more}; remove or replace them"
        )


def classify_data_sha256(data: ClassifyData) -> str:
    """SHA-256 over the images of every split: each as its path under the root and its own SHA-256.

    Renaming, adding, removing or changing an image (moving it to another
    class or split included) changes the hash; Ultralytics' ``*.cache`` files
    and other files do not.
    """
    digest = hashlib.sha256()
    for image in data.images:
        digest.update(f"{image.relative_to(data.root).as_posix()}\0{sha256_of(image)}\n".encode())
    return digest.hexdigest()


def train_classifier(
    data: Path,
    model: str | Path = "yolov8n-cls.pt",
    epochs: int = 10,
    imgsz: int = 224,
    batch: int = 16,
    device: str = "auto",
    project: Path = Path("runs/train"),
    name: str = "exp",
) -> Path:
    """Train a classification model on a folder of class folders; write its model card next to ``best.pt``.

    Args:
        data: The data set folder (``train/<class>/``, ``val/<class>/``).
        model: Local ``.pt`` classification weights to fine-tune (``yolov8n-cls.pt``), or an
            architecture such as ``yolov8n-cls.yaml`` to train from random weights.
        epochs: Training epochs.
        imgsz: Training size (square crops), a multiple of 32; the daemon's ``classifier.imgsz``.
        batch: Images per batch.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        project: Runs go to ``project/name`` (``name2``, ``name3`` … when taken).
        name: Run name.

    Returns:
        The best weights, ``project/name/weights/best.pt``.

    Raises:
        DetectorError: The model is missing or cannot be loaded, or the device does not exist.
        TaskMismatchError: The model is not a classification model.
        TrainingError: An argument is out of range, the data set is unusable or training failed.
    """
    import ultralytics

    check_positive("epochs", epochs)
    check_positive("batch", batch)
    check_imgsz(imgsz)
    checked = check_classify_data(data)
    torch_device = resolve_device(device)
    yolo = load_model(model, "classify")  # a wrong model fails before every image is hashed
    data_sha256 = classify_data_sha256(checked)
    logger.info(
        "training classifier %s on %s (%d classes, %d train images): "
        "%d epochs, imgsz %d, batch %d, device %s",
        model,
        data,
        len(checked.classes),
        sum(checked.counts["train"].values()),
        epochs,
        imgsz,
        batch,
        device,
    )
    try:
        with keep_torch_threads():
            results = yolo.train(
                data=str(data.resolve()),
                epochs=epochs,
                imgsz=imgsz,
                batch=batch,
                device=ultralytics_device(torch_device),
                project=str(project.resolve()),  # relative ones would land under Ultralytics' runs_dir
                name=name,
                amp=torch_device.type == "cuda",
                plots=False,
            )
    except Exception as exc:  # Ultralytics raises many kinds; all mean "this run failed"
        raise TrainingError(
            f"training {model} on {data} failed: {type(exc).__name__}: {exc}".rstrip()
        ) from exc
    best = Path(yolo.trainer.best) if yolo.trainer is not None else None
    if best is None or results is None or not best.is_file():
        raise TrainingError(f"training {model} on {data} finished without writing best.pt ({best})")
    card = ModelCard(
        weights=best.name,
        weights_sha256=sha256_of(best),
        task="classify",
        classes=[str(n) for _, n in sorted(yolo.names.items())],
        metrics={"top1": float(results.top1), "top5": float(results.top5)},
        data=str(data),
        data_sha256=data_sha256,
        base_model=str(model),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        ultralytics=ultralytics.__version__,
        created=datetime.now(timezone.utc),
    )
    model_card_path(best).write_text(card.model_dump_json(indent=2) + "\n")
    logger.info("trained %s (top1 %.3f, top5 %.3f)", best, card.metrics["top1"], card.metrics["top5"])
    return best


def validate_classifier(
    data: Path, model: Path, imgsz: int = 224, batch: int = 16, device: str = "auto"
) -> ClassifyValReport:
    """Top-1 and top-5 accuracy of classification weights on a data set's val split, overall and per class.

    Args:
        data: The data set folder (the whole layout: Ultralytics reads the classes from train/).
        model: Weights (``.pt`` or an export Ultralytics can load).
        imgsz: Validation size, a multiple of 32.
        batch: Images per batch.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The ``all`` row and one row per class of the val split.

    Raises:
        DetectorError: The model is missing or cannot be loaded, or the device does not exist.
        TaskMismatchError: The model is not a classification model.
        TrainingError: An argument is out of range, the data set is unusable, its classes are
            not the model's, or validation failed.
    """
    check_positive("batch", batch)
    check_imgsz(imgsz)
    checked = check_classify_data(data)
    torch_device = resolve_device(device)
    yolo = load_model(model, "classify")
    model_classes = {str(n) for n in yolo.names.values()}
    unknown = sorted(set(checked.classes) - model_classes)
    if unknown:
        raise TrainingError(
            f"classification data {str(data)!r} has classes the model {str(model)!r} does not know: "
            f"{', '.join(unknown)} (its classes: {', '.join(sorted(model_classes))})"
        )
    seen: list[Any] = []
    # Per-class accuracy needs each image's ranking, which lives only on the validator.
    yolo.add_callback("on_val_end", lambda validator: seen.append(validator))
    try:
        # Nothing worth keeping is written (no plots), so the run directory is temporary.
        with tempfile.TemporaryDirectory(prefix="monitor-val-") as scratch, keep_torch_threads():
            metrics = yolo.val(
                data=str(data.resolve()),
                split="val",
                imgsz=imgsz,
                batch=batch,
                device=ultralytics_device(torch_device),
                project=scratch,
                name="val",
                plots=False,
            )
    except Exception as exc:  # Ultralytics raises many kinds; all mean "this run failed"
        raise TrainingError(
            f"validating {model} on {data} failed: {type(exc).__name__}: {exc}".rstrip()
        ) from exc
    if not seen:
        raise TrainingError(f"validating {model} on {data} ran no validator")
    return ClassifyValReport(
        str(model), str(data), imgsz, _rows(seen[-1], float(metrics.top1), float(metrics.top5))
    )


def _rows(validator: Any, top1: float, top5: float) -> tuple[ClassifyValRow, ...]:
    """The ``all`` row (Ultralytics' own accuracies) and one row per class from the validator's rankings."""
    import torch

    ranked = torch.cat(validator.pred)  # N x min(5, classes): class ids, best first
    targets = torch.cat(validator.targets)
    hit1 = ranked[:, 0] == targets
    hit5 = (ranked == targets[:, None]).any(dim=1)
    names: dict[int, str] = {int(k): str(v) for k, v in dict(validator.names).items()}
    rows = [ClassifyValRow("all", len(targets), top1, top5)]
    for cls in sorted(int(c) for c in torch.unique(targets)):
        mine = targets == cls
        count = int(mine.sum())
        rows.append(
            ClassifyValRow(
                names.get(cls, str(cls)),
                count,
                float(hit1[mine].sum()) / count,
                float(hit5[mine].sum()) / count,
            )
        )
    return tuple(rows)
