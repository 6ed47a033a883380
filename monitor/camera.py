"""One camera's stages after the detector: masks and size filters, ByteTrack, zones, alert rules.

Shared by the daemon (one per camera) and ``monitor replay`` (one for the
file), so both make exactly the same decisions.
"""

from __future__ import annotations

import time

import supervision as sv

from monitor.alerts import Alert, AlertRules
from monitor.settings import Settings
from monitor.sources import Frame
from monitor.topics import Topics
from monitor.tracking import CameraTracker
from monitor.zones import Regions


class CameraPipeline:
    """Detections of one camera's frames in, alerts out.

    Args:
        name: Camera name.
        settings: The whole configuration (the camera's entry must exist).
        model: Model identity reported in events.
        topics: The MQTT topic scheme (for snapshot topics). A bare prefix is taken as
            ``Topics(prefix)``, for callers that publish nothing (replay, bench).
        instance: The daemon's instance id, reported in events.
    """

    def __init__(
        self, name: str, settings: Settings, model: str, topics: Topics | str, instance: str | None
    ) -> None:
        camera = settings.cameras[name]
        objects = settings.objects.merged(camera.objects)
        self.regions = Regions(camera, objects)
        self.tracker = CameraTracker(settings.objects.tracker, settings.camera_fps(name), objects.track)
        self.rules = AlertRules(
            name,
            objects,
            model,
            topics if isinstance(topics, Topics) else Topics(topics),
            instance=instance,
            required_zones=camera.required_zones,
            zones={zone: z.coordinates for zone, z in camera.zones.items()},
        )
        self.track_ids: set[int] = set()  # every ByteTrack id seen (replay's summary)

    def process(
        self, detections: sv.Detections, frame: Frame, timings: dict[str, float] | None = None
    ) -> list[Alert]:
        """Track one frame's detections and apply the alert rules."""
        height, width = frame.image.shape[:2]
        start = time.perf_counter()
        kept = self.regions.keep(detections, height, width)
        tracked = self.tracker.update(kept, frame.capture_time)
        if tracked.tracker_id is not None:
            self.track_ids.update(int(i) for i in tracked.tracker_id)
        tracked_at = time.perf_counter()
        alerts = self.rules.update(tracked, frame, self.regions.zones_of(tracked, height, width))
        if timings is not None:
            timings["tracking"] = tracked_at - start
            timings["alerts"] = time.perf_counter() - tracked_at
        return alerts
