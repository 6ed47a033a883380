"""One step of the pipeline, the same in the daemon, ``monitor bench`` and ``monitor replay``.

A step takes the frames the scheduler picked (and, in the daemon, uploaded
pictures riding along), runs them through the detector in one batch, then
each frame through its camera's tracking (masks, ByteTrack, zones), the crops
of every frame's tracks that are due through the classifier in one batch
(when there is one), and each frame through its camera's alert rules,
observing every stage in the metrics. What happens to the alerts is
the caller's: the daemon publishes them, the bench counts them, replay keeps
them. So the numbers the bench reports describe the daemon's own code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np
import supervision as sv

from monitor.alerts import Alert
from monitor.camera import CameraPipeline, Tracked
from monitor.classifier import Classification, Classifier
from monitor.detector import Detected
from monitor.frames import Frame
from monitor.letterbox import Letterboxed
from monitor.metrics import Metrics
from monitor.workers import Job, TrackingWorkers, pack

logger = logging.getLogger(__name__)
#: Seconds between two log lines of a failing classifier.
_CLASSIFIER_LOG_EVERY = 60.0


class StepObserver(Protocol):
    """Sees what a step measured (the bench records it; the daemon needs only the metrics)."""

    def batch(self, stages: Mapping[str, float], size: int) -> None:
        """One forward pass: seconds per detector stage, and the images in it."""
        ...

    def classified(self, seconds: float, crops: int) -> None:
        """One classifier pass over the step's crops: its seconds and the crops in it."""
        ...

    def frame(
        self, frame: Frame, detected_at: float, stages: Mapping[str, float], alerts: list[Alert]
    ) -> None:
        """One camera frame after its camera's stages.

        Args:
            frame: The frame.
            detected_at: Wall-clock time its detections were ready.
            stages: Seconds per stage (tracking, alerts, and publish when it raised alerts).
            alerts: What it raised.
        """
        ...


class Detects(Protocol):
    """What the step needs of a detector: ``Detector``, or the bench's null runtime."""

    def detect_timed(
        self,
        images: list[np.ndarray],
        conf: float | None = None,
        keys: Sequence[str | None] | None = None,
        prepared: Sequence[Letterboxed | None] | None = None,
    ) -> Detected: ...


