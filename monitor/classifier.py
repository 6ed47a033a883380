"""The species classifier: one batch of crops of tracked objects, any cameras, one forward pass.

The second stage of the camera-trap practice (MegaDetector + SpeciesNet,
Frigate's custom classification): a detector finds an animal, a classifier
names the species on its crop. Weights are an Ultralytics classification
model (``yolov8n-cls`` and its fine-tunes) or its ONNX/OpenVINO export, loaded
through ``AutoBackend`` with the same runtime choice as the detector.

A crop is the square around the box, a little larger (``square_crop``),
padded with Ultralytics' grey where it leaves the frame, and resized to
``imgsz``. Ultralytics' own classification transform (short side to
``imgsz``, centre crop) is then the identity, so a crop classifies here as
the same square saved as a JPEG classifies in ``YOLO(...).predict``, and the
training crops that ``square_crop`` writes match what the daemon sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from monitor.errors import DetectorError
from monitor.runtime import choose_runtime, exported_model, model_task, resolve_device, sha256_of
from monitor.settings import Settings

logger = logging.getLogger(__name__)

PAD_VALUE = 114  # Ultralytics' letterbox grey
#: How much larger than the box's long side the square crop is (context around the animal).
MARGIN = 0.15


def square_crop(
    image: np.ndarray, box: Sequence[float], size: int | None = None, margin: float = MARGIN
) -> np.ndarray:
    """The square around ``box`` (x1, y1, x2, y2 in pixels), ``1 + margin`` times its long side.

    Parts outside the frame are grey; with ``size`` the square is resized to
    ``size`` x ``size``. The result is a new HxWx3 uint8 array (BGR as the input).
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    n = max(round(side), 1)
    out = np.full((n, n, 3), PAD_VALUE, np.uint8)
    sx1, sy1 = max(left, 0), max(top, 0)
    sx2, sy2 = min(left + n, width), min(top + n, height)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - top : sy2 - top, sx1 - left : sx2 - left] = image[sy1:sy2, sx1:sx2]
    if size is not None and n != size:
        interpolation = cv2.INTER_AREA if n > size else cv2.INTER_LINEAR
        return np.asarray(cv2.resize(out, (size, size), interpolation=interpolation), np.uint8)
    return out


@dataclass(frozen=True, slots=True)
class Classification:
    """The classifier's top class for one crop.

    Attributes:
        label: Class name (after the classifier's ``labels`` renames).
        score: Its probability.
    """

    label: str
    score: float


class Classifier:
    """Batched crop classification on one device.

    Args:
        path: Weights: an Ultralytics classification ``.pt`` or its export.
        imgsz: Input size (square).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the detector's).
        backend: ``model.backend``: ``auto``, ``torch``, ``openvino`` or ``onnx``.
        labels: Rename classes: ``{model_name: new_name}``.
        max_batch: The most crops one forward pass gets (callers chunk by it).

    Raises:
        DetectorError: The weights are missing, unreadable or not a classification model.
    """

    def __init__(
        self,
        path: Path,
        imgsz: int = 224,
        device: str = "auto",
        backend: str = "auto",
        labels: dict[str, str] | None = None,
        max_batch: int = 64,
    ) -> None:
        from ultralytics.nn.autobackend import AutoBackend  # heavy import, only here

        if not path.exists():
            raise DetectorError(f"classifier.path {str(path)!r} does not exist")
        self.path = path
        self.imgsz = imgsz
        self.max_batch = max_batch
        self.sha256 = sha256_of(path)
        self.device = resolve_device(device)
        self.half = self.device.type == "cuda"
        self.runtime = choose_runtime(backend, self.device, path)
        weights = path
        if self.runtime != "torch" and path.suffix == ".pt":
            weights = exported_model(path, self.runtime, imgsz, self.sha256)
        try:
            self.backend = AutoBackend(
                str(weights), device=self.device, fp16=self.half, fuse=True, verbose=False
            )
        except Exception as exc:  # Ultralytics raises many kinds; all mean "unusable file"
            reason = f"{type(exc).__name__}: {exc}"
            raise DetectorError(
                f"classifier.path {str(path)!r} could not be loaded as a YOLO model: {reason}"
            ) from exc
        self.backend.eval()
        task = model_task(self.backend)
        if task != "classify":
            raise DetectorError(
                f"classifier.path {str(path)!r} is a {task!r} model; a 'classify' model is needed"
            )
        renames = labels or {}
        self.names: dict[int, str] = {
            int(i): renames.get(str(n)) or str(n) for i, n in dict(self.backend.names).items()
        }
        self.label = f"{path.name}@{self.sha256[:12]}"
        logger.info(
            "classifier %s loaded on %s with %s (sha256 %s, classes %s)",
            weights,
            self.device,
            self.runtime,
            self.sha256,
            sorted(set(self.names.values())),
        )

    def crops(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        """The network-size square crops of ``boxes`` in one frame."""
        return [square_crop(image, box, self.imgsz) for box in boxes]

    def probabilities(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities, one row per crop (crops of any sizes, resized to ``imgsz``).

        Raises:
            DetectorError: A crop is not an HxWx3 uint8 image.
        """
        if not crops:
            return np.zeros((0, len(self.names)), np.float32)
        size = self.imgsz
        batch = np.empty((len(crops), size, size, 3), np.uint8)
        for i, crop in enumerate(crops):
            if crop.ndim != 3 or crop.shape[2] != 3 or crop.dtype != np.uint8:
                raise DetectorError(f"expected an HxWx3 uint8 crop, got shape {crop.shape} {crop.dtype}")
            if crop.shape[:2] == (size, size):
                batch[i] = crop
            else:
                interpolation = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
                cv2.resize(crop, (size, size), dst=batch[i], interpolation=interpolation)
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).flip(1)  # BGR -> RGB
            tensor = tensor.half() if self.half else tensor.float()
            out = self.backend(tensor.div_(255).contiguous())
            if isinstance(out, (list, tuple)):
                out = out[0]
            probs = out.float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        return np.asarray(probs, np.float32).reshape(len(crops), -1)

    def classify(self, crops: Sequence[np.ndarray]) -> list[Classification]:
        """The top class of each crop, in order."""
        probs = self.probabilities(crops)
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
        return [
            Classification(self.names.get(int(c), str(int(c))), float(p[c]))
            for c, p in zip(top, probs, strict=True)
        ]


def load_classifier(settings: Settings) -> Classifier | None:
    """The configured classifier, on the detector's device and runtime choice, warmed up (or None).

    Raises:
        DetectorError: The weights are missing, unreadable or not a classification model.
    """
    section = settings.classifier
    if section is None:
        return None
    model = settings.model
    classifier = Classifier(
        section.path, section.imgsz, model.device, model.backend, section.labels, section.max_batch
    )
    classifier.classify([np.full((section.imgsz, section.imgsz, 3), PAD_VALUE, np.uint8)])  # warm-up
    return classifier
