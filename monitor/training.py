"""The model workflow: train, validate and export YOLO detection models; export classifiers.

Each function wraps one Ultralytics call (``YOLO(...).train``, ``.val``,
``.export``) for the ``monitor train``, ``monitor val`` and ``monitor export``
commands; training and validating classification models is in
``monitor.training_classify``, whose ``infer_task`` tells the two apart by the
data set: a YAML is detection, a folder of class folders classification.
Whatever Ultralytics raises comes back as a ``MonitorError``: a
``DetectorError`` when the model cannot be found or loaded, a
``TaskMismatchError`` when the model, the data set and the task do not go
together, a ``TrainingError`` when the data set or the run itself fails. What
they hand back (the model card, the validation table) is in
``monitor.model_reports``.

Nothing here downloads: pretrained ``.pt`` weights must be a local file, and a
missing one fails before Ultralytics would try to fetch it by name. A model
given as a YAML architecture (``yolov8s.yaml``, ``yolov8n-cls.yaml``) starts
from random weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from monitor.errors import DetectorError, MonitorError
from monitor.model_reports import ModelCard, ValReport, ValRow, model_card_path
from monitor.runtime import resolve_device, sha256_of

if TYPE_CHECKING:
    from ultralytics.models.yolo import YOLO

logger = logging.getLogger(__name__)

STRIDE = 32  # YOLOv8's largest stride: input sizes are multiples of it
ARCHITECTURE_SUFFIXES = (".yaml", ".yml")
ExportFormat = Literal["onnx", "openvino", "engine"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("onnx", "openvino", "engine")
Task = Literal["detect", "classify"]
TASKS: tuple[Task, ...] = ("detect", "classify")
#: Defaults per task: the seed's detection model and size; the smallest YOLOv8 classifier at
#: Ultralytics' (and ``classifier.imgsz``'s) 224.
DEFAULT_IMGSZ: dict[str, int] = {"detect": 416, "classify": 224}
DEFAULT_MODEL: dict[str, str] = {"detect": "yolov8s.pt", "classify": "yolov8n-cls.pt"}
_MODEL_HINT = {
    "detect": "a detection model: local .pt weights such as yolov8s.pt, or yolov8s.yaml for random weights",
    "classify": "a classification model: local .pt weights such as yolov8n-cls.pt, "
    "or yolov8n-cls.yaml for random weights",
}


class TrainingError(MonitorError):
    """A data set is unusable, or a training, validation or export run failed."""


class TaskMismatchError(TrainingError):
    """The task, the data set and the model do not go together (a detection model on class folders...)."""


def train(
    data: Path,
    model: str | Path = "yolov8s.pt",
    epochs: int = 10,
    imgsz: int = 416,
    batch: int = 16,
    device: str = "auto",
    project: Path = Path("runs/train"),
    name: str = "exp",
) -> Path:
    """Train a detection model and write its model card next to ``best.pt``.

    Args:
        data: Ultralytics data set YAML (``path``, ``train``, ``val``, ``names``).
        model: Local ``.pt`` weights to fine-tune, or a YAML architecture such as
            ``yolov8s.yaml`` to train from random weights.
        epochs: Training epochs.
        imgsz: Training size, a multiple of 32.
        batch: Images per batch.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        project: Runs go to ``project/name`` (``name2``, ``name3`` … when taken).
        name: Run name.

    Returns:
        The best weights, ``project/name/weights/best.pt``.

    Raises:
        DetectorError: The model is missing or cannot be loaded, or the device does not exist.
        TaskMismatchError: The model is not a detection model.
        TrainingError: An argument is out of range, the data set is unusable or training failed.
    """
    import ultralytics

    check_positive("epochs", epochs)
    check_positive("batch", batch)
    check_imgsz(imgsz)
    data_sha256 = dataset_sha256(data)
    torch_device = resolve_device(device)
    on_cuda = torch_device.type == "cuda"
    yolo = load_model(model, "detect")
    logger.info(
        "training %s on %s: %d epochs, imgsz %d, batch %d, device %s",
        model,
        data,
        epochs,
        imgsz,
        batch,
        device,
    )
    try:
        with keep_torch_threads():
            results = yolo.train(
                data=str(data),
                epochs=epochs,
                imgsz=imgsz,
                batch=batch,
                device=ultralytics_device(torch_device),
                project=str(project.resolve()),  # relative ones would land under Ultralytics' runs_dir
                name=name,
                amp=on_cuda,  # Ultralytics sets workers=0 on the CPU itself
                plots=False,
            )
    except Exception as exc:  # Ultralytics raises many kinds; all mean "this run failed"
        raise TrainingError(
            f"training {model} on {data} failed: {type(exc).__name__}: {exc}".rstrip()
        ) from exc
    best = Path(yolo.trainer.best) if yolo.trainer is not None else None
    if best is None or results is None or not best.is_file():
        raise TrainingError(f"training {model} on {data} finished without writing best.pt ({best})")
    box = results.box
    card = ModelCard(
        weights=best.name,
        weights_sha256=sha256_of(best),
        classes=[str(n) for _, n in sorted(yolo.names.items())],
        metrics={
            "precision": float(box.mp),
            "recall": float(box.mr),
            "mAP50": float(box.map50),
            "mAP50-95": float(box.map),
        },
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
    logger.info(
        "trained %s (mAP50 %.3f, mAP50-95 %.3f)", best, card.metrics["mAP50"], card.metrics["mAP50-95"]
    )
    return best


def validate(data: Path, model: Path, imgsz: int = 416, batch: int = 16, device: str = "auto") -> ValReport:
    """Validate weights on a data set's val split.

    Args:
        data: Ultralytics data set YAML.
        model: Weights (``.pt`` or an export Ultralytics can load).
        imgsz: Validation size, a multiple of 32.
        batch: Images per batch.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The ``all`` row and one row per class with labels in the val split.

    Raises:
        DetectorError: The model is missing or cannot be loaded, or the device does not exist.
        TaskMismatchError: The model is not a detection model.
        TrainingError: An argument is out of range, the data set is unusable or validation failed.
    """
    check_positive("batch", batch)
    check_imgsz(imgsz)
    _check_data(data)
    torch_device = resolve_device(device)
    yolo = load_model(model, "detect")
    seen: list[int] = []
    # The image count of the 'all' row lives only on the validator, which model.val() does not return.
    yolo.add_callback("on_val_end", lambda validator: seen.append(int(validator.seen)))
    try:
        # Nothing worth keeping is written (no plots, no JSON), so the run directory is temporary.
        with tempfile.TemporaryDirectory(prefix="monitor-val-") as scratch, keep_torch_threads():
            metrics = yolo.val(
                data=str(data),
                imgsz=imgsz,
                batch=batch,
                device=ultralytics_device(torch_device),
                project=scratch,
                name="val",
                plots=False,
                save_json=False,
            )
    except Exception as exc:  # Ultralytics raises many kinds; all mean "this run failed"
        raise TrainingError(
            f"validating {model} on {data} failed: {type(exc).__name__}: {exc}".rstrip()
        ) from exc
    names: dict[int, str] = dict(metrics.names)
    box = metrics.box
    rows = [
        ValRow(
            "all",
            seen[-1] if seen else 0,
            int(metrics.nt_per_class.sum()),
            float(box.mp),
            float(box.mr),
            float(box.map50),
            float(box.map),
        )
    ]
    for i, c in enumerate(box.ap_class_index):
        rows.append(
            ValRow(
                str(names[int(c)]),
                int(metrics.nt_per_image[c]),
                int(metrics.nt_per_class[c]),
                float(box.p[i]),
                float(box.r[i]),
                float(box.ap50[i]),
                float(box.ap[i]),
            )
        )
    return ValReport(str(model), str(data), imgsz, tuple(rows))


def export(
    model: Path,
    fmt: ExportFormat,
    imgsz: int | None = None,
    dynamic: bool = True,
    half: bool = False,
    batch: int = 16,
) -> Path:
    """Export detection or classification weights for the daemon; the result lands next to ``model``.

    Args:
        model: ``.pt`` weights of a detection or a classification model.
        fmt: ``onnx``, ``openvino`` or ``engine`` (TensorRT, needs CUDA).
        imgsz: Export size, a multiple of 32; the daemon's ``model.imgsz`` (``classifier.imgsz``)
            must match unless the export is dynamic. None: 416 for detection, 224 for classification.
        dynamic: Dynamic batch and image size, so the daemon can batch frames (crops).
        half: fp16 weights (ONNX and TensorRT need CUDA for it).
        batch: Largest batch a dynamic TensorRT engine accepts (the daemon's
            ``detect.max_batch``, or ``classifier.max_batch``); the example batch for the other formats.

    Returns:
        The exported file (``.onnx``, ``.engine``) or directory (``_openvino_model/``).

    Raises:
        DetectorError: The model is missing or cannot be loaded, or the format needs CUDA and there is none.
        TaskMismatchError: The model is neither a detection nor a classification model.
        TrainingError: An argument is out of range or the export failed.
    """
    import torch

    if fmt not in EXPORT_FORMATS:
        raise TrainingError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    check_positive("batch", batch)
    if imgsz is not None:
        check_imgsz(imgsz)
    cuda = torch.cuda.is_available()
    if fmt == "engine" and not cuda:
        raise DetectorError("export format 'engine' (TensorRT) needs CUDA, which is not available here")
    if half and fmt == "onnx" and not cuda:
        raise DetectorError("half=True ONNX export needs CUDA, which is not available here; export fp32")
    yolo = load_model(model)
    imgsz = DEFAULT_IMGSZ[str(yolo.task)] if imgsz is None else imgsz
    try:
        out = yolo.export(
            format=fmt,
            imgsz=imgsz,
            dynamic=dynamic,
            half=half,
            batch=batch,
            device="0" if fmt == "engine" or (half and fmt == "onnx") else "cpu",
        )
    except Exception as exc:  # Ultralytics raises many kinds; all mean "this export failed"
        hint = f" (install the {exc.name!r} package)" if isinstance(exc, ModuleNotFoundError) else ""
        raise TrainingError(
            f"exporting {model} to {fmt} failed: {type(exc).__name__}: {exc}{hint}".rstrip()
        ) from exc
    if not out or not Path(out).exists():
        raise TrainingError(f"exporting {model} to {fmt} produced no file (got {out!r})")
    logger.info("exported %s to %s", model, out)
    return Path(out)


def dataset_sha256(data: Path) -> str:
    """SHA-256 over the data YAML and the sorted files of its train/val image and label directories.

    Each file enters as its path relative to the data set root and its own
    SHA-256, so renaming, adding or changing an image or label changes the
    hash. Ultralytics' ``*.cache`` files are left out.

    Raises:
        TrainingError: The YAML is missing or invalid, or a split's images are missing.
    """
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    _check_data(data)
    try:
        # No autodownload: a data YAML's ``download`` entry may be a script, and nothing here downloads.
        info = check_det_dataset(str(data), autodownload=False)
    except Exception as exc:  # FileNotFoundError, SyntaxError, TypeError, yaml errors...
        raise TrainingError(f"data set {data} is unusable: {type(exc).__name__}: {exc}".rstrip()) from exc
    root = Path(info["path"])
    files: set[Path] = set()
    for split in ("train", "val"):
        entries = info.get(split) or []
        for entry in entries if isinstance(entries, list) else [entries]:
            source = Path(entry)
            if source.is_dir():
                images = [p for p in source.rglob("*") if p.is_file()]
                labels = Path(img2label_paths([str(source / "_.jpg")])[0]).parent
                if labels.is_dir():
                    files.update(p for p in labels.rglob("*") if p.is_file())
            elif source.is_file():  # a .txt list of image paths, relative ones to its directory
                files.add(source)
                listed = [line.strip() for line in source.read_text().splitlines() if line.strip()]
                images = [
                    source.parent / line[2:] if line.startswith("./") else Path(line) for line in listed
                ]
                files.update(Path(p) for p in img2label_paths([str(p) for p in images]) if Path(p).is_file())
            else:
                raise TrainingError(f"data set {data}: {split} entry {str(source)!r} does not exist")
            files.update(p for p in images if p.is_file())
    digest = hashlib.sha256(data.read_bytes())
    for file in sorted(f for f in files if f.suffix != ".cache"):
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.as_posix()
        digest.update(f"{name}\0{sha256_of(file)}\n".encode())
    return digest.hexdigest()


def load_model(model: str | Path, task: Task | None = None) -> YOLO:
    """``YOLO(model)``, refusing anything that would make Ultralytics download weights.

    Args:
        model: Local weights (``.pt`` or an export) or a YAML architecture (random weights).
        task: The task the model must do; None accepts a detection or a classification model.

    Returns:
        The model, its ``task`` set from its network (``detect`` or ``classify``).

    Raises:
        DetectorError: The model is missing or cannot be loaded.
        TaskMismatchError: The model does another task.
    """
    from ultralytics.models.yolo import YOLO

    path = Path(model)
    if path.suffix not in ARCHITECTURE_SUFFIXES and not path.exists():
        raise DetectorError(
            f"model {str(model)!r} does not exist; pretrained weights must be a local .pt file "
            "(nothing is downloaded), or give an architecture such as yolov8s.yaml "
            "(yolov8n-cls.yaml for a classifier) to start from random weights"
        )
    try:
        # No task forced: Ultralytics reads it from the YAML's head, the .pt or the export's metadata.
        yolo = YOLO(os.fspath(model))
    except Exception as exc:  # Ultralytics raises many kinds; all mean "unusable model"
        raise DetectorError(
            f"model {str(model)!r} could not be loaded as a YOLO model: {type(exc).__name__}: {exc}".rstrip()
        ) from exc
    actual = _network_task(yolo)
    yolo.task = actual
    wanted = (task,) if task is not None else TASKS
    if actual not in wanted:
        needs = _MODEL_HINT[task] if task is not None else "a detection or a classification model"
        raise TaskMismatchError(
            f"model {str(model)!r} is a {actual!r} model; task {task or 'export'!r} needs {needs}"
        )
    return yolo


def _network_task(yolo: YOLO) -> str:
    """What a loaded model does, from its network's class where it has one (a .pt or a YAML).

    Saved weights may carry a stale ``task`` in their args (a classifier built
    from a YAML and saved keeps the default); the network's class does not lie.
    """
    kinds = {"ClassificationModel": "classify", "DetectionModel": "detect"}
    network = getattr(yolo, "model", None)
    name = type(network).__name__
    if network is not None and not isinstance(network, (str, Path)) and name in kinds:
        return kinds[name]
    return str(yolo.task)


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's thread count afterwards: Ultralytics' device selection lowers it process-wide.

    On the CPU it sets ``torch.set_num_threads(cpu_count - 1)``, which would slow
    everything the process runs after a training or validation run.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ultralytics_device(device: Any) -> str:
    """Ultralytics' spelling of a torch device: ``cpu`` or the CUDA index."""
    return "cpu" if device.type == "cpu" else str(device.index or 0)


def _check_data(data: Path) -> None:
    if not data.is_file():
        raise TrainingError(f"data set YAML {str(data)!r} does not exist")


def check_positive(name: str, value: int) -> None:
    """Refuse a count below 1 (epochs, batch) naming the argument and its value.

    Raises:
        TrainingError: ``value`` is below 1.
    """
    if value < 1:
        raise TrainingError(f"{name} must be at least 1, got {value}")


def check_imgsz(imgsz: int) -> None:
    """Refuse an input size that is not a positive multiple of 32, suggesting the next one.

    Raises:
        TrainingError: ``imgsz`` is not a positive multiple of 32.
    """
    if imgsz < STRIDE or imgsz % STRIDE:
        raise TrainingError(
            f"imgsz must be a positive multiple of {STRIDE} (the model's stride), got {imgsz}; "
            f"try {max(STRIDE, -(-imgsz // STRIDE) * STRIDE)}"
        )
