"""Where and how the model runs: the device, the runtime, cached exports, and the weights' SHA-256.

Shared by the detector, the model workflow (``training.py``) and the bench:
which runtime ``model.backend`` means on this machine, the OpenVINO or ONNX
export of ``.pt`` weights made once and cached beside them, and the
weights' SHA-256 that events, logs and model cards name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from monitor.errors import DetectorError

logger = logging.getLogger(__name__)

Runtime = Literal["torch", "openvino", "onnx", "exported"]
_HASH_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """SHA-256 of a weights file, or of the sorted files of an export directory."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def choose_runtime(backend: str, device: torch.device, path: Path) -> Runtime:
    """The inference runtime: ``auto`` is torch on CUDA, else OpenVINO when it is installed.

    Exported weights (.onnx, _openvino_model/, .engine) run as they are: the
    runtime is theirs, whatever ``backend`` says.
    """
    if path.suffix != ".pt":
        return "exported"
    if backend == "auto":
        if device.type == "cuda":
            return "torch"
        if importlib.util.find_spec("openvino") is None:
            logger.info("OpenVINO is not installed: running the model with torch on the CPU")
            return "torch"
        return "openvino"
    if backend in ("openvino", "onnx"):
        module = "openvino" if backend == "openvino" else "onnxruntime"
        if importlib.util.find_spec(module) is None:
            raise DetectorError(f"model.backend is {backend!r} but the {module!r} package is not installed")
        if device.type == "cuda":
            raise DetectorError(f"model.backend {backend!r} runs on the CPU; set model.device to cpu or auto")
    return backend  # type: ignore[return-value]


def exported_model(weights: Path, runtime: Runtime, imgsz: int, sha256: str) -> Path:
    """The weights exported for ``runtime`` at ``imgsz``, exported once through Ultralytics.

    The export is cached beside the weights (else in the temp folder, when that
    folder is read-only), named by the weights' SHA-256 and imgsz, so new
    weights or another size export again. Exports are dynamic (any batch and
    rectangle) and written to a temporary name first, then renamed: two
    daemons starting at once cannot see half an export.

    Raises:
        DetectorError: The export failed.
    """
    from ultralytics import YOLO  # type: ignore[attr-defined]

    suffix = "_openvino_model" if runtime == "openvino" else ".onnx"
    name = f"{weights.stem}-{sha256[:12]}-{imgsz}{suffix}"
    for folder in (weights.parent, Path(tempfile.gettempdir()) / "monitor-models"):
        target = folder / name
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
        except OSError:
            continue
        threads = torch.get_num_threads()  # Ultralytics' select_device lowers it process-wide
        try:
            copy = work / weights.name
            shutil.copyfile(weights, copy)
            started = time.perf_counter()
            try:
                model = YOLO(str(copy))
            except Exception as exc:  # the same words as a failed direct load
                reason = f"{type(exc).__name__}: {exc}"
                raise DetectorError(
                    f"model.path {str(weights)!r} could not be loaded as a YOLO model: {reason}"
                ) from exc
            out = Path(model.export(format=runtime, imgsz=imgsz, dynamic=True, half=False, verbose=False))
            if not target.exists():
                out.rename(target)
            logger.info(
                "exported %s for %s in %.1f s: %s",
                weights.name,
                runtime,
                time.perf_counter() - started,
                target,
            )
            return target
        except DetectorError:
            raise
        except Exception as exc:
            raise DetectorError(
                f"exporting {weights} for {runtime} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(work, ignore_errors=True)
    raise DetectorError(f"no writable folder to cache the {runtime} export of {weights}")


def model_task(backend: Any) -> str:
    """What an ``AutoBackend`` model does: ``detect``, ``classify``, ``segment``...

    Exports carry it in their metadata; ``.pt`` weights leave it unset, so their
    network's class says (its saved ``args`` may not: a model built from one YAML
    and saved keeps the default task), else Ultralytics' ``guess_model_task``.
    """
    task = getattr(backend, "task", None) or (getattr(backend, "metadata", None) or {}).get("task")
    if task:
        return str(task)
    from ultralytics.nn.tasks import guess_model_task

    network = getattr(backend, "model", None)
    if network is None:
        return "detect"
    kinds = {
        "ClassificationModel": "classify",
        "DetectionModel": "detect",
        "SegmentationModel": "segment",
        "PoseModel": "pose",
        "OBBModel": "obb",
    }
    return kinds.get(type(network).__name__) or str(guess_model_task(network))  # type: ignore[no-untyped-call]


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DetectorError(f"model.device is {name!r} but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DetectorError(
            f"model.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device
