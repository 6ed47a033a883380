"""The load ``monitor bench`` offers: synthetic and file streams, a clip's frames, random-init weights."""

from __future__ import annotations

import multiprocessing.connection as mpc
import time
from pathlib import Path

import numpy as np
import supervision as sv
import torch
from pydantic import ValidationError

from monitor.bench.options import BenchOptions
from monitor.decoder import MAX_NATIVE
from monitor.errors import ConfigError, DetectorError, SourceError
from monitor.frames import CameraState, Frame
from monitor.metrics import Metrics
from monitor.settings import CameraDetectSettings, CameraSettings, DetectSettings, Settings

DEFAULT_CLIP = Path(__file__).resolve().parents[2] / "tests" / "data" / "vtest.mp4"
#: Frame size of synthetic streams when none is given.
SYNTHETIC_SIZE = (1280, 720)
#: Distinct random frames per synthetic size (making one per delivery would cost more than detecting it).
SYNTHETIC_POOL = 8
ARCHITECTURE_SUFFIXES = (".yaml", ".yml")


class SyntheticSource:
    """A camera whose frames are made in-process on a fixed clock: no decoder, no shared memory.

    What the bench's loop needs of a camera (``loop.BenchSource``), without a decoder process.

    Frames are due every ``1 / fps`` seconds from ``__enter__`` plus ``phase``; one
    not taken before the next is due is dropped, as with a decoder.

    Args:
        name: Camera name.
        settings: The camera's settings (the URL is not opened).
        fps: Frames per second.
        metrics: Receives the delivered and dropped counts.
        images: Frames handed out in turn (copied on ``take``, as from shared memory).
        phase: Seconds after the start of the first frame (spreads the streams' arrivals).
    """

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        fps: float,
        metrics: Metrics,
        images: list[np.ndarray],
        phase: float,
    ) -> None:
        self.name = name
        self.settings = settings
        self.fps = fps
        self.state = CameraState.STARTING
        metrics.add_camera(name)
        self._images = images
        self._period = 1.0 / fps
        self._phase = phase
        self._start_mono = 0.0
        self._start_wall = 0.0
        self._due_seq = -1
        self._took_seq = -1
        self._delivered_counter = metrics.frames.labels(name)
        self._dropped_counter = metrics.frames_dropped.labels(name)

    def __enter__(self) -> SyntheticSource:
        self._start_mono, self._start_wall = time.monotonic(), time.time()
        self.state = CameraState.ONLINE
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to stop."""

    @property
    def connection(self) -> mpc.Connection | None:
        """None: nothing to wait on."""
        return None

    def drain(self) -> None:
        """Deliver the frames due by now (all but the newest are lost unless taken)."""
        seq = int((time.monotonic() - self._start_mono - self._phase) // self._period)
        if seq > self._due_seq:
            self._delivered_counter.inc(seq - self._due_seq)
            self._due_seq = seq

    def check(self, now: float) -> None:
        """Nothing to watch."""

    def next_arrival(self) -> float:
        """Monotonic time the next frame is due."""
        return self._start_mono + self._phase + (self._due_seq + 1) * self._period

    def has_new_frame(self) -> bool:
        """True when a due frame has not been taken."""
        return self._due_seq > self._took_seq

    def waiting_since(self) -> float:
        """Capture time of the waiting frame."""
        return self._capture_time(self._due_seq) if self.has_new_frame() else float("inf")

    def take(self, not_before: float | None = None) -> Frame | None:
        """A copy of the newest due frame, or None (dropped and counted when older than ``not_before``)."""
        if not self.has_new_frame():
            return None
        seq = self._due_seq
        if not_before is not None and self._capture_time(seq) < not_before:
            self._dropped_counter.inc(seq - self._took_seq)
            self._took_seq = seq
            return None
        if self._took_seq >= 0:
            self._dropped_counter.inc(seq - self._took_seq - 1)
        self._took_seq = seq
        image = self._images[seq % len(self._images)].copy()
        return Frame(self.name, seq, self._capture_time(seq), image)

    def _capture_time(self, seq: int) -> float:
        return self._start_wall + self._phase + seq * self._period


def synthetic_frames(width: int, height: int, count: int = SYNTHETIC_POOL, seed: int = 0) -> list[np.ndarray]:
    """``count`` random HxWx3 uint8 frames (fixed seed)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


# -- measurements ------------------------------------------------------------------------


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
            )
            for i in range(options.streams)
        }
        detect = base.detect
        if options.max_batch is not None:
            detect = DetectSettings.model_validate({**detect.model_dump(), "max_batch": options.max_batch})
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
