"""The bench's loop: the daemon's loop body, without uploads or publishing, recording what it measures."""

from __future__ import annotations

import multiprocessing.connection as mpc
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from monitor.alerts import Alert
from monitor.bench.load import SyntheticSource
from monitor.camera import CameraPipeline
from monitor.daemon import LOOP_TICK
from monitor.detector import Detector
from monitor.frames import CameraState, Frame
from monitor.metrics import STAGES as METRIC_STAGES
from monitor.metrics import Metrics
from monitor.scheduler import FrameSource, Scheduler
from monitor.settings import Settings

#: Prefix of the (never published) snapshot topics.
BENCH_PREFIX = "bench"
#: The per-frame and per-batch stages measured here: the daemon's, less publish (no broker here).
STAGES = tuple(s for s in METRIC_STAGES if s != "publish")


class BenchSource(FrameSource, Protocol):
    """A camera of the bench: a real ``Source`` (decoder child) or a ``SyntheticSource``."""

    state: CameraState

    @property
    def connection(self) -> mpc.Connection | None:
        """The pipe to wait on, if any."""
        ...

    def drain(self) -> None:
        """Read what the decoder sent."""
        ...

    def check(self, now: float) -> None:
        """Watchdog."""
        ...


@dataclass
class Recorder:
    """Samples of the measured window (nothing is kept while ``on`` is False)."""

    on: bool = False
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    to_detections: list[float] = field(default_factory=list)
    to_alerts: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    gpu_samples: list[float] = field(default_factory=list)
    gpu_error: str | None = None


def sample_gpu(device: torch.device, recorder: Recorder) -> None:
    try:
        recorder.gpu_samples.append(float(torch.cuda.utilization(device)))
    except Exception as exc:  # pynvml missing or NVML unusable: report why, stop asking
        recorder.gpu_error = f"{type(exc).__name__}: {exc}"


class BenchLoop:
    """The daemon's loop body (``Daemon._loop`` and ``_process``) without uploads or publishing."""

    def __init__(
        self,
        settings: Settings,
        sources: Sequence[BenchSource],
        detector: Detector,
        metrics: Metrics,
        recorder: Recorder,
    ) -> None:
        self.sources = sources
        self.detector = detector
        self.metrics = metrics
        self.recorder = recorder
        max_age = settings.detect.max_age_ms
        self.scheduler = Scheduler(settings.detect.max_batch, max_age / 1000 if max_age else None)
        self.cameras = {
            name: CameraPipeline(name, settings, detector.label, BENCH_PREFIX, None)
            for name in settings.cameras
        }
        self.synthetic = [s for s in sources if isinstance(s, SyntheticSource)]

    def step(self) -> None:
        """Wait for frames, take the ready ones (round robin), detect, track, judge."""
        waitables: list[Any] = [s.connection for s in self.sources if s.connection is not None]
        if waitables:
            mpc.wait(waitables, timeout=LOOP_TICK)
        elif self.synthetic:  # like waiting on the decoders' pipes: until the next frame is due
            delay = min(s.next_arrival() for s in self.synthetic) - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, LOOP_TICK))
        now = time.monotonic()
        for source in self.sources:
            source.drain()
            source.check(now)
        frames = self.scheduler.pick(self.sources)
        if frames:
            self._process(frames)
        wall = time.time()
        seen = {f.camera for f in frames}
        for name, camera in self.cameras.items():
            if name not in seen:
                self._count(camera.rules.expire(wall))
        self.metrics.loop_iterations.inc()

    def _process(self, frames: list[Frame]) -> None:
        timings: dict[str, float] = {}
        detections = self.detector.detect([f.image for f in frames], timings)
        done = time.time()
        rec = self.recorder
        stage = self.metrics.stage_duration
        for name, seconds in timings.items():
            stage.labels(name).observe(seconds)
            if rec.on:
                rec.stages[name].append(seconds)
        self.metrics.batch_size.observe(len(frames))
        if rec.on:
            rec.batches.append(len(frames))
        for frame, found in zip(frames, detections, strict=True):
            self.metrics.frames_processed.labels(frame.camera).inc()
            self.metrics.detect_latency.observe(max(0.0, done - frame.capture_time))
            steps: dict[str, float] = {}
            alerts = self.cameras[frame.camera].process(found, frame, steps)
            for name, seconds in steps.items():
                stage.labels(name).observe(seconds)
            self._count(alerts)
            if rec.on:
                for name, seconds in steps.items():
                    rec.stages[name].append(seconds)
                rec.to_detections.append(max(0.0, done - frame.capture_time))
                rec.to_alerts.append(max(0.0, time.time() - frame.capture_time))

    def _count(self, alerts: list[Alert]) -> None:
        if not self.recorder.on:
            return
        for alert in alerts:
            self.recorder.events["suppressed" if alert.suppressed else alert.event.type] += 1
