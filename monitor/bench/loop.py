"""The bench's loop: the daemon's loop body, without uploads or publishing, recording what it measures."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from monitor.alerts import Alert
from monitor.camera import CameraPipeline
from monitor.classifier import Classifier
from monitor.detector import Detector
from monitor.frames import Frame
from monitor.loop import Loop
from monitor.metrics import STAGES as METRIC_STAGES
from monitor.metrics import Metrics
from monitor.pipeline import Detects, PipelineStep
from monitor.scheduler import Scheduler
from monitor.settings import Settings
from monitor.sources import Source
from monitor.topics import Topics
from monitor.workers import TrackingWorkers

#: Prefix of the (never published) snapshot topics.
BENCH_PREFIX = "bench"
#: The per-frame and per-batch stages measured here: the daemon's, less publish (no broker here).
STAGES = tuple(s for s in METRIC_STAGES if s != "publish")


@dataclass
class Recorder:
    """Samples of the measured window (nothing is kept while ``on`` is False)."""

    on: bool = False
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    to_detections: list[float] = field(default_factory=list)
    to_alerts: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    crops: int = 0
    events: Counter[str] = field(default_factory=Counter)
    gpu_samples: list[float] = field(default_factory=list)
    gpu_error: str | None = None

    def batch(self, stages: Mapping[str, float], size: int) -> None:
        """``StepObserver``: one forward pass."""
        if self.on:
            for name, seconds in stages.items():
                self.stages[name].append(seconds)
            self.batches.append(size)

    def classified(self, seconds: float, crops: int) -> None:
        """``StepObserver``: one classifier pass."""
        if self.on:
            self.stages["classify"].append(seconds)
            self.crops += crops

    def frame(
        self, frame: Frame, detected_at: float, stages: Mapping[str, float], alerts: list[Alert]
    ) -> None:
        """``StepObserver``: one frame through its camera's stages."""
        if not self.on:
            return
        for name, seconds in stages.items():
            if name in self.stages:  # no publish stage here
                self.stages[name].append(seconds)
        self.to_detections.append(max(0.0, detected_at - frame.capture_time))
        self.to_alerts.append(max(0.0, time.time() - frame.capture_time))
        self.count(alerts)

    def count(self, alerts: list[Alert]) -> None:
        """Count events by type (silenced ones as ``suppressed``) while recording."""
        if self.on:
            for alert in alerts:
                self.events["suppressed" if alert.suppressed else alert.event.type] += 1


def sample_gpu(device: torch.device, recorder: Recorder) -> None:
    try:
        recorder.gpu_samples.append(float(torch.cuda.utilization(device)))
    except Exception as exc:  # pynvml missing or NVML unusable: report why, stop asking
        recorder.gpu_error = f"{type(exc).__name__}: {exc}"


class BenchLoop:
    """The daemon's ``Loop`` around the daemon's ``PipelineStep``, without uploads or MQTT."""

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[Source],
        detector: Detector,
        metrics: Metrics,
        recorder: Recorder,
        classifier: Classifier | None = None,
        step_detector: Detects | None = None,
        workers: TrackingWorkers | None = None,
    ) -> None:
        """``step_detector`` stands in for ``detector`` in the step (the null runtime)."""
        self.sources = sources
        self.detector = detector
        self.metrics = metrics
        self.recorder = recorder
        max_age = settings.detect.max_age_ms
        self.scheduler = Scheduler(settings.detect.max_batch, max_age / 1000 if max_age else None)
        self.cameras = {
            name: CameraPipeline(name, settings, detector.label, Topics(BENCH_PREFIX), None)
            for name in settings.cameras
        }
        # The daemon's own step; events are counted (by the recorder), not published.
        self.pipeline = PipelineStep(
            step_detector or detector,
            self.cameras,
            metrics,
            settings.model.conf,
            on_alerts=lambda alerts: None,
            observer=recorder,
            classifier=classifier,
            workers=workers,
        )
        self.loop = Loop(
            {s.name: s for s in sources},
            self.scheduler,
            settings.detect.max_wait_ms / 1000,
            lambda frames, uploads: self.pipeline.run(frames),
            self._expire,
            metrics,
        )

    def step(self) -> None:
        """One turn of the daemon's loop: wait for frames, take the ready ones (round robin), run the step."""
        self.loop.turn()

    def _expire(self, now: float) -> None:
        """The daemon's chores: end the tracks of cameras gone quiet (counted as events)."""
        wall = time.time()
        for camera in self.cameras.values():
            self.recorder.count(camera.rules.expire(wall))
