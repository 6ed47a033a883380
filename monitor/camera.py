"""One camera's stages after the detector: masks and size filters, ByteTrack, zones, alert rules.

Shared by the daemon (one per camera), ``monitor bench`` and ``monitor
replay``, so all make exactly the same decisions. A frame goes through in two
halves, so that crops of every camera's frames of one batch can go through
the classifier together in between: ``track`` (masks, filters, ByteTrack,
zones, and which tracks to crop), then ``judge`` (the alert rules, given the
crops' classes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import supervision as sv

from monitor.alerts import Alert, AlertRules
from monitor.classifier import Classification
from monitor.frames import Frame
from monitor.settings import Settings
from monitor.topics import Topics
from monitor.tracking import CameraTracker
from monitor.zones import Regions


@dataclass(frozen=True, slots=True)
class Tracked:
    """One frame after ``track``.

    Attributes:
        frame: The frame.
        detections: Its tracked detections (``tracker_id`` set).
        zones: For each detection, the zones it stands in.
        wanted: Indices of the detections to classify (crops of ``frame.image``).
        seconds: Time ``track`` took.
    """

    frame: Frame
    detections: sv.Detections
    zones: list[list[str]]
    wanted: list[int]
    seconds: float


class CameraPipeline:
    """Detections of one camera's frames in, alerts out.

    Args:
        name: Camera name.
        settings: The whole configuration (the camera's entry must exist).
        model: Model identity reported in events.
        topics: The MQTT topic scheme (for snapshot topics).
        instance: The daemon's instance id, reported in events.
    """

    def __init__(
        self, name: str, settings: Settings, model: str, topics: Topics, instance: str | None
    ) -> None:
        camera = settings.cameras[name]
        objects = settings.objects.merged(camera.objects)
        #: What a tracking worker builds its copy from (``monitor.workers``): this camera only.
        self.spec = (name, settings.model_copy(update={"cameras": {name: camera}}), model, topics, instance)
        self.classifier = settings.classifier_for(name)
        self.rules = AlertRules(
            name,
            objects,
            model,
            topics,
            instance=instance,
            required_zones=camera.required_zones,
            zones={zone: z.coordinates for zone, z in camera.zones.items()},
            classifier=self.classifier,
        )
        sublabeler = self.rules.sublabeler
        # With a classifier, the labels it applies to are tracked too: it may name a tracked one.
        self.regions = Regions(camera, objects, also=sublabeler.applies if sublabeler is not None else None)
        labels = objects.track if sublabeler is None else None  # the regions chose already
        self.tracker = CameraTracker(settings.objects.tracker, settings.camera_fps(name), labels)
        self.track_ids: set[int] = set()  # every ByteTrack id seen (replay's summary)

    def track(self, detections: sv.Detections, frame: Frame) -> Tracked:
        """Masks, size filters, ByteTrack and zones for one frame, and the detections to crop."""
        height, width = frame.image.shape[:2]
        start = time.perf_counter()
        tracked, zones = self.locate(detections, frame.capture_time, height, width)
        return self.located(frame, tracked, zones, time.perf_counter() - start)

    def locate(
        self, detections: sv.Detections, capture_time: float, height: int, width: int
    ) -> tuple[sv.Detections, list[list[str]]]:
        """Masks, size filters, ByteTrack and zones: what needs only the detections (a worker's part)."""
        kept = self.regions.keep(detections, height, width)
        tracked = self.tracker.update(kept, capture_time)
        return tracked, self.regions.zones_of(tracked, height, width)

    def located(
        self, frame: Frame, tracked: sv.Detections, zones: list[list[str]], seconds: float
    ) -> Tracked:
        """``track``'s result from ``locate``'s (run here or by a worker): the detections to crop."""
        start = time.perf_counter()
        if tracked.tracker_id is not None:
            self.track_ids.update(tracked.tracker_id.tolist())
        wanted = self.rules.wanted(tracked, frame.capture_time)
        return Tracked(frame, tracked, zones, wanted, seconds + time.perf_counter() - start)

    def judge(self, tracked: Tracked, classes: Mapping[int, Classification] | None = None) -> Processed:
        """The alert rules on one tracked frame, given the classes of its ``wanted`` crops."""
        start = time.perf_counter()
        alerts = self.rules.update(tracked.detections, tracked.frame, tracked.zones, classes)
        return Processed(alerts, tracked.seconds, time.perf_counter() - start)

    def process(self, detections: sv.Detections, frame: Frame) -> Processed:
        """``track`` then ``judge``, without a classifier's results (their crops are asked again)."""
        return self.judge(self.track(detections, frame))


@dataclass(frozen=True, slots=True)
class Processed:
    """What one frame's camera stages gave: its alerts, and the seconds each stage took.

    Attributes:
        alerts: Events the frame caused, in order.
        tracking: Seconds for masks, size filters, ByteTrack and zones.
        rules: Seconds for the alert rules.
    """

    alerts: list[Alert]
    tracking: float
    rules: float

    def stages(self) -> dict[str, float]:
        """``{stage: seconds}`` under the names of ``monitor_stage_duration_seconds{stage=...}``."""
        return {"tracking": self.tracking, "alerts": self.rules}
