"""One camera's stages after the detector: masks and size filters, ByteTrack, zones, alert rules.

Shared by the daemon (one per camera) and ``monitor replay`` (one for the
file), so both make exactly the same decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import supervision as sv

from monitor.alerts import Alert, AlertRules
from monitor.frames import Frame
from monitor.settings import Settings
from monitor.topics import Topics
from monitor.tracking import CameraTracker
from monitor.zones import Regions


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
        self.regions = Regions(camera, objects)
        self.tracker = CameraTracker(settings.objects.tracker, settings.camera_fps(name), objects.track)
        self.rules = AlertRules(
            name,
            objects,
            model,
            topics,
            instance=instance,
            required_zones=camera.required_zones,
            zones={zone: z.coordinates for zone, z in camera.zones.items()},
        )
        self.track_ids: set[int] = set()  # every ByteTrack id seen (replay's summary)

    def process(self, detections: sv.Detections, frame: Frame) -> Processed:
        """Track one frame's detections and apply the alert rules."""
        height, width = frame.image.shape[:2]
        start = time.perf_counter()
        kept = self.regions.keep(detections, height, width)
        tracked = self.tracker.update(kept, frame.capture_time)
        if tracked.tracker_id is not None:
            self.track_ids.update(int(i) for i in tracked.tracker_id)
        tracked_at = time.perf_counter()
        alerts = self.rules.update(tracked, frame, self.regions.zones_of(tracked, height, width))
        return Processed(alerts, tracked_at - start, time.perf_counter() - tracked_at)


@dataclass(frozen=True, slots=True)
class Processed:
    """What one frame's camera stages gave: its alerts, and the seconds each stage took.

    Attributes:
        alerts: Events the frame caused, in order.
        tracking: Seconds for masks, size filters and ByteTrack.
        rules: Seconds for zones and the alert rules.
    """

    alerts: list[Alert]
    tracking: float
    rules: float

    def stages(self) -> dict[str, float]:
        """``{stage: seconds}`` under the names of ``monitor_stage_duration_seconds{stage=...}``."""
        return {"tracking": self.tracking, "alerts": self.rules}
