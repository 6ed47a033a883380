"""The load ``monitor bench`` offers: synthetic and file streams, a clip's frames, random-init weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import supervision as sv
import torch
from pydantic import ValidationError

from monitor.bench.options import BenchOptions
from monitor.decoder import MAX_NATIVE
from monitor.errors import ConfigError, DetectorError, SourceError
from monitor.settings import (
    CameraDetectSettings,
    CameraRecordSettings,
    CameraSettings,
    DetectSettings,
    Settings,
)

DEFAULT_CLIP = Path(__file__).resolve().parents[2] / "tests" / "data" / "vtest.mp4"
#: Frame size of synthetic streams when none is given.
SYNTHETIC_SIZE = (1280, 720)
ARCHITECTURE_SUFFIXES = (".yaml", ".yml")


def bench_settings(base: Settings, options: BenchOptions, url: str, size: tuple[int, int] | None) -> Settings:
    """``base`` with its cameras replaced by the bench's streams (``stream-000``...).

    Raises:
        ConfigError: The options make an invalid camera.
    """
    width, height = size if size is not None else (None, None)
    try:
        cameras = {
            f"stream-{i:03d}": CameraSettings(
                url=url,
                detect=CameraDetectSettings(fps=options.fps_of(i), width=width, height=height),
                decoder=options.decoder,
                record=CameraRecordSettings(enabled=True) if options.record else None,
            )
            for i in range(options.streams)
        }
        detect = base.detect
        for key in ("max_batch", "workers"):
            if getattr(options, key) is not None:
                detect = DetectSettings.model_validate({**detect.model_dump(), key: getattr(options, key)})
    except ValidationError as exc:
        raise ConfigError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from exc
    return base.model_copy(update={"cameras": cameras, "detect": detect})


def clip_size(clip: Path) -> tuple[int, int]:
    """Width and height of a video's first frame.

    Raises:
        SourceError: It cannot be read as a video.
    """
    try:
        image = next(sv.get_video_frames_generator(str(clip)), None)
    except Exception:  # supervision raises a bare Exception for a file OpenCV cannot open
        image = None
    if image is None:
        raise SourceError(f"{clip}: cannot read a frame (expected a video file OpenCV can decode)")
    return int(image.shape[1]), int(image.shape[0])


def decoded_size(width: int, height: int) -> tuple[int, int]:
    """The size a decoder hands out native frames at: capped at ``MAX_NATIVE`` pixels, aspect kept."""
    scale = min(1.0, (MAX_NATIVE[0] * MAX_NATIVE[1] / (width * height)) ** 0.5)
    return max(1, int(width * scale)), max(1, int(height * scale))


def clip_frames(clip: Path, count: int, size: tuple[int, int] | None) -> list[np.ndarray]:
    """The first ``count`` frames of ``clip`` (looped if shorter), scaled to ``size`` as the decoders do."""
    import cv2

    frames: list[np.ndarray] = []
    while len(frames) < count:  # once more from the start while the clip is too short
        played = len(frames)
        image: np.ndarray
        for image in sv.get_video_frames_generator(str(clip)):
            if size is not None and (image.shape[1], image.shape[0]) != size:
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            frames.append(np.ascontiguousarray(image))
            if len(frames) == count:
                break
        if len(frames) == played:
            raise SourceError(f"{clip}: no frame could be decoded")
    return frames


def random_init_weights(architecture: str, directory: Path) -> Path:
    """Build ``architecture`` (``yolov8s.yaml``) with random weights and save it as a ``.pt``.

    Both the detector and Ultralytics' ``YOLO`` then load the same file, with the
    real model's compute per frame.

    Raises:
        DetectorError: Ultralytics does not know the architecture.
    """
    from ultralytics import YOLO  # type: ignore[attr-defined]

    torch.manual_seed(0)
    out = directory / f"{Path(architecture).stem}-random.pt"
    try:
        YOLO(architecture, task="detect").save(out)
    except Exception as exc:  # Ultralytics raises many kinds for an unknown or bad YAML
        raise DetectorError(
            f"model {architecture!r} could not be built as a YOLO architecture: {type(exc).__name__}: {exc}"
        ) from exc
    return out