class PipelineStep:
    """Detect a batch, then track and judge each frame; alerts go to ``on_alerts``.

    Args:
        detector: The model.
        cameras: Each camera's stages after the detector, by name (the caller may change it).
        metrics: Stage durations, batch sizes, processed frames and detection latency.
        floor: ``model.conf``: detections below it never reach the cameras' stages.
        on_alerts: Receives each frame's alerts (timed as the ``publish`` stage).
        observer: Sees the measurements too.
        classifier: Names the crops the cameras ask for (none: cameras get no sub_labels).
        workers: Track the frames in worker processes (``detect.workers``) instead of here.
    """

    def __init__(
        self,
        detector: Detects,
        cameras: Mapping[str, CameraPipeline],
        metrics: Metrics,
        floor: float,
        on_alerts: Callable[[list[Alert]], None],
        observer: StepObserver | None = None,
        classifier: Classifier | None = None,
        workers: TrackingWorkers | None = None,
    ) -> None:
        self.detector = detector
        self.workers = workers
        self.classifier = classifier
        self._classifier_failed_at = float("-inf")
        self.cameras = cameras
        self.metrics = metrics
        self.floor = floor
        self.on_alerts = on_alerts
        self.observer = observer

    def run(
        self,
        frames: Sequence[Frame],
        pictures: Sequence[np.ndarray] = (),
        conf: float | None = None,
        on_pictures: Callable[[list[sv.Detections]], None] | None = None,
    ) -> None:
        """Run one batch: ``frames`` through every stage, ``pictures`` through the detector only.

        Args:
            frames: Camera frames; several of one camera go through its stages in this order.
            pictures: Other images for the same forward pass (uploads).
            conf: The lowest confidence the pictures' callers want (below ``floor`` widens the pass).
            on_pictures: Receives the pictures' detections (in order, at ``min(floor, conf)``)
                as soon as the forward pass is done, before the frames' own stages.

        The frames are released at the end (``Frame.release``): their decoders may
        write into their slots again.

        Raises:
            Exception: Whatever the detector raised (nothing of the frames was processed).
        """
        try:
            self._run(frames, pictures, conf, on_pictures)
        finally:
            for frame in frames:
                frame.release()

    def _run(
        self,
        frames: Sequence[Frame],
        pictures: Sequence[np.ndarray],
        conf: float | None,
        on_pictures: Callable[[list[sv.Detections]], None] | None,
    ) -> None:
        images = [f.image for f in frames] + list(pictures)
        floor = self.floor if conf is None else min(self.floor, conf)
        keys = [f.camera for f in frames] + [None] * len(pictures)
        prepared = [f.net for f in frames] + [None] * len(pictures)
        detected = self.detector.detect_timed(images, conf=floor, keys=keys, prepared=prepared)
        done = time.time()
        stage = self.metrics.stage
        batch_stages = detected.timings.stages()
        for name, seconds in batch_stages.items():
            stage(name).observe(seconds)
        self.metrics.batch_size.observe(len(images))
        if self.observer is not None:
            self.observer.batch(batch_stages, len(images))
        if on_pictures is not None:
            on_pictures(detected.detections[len(frames) :])
        found = detected.detections[: len(frames)]
        latency = self.metrics.detect_latency
        for frame in frames:
            self.metrics.processed(frame.camera).inc()
            latency.observe(max(0.0, done - frame.capture_time))
        tracked = self._track(frames, [at_least(f, self.floor) for f in found])
        classes = self._classify(tracked)
        for item, named in zip(tracked, classes, strict=True):
            frame = item.frame
            processed = self.cameras[frame.camera].judge(item, named)
            steps, alerts = processed.stages(), processed.alerts
            if alerts:
                started = time.perf_counter()
                self.on_alerts(alerts)
                steps["publish"] = time.perf_counter() - started
            for name, seconds in steps.items():
                stage(name).observe(seconds)
            if self.observer is not None:
                self.observer.frame(frame, done, steps, alerts)

    def _track(self, frames: Sequence[Frame], found: list[sv.Detections]) -> list[Tracked]:
        """Each frame through its camera's ``track``: here, or on its camera's worker."""
        workers = self.workers
        if workers is None:
            return [self.cameras[f.camera].track(d, f) for f, d in zip(frames, found, strict=True)]
        jobs = []
        for frame, detections in zip(frames, found, strict=True):
            height, width = frame.image.shape[:2]
            job = Job(frame.camera, pack(detections), frame.capture_time, height, width)
            jobs.append((self.cameras[frame.camera], job))
        located = workers.locate(jobs, self._tracks_lost)
        return [
            self.cameras[f.camera].located(f, d, zones, seconds)
            for f, (d, zones, seconds) in zip(frames, located, strict=True)
        ]

    def _tracks_lost(self, names: list[str]) -> None:
        """A tracking worker was restarted: its cameras' open tracks end now (their ``end`` goes out)."""
        ended = [a for n in names if n in self.cameras for a in self.cameras[n].rules.expire(float("inf"))]
        if ended:
            self.on_alerts(ended)

    def _classify(self, tracked: list[Tracked]) -> list[dict[int, Classification]]:
        """The classes of every frame's wanted crops, in one batch (chunks of ``max_batch``).

        A classifier that fails costs the sub_labels of this step, never its alerts:
        the crops are asked for again later, and the failure is logged once a minute.
        """
        named: list[dict[int, Classification]] = [{} for _ in tracked]
        classifier = self.classifier
        if classifier is None or not any(t.wanted for t in tracked):
            return named
        started = time.perf_counter()
        crops, owners = [], []
        for n, item in enumerate(tracked):
            if item.wanted:
                crops += classifier.crops(item.frame.image, item.detections.xyxy[item.wanted].tolist())
                owners += [(n, i) for i in item.wanted]
        results: list[Classification] = []
        try:
            for first in range(0, len(crops), classifier.max_batch):
                results += classifier.classify(crops[first : first + classifier.max_batch])
        except Exception:
            if started - self._classifier_failed_at >= _CLASSIFIER_LOG_EVERY:
                self._classifier_failed_at = started
                logger.exception(
                    "the classifier failed on %d crop(s); events go out without sub_labels", len(crops)
                )
            return named
        for (n, i), result in zip(owners, results, strict=True):
            named[n][i] = result
            self.metrics.classifier_crops.labels(tracked[n].frame.camera).inc()
        seconds = time.perf_counter() - started
        self.metrics.stage("classify").observe(seconds)
        if self.observer is not None:
            self.observer.classified(seconds, len(crops))
        return named


def at_least(detections: sv.Detections, conf: float) -> sv.Detections:
    """The detections scoring ``conf`` or more."""
    if detections.confidence is None or len(detections) == 0:
        return detections
    keep = detections.confidence >= conf
    if keep.all():  # the usual case: no copy (supervision's indexing costs tens of microseconds)
        return detections
    kept: sv.Detections = detections[keep]  # type: ignore[assignment]
    return kept
