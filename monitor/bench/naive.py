"""The naive baselines on the same frames: Ultralytics' per-frame loop and list predict, our detector."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import numpy as np
import torch

from monitor.bench.report import NaiveResult
from monitor.detector import Detector
from monitor.runtime import exported_model


def compare_naive(detector: Detector, frames: list[np.ndarray], batch: int) -> NaiveResult:
    """Detector-only rates on ``frames``: Ultralytics per frame, Ultralytics batched, ours batched.

    Ultralytics gets the detector's weights file, imgsz, device, fp16 choice, conf,
    IoU and max_det, and the same number of torch threads; every result is brought
    to the CPU (as ours are) before the clock stops. Each way runs once untimed
    first. Ultralytics runs the ``.pt`` with torch; the detector runs its own
    runtime (``Detector.runtime``: OpenVINO on the CPU when installed).
    """
    from ultralytics import YOLO  # type: ignore[attr-defined]

    model_settings = detector.settings
    model = YOLO(str(model_settings.path), task="detect")
    device = detector.device
    options: dict[str, Any] = {
        "imgsz": model_settings.imgsz,
        "device": "cpu" if device.type == "cpu" else device.index or 0,
        "half": detector.half,
        "conf": model_settings.conf,
        "iou": model_settings.iou,
        "max_det": model_settings.max_det,
        "verbose": False,
    }
    batches = [frames[i : i + batch] for i in range(0, len(frames), batch)]

    def per_frame() -> None:
        for frame in frames:
            _to_cpu(model.predict(frame, **options))

    def batched() -> None:
        for chunk in batches:
            _to_cpu(model.predict(chunk, **options))

    def ours() -> None:
        for chunk in batches:
            detector.detect(chunk)

    threads = torch.get_num_threads()
    _to_cpu(model.predict(frames[0], **options))
    torch.set_num_threads(threads)  # select_device changed it: both sides get the same count
    _to_cpu(model.predict(batches[0], **options))
    detector.detect(batches[0])
    openvino_fps = None
    if device.type == "cpu" and importlib.util.find_spec("openvino") is not None:
        # The same .pt exported the way the daemon does it (cached), run per frame by Ultralytics.
        weights = model_settings.path
        if weights.suffix == ".pt":
            exported = exported_model(weights, "openvino", model_settings.imgsz, detector.sha256)
            openvino = YOLO(str(exported), task="detect")
            torch.set_num_threads(threads)

            def openvino_per_frame() -> None:
                for frame in frames:
                    _to_cpu(openvino.predict(frame, **options))

            _to_cpu(openvino.predict(frames[0], **options))
            torch.set_num_threads(threads)
            openvino_fps = len(frames) / _timed(openvino_per_frame, device)
    return NaiveResult(
        frames=len(frames),
        batch=batch,
        ultralytics_per_frame_fps=len(frames) / _timed(per_frame, device),
        ultralytics_batched_fps=len(frames) / _timed(batched, device),
        detector_fps=len(frames) / _timed(ours, device),
        openvino_per_frame_fps=openvino_fps,
    )


def _to_cpu(results: Any) -> None:
    for result in results:
        result.boxes.data.cpu()


def _timed(run: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
