"""What ``monitor bench`` is asked to measure: streams, rates, sizes, duration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monitor.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What load to run.

    Attributes:
        streams: Number of cameras.
        fps: Detect fps per stream; a list is cycled over the streams (``(20, 2)``: 20, 2, 20...).
        clip: Video played by every file stream (default ``DEFAULT_CLIP``).
        synthetic: Stand-in decoder children write pre-made random frames (nothing is decoded).
        width: Frames are scaled to this width (with ``height``); default: the clip's size.
        height: See ``width``.
        max_batch: ``detect.max_batch`` (default: the settings').
        workers: ``detect.workers``: tracking worker processes (default: the settings').
        decoder: Every file stream's ``decoder`` (``auto``, ``cpu``, ``nvdec``).
        runtime: ``model`` (the detector), or ``null``: detections recorded from a real run of
            the model on ``replay_detections`` are replayed per camera at no inference cost.
        replay_detections: The clip the null runtime's detections are recorded from.
        record: File streams also record (``record.enabled``): the PyAV child, segments on disk.
        duration: Seconds measured.
        warmup: Seconds run before measuring (after every stream delivered a frame).
        compare_naive: Also time Ultralytics' own predict loop on the same frames.
        naive_frames: Frames in that comparison.
        progress: Show a progress bar on stderr; None: only when stderr is a terminal.
    """

    streams: int = 4
    fps: tuple[float, ...] = (15.0,)
    clip: Path | None = None
    synthetic: bool = False
    width: int | None = None
    height: int | None = None
    max_batch: int | None = None
    workers: int | None = None
    decoder: str = "auto"
    record: bool = False
    runtime: str = "model"
    replay_detections: Path | None = None
    duration: float = 30.0
    warmup: float = 5.0
    compare_naive: bool = False
    naive_frames: int = 200
    progress: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.streams < 1:
            problems.append(f"streams: must be >= 1, got {self.streams}")
        if not self.fps or any(not 0 < f <= 120 for f in self.fps):
            problems.append(f"fps: each must be in (0, 120], got {list(self.fps)}")
        if (self.width is None) != (self.height is None):
            problems.append(f"width/height: give both or neither, got {self.width}x{self.height}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and value < 16:
                problems.append(f"{name}: must be >= 16, got {value}")
        if self.decoder not in ("auto", "cpu", "nvdec"):
            problems.append(f"decoder: must be auto, cpu or nvdec, got {self.decoder!r}")
        if self.runtime not in ("model", "null"):
            problems.append(f"runtime: must be model or null, got {self.runtime!r}")
        clip = self.replay_detections
        if self.runtime == "null" and (clip is None or not clip.is_file()):
            problems.append(f"replay_detections: the null runtime needs a video file, got {clip}")
        if self.runtime != "null" and self.replay_detections is not None:
            problems.append("replay_detections: only with runtime null")
        if self.record and self.synthetic:
            problems.append("record: synthetic streams have nothing to record; use file streams")
        if self.workers is not None and not 0 <= self.workers <= 64:
            problems.append(f"workers: must be in [0, 64], got {self.workers}")
        if self.max_batch is not None and self.max_batch < 1:
            problems.append(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.duration <= 0:
            problems.append(f"duration: must be > 0 seconds, got {self.duration}")
        if self.warmup < 0:
            problems.append(f"warmup: must be >= 0 seconds, got {self.warmup}")
        if self.naive_frames < 1:
            problems.append(f"naive_frames: must be >= 1, got {self.naive_frames}")
        if problems:
            raise ConfigError(problems)

    def fps_of(self, index: int) -> float:
        """The detect fps of stream ``index``."""
        return self.fps[index % len(self.fps)]
