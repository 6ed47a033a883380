"""Prometheus metrics: prefix ``monitor_``, base units, counters end in ``_total``.

The only label with per-deployment values is ``camera`` (bounded by the
configuration); URLs and track ids are never labels. Each daemon owns one
``Metrics`` with its own registry, so tests can run several side by side.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from monitor import __version__

SUPPRESSION_REASONS = ("cooldown", "rate_limit")
STAGES = ("preprocess", "inference", "postprocess", "tracking", "classify", "alerts", "publish")
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._stages: dict[str, Histogram] = {}
        self._processed: dict[str, Counter] = {}
        Info("monitor_build", "Version of the daemon.", registry=r).info({"version": __version__})
        self.alert_latency = Histogram(
            "monitor_alert_latency_seconds",
            "Frame capture (leaving the decoder) to the broker's PUBACK of its event.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.detect_latency = Histogram(
            "monitor_detect_latency_seconds",
            "Frame capture to detections ready (queueing, preprocess, inference, NMS).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "monitor_stage_duration_seconds",
            "Time per pipeline stage, per batch (tracking, alerts: per frame; classify: per batch of crops).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "monitor_batch_size", "Frames per forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.frames = Counter(
            "monitor_camera_frames", "Frames delivered by the decoder.", ["camera"], registry=r
        )
        self.frames_processed = Counter(
            "monitor_camera_frames_processed", "Frames run through the detector.", ["camera"], registry=r
        )
        self.frames_dropped = Counter(
            "monitor_camera_frames_dropped",
            "Frames replaced by a newer one before the detector took them.",
            ["camera"],
            registry=r,
        )
        self.events = Counter("monitor_events", "Events emitted.", ["camera", "label", "type"], registry=r)
        self.events_suppressed = Counter(
            "monitor_events_suppressed",
            "Events not sent: reason cooldown (per camera and label) or rate_limit (per camera).",
            ["camera", "reason"],
            registry=r,
        )
        self.camera_up = Gauge(
            "monitor_camera_up", "1 while the camera delivers frames.", ["camera"], registry=r
        )
        self.camera_enabled = Gauge(
            "monitor_camera_enabled",
            "1 unless the camera is configured enabled: false (then monitor_camera_up stays 0).",
            ["camera"],
            registry=r,
        )
        self.camera_reconnects = Counter(
            "monitor_camera_reconnects", "Decoder restarts.", ["camera"], registry=r
        )
        self.camera_frame_age = Gauge(
            "monitor_camera_last_frame_age_seconds",
            "Seconds since the camera's last frame.",
            ["camera"],
            registry=r,
        )
        self.mqtt_connected = Gauge("monitor_mqtt_connected", "1 while connected to the broker.", registry=r)
        self.spool_pending = Gauge(
            "monitor_spool_pending", "Messages stored on disk and not yet acknowledged.", registry=r
        )
        self.spool_dropped = Counter(
            "monitor_spool_dropped",
            "Messages dropped from the spool before their PUBACK (spool.max_events or spool.max_age).",
            registry=r,
        )
        self.mqtt_refused = Counter(
            "monitor_mqtt_publish_refused",
            "Spooled messages the broker refused in its PUBACK (MQTT 5 only, e.g. denied by its ACL).",
            registry=r,
        )
        self.spool_degraded = Gauge(
            "monitor_spool_degraded",
            "1 while the spool cannot be written (full or read-only disk): events are sent directly "
            "and wait in memory for their PUBACK.",
            registry=r,
        )
        self.spool_bypassed = Counter(
            "monitor_spool_bypassed",
            "Messages sent without the spool because it could not be written (held in memory instead).",
            registry=r,
        )
        self.spool_bypass_dropped = Counter(
            "monitor_spool_bypass_dropped",
            "Messages held in memory (spool not writable) dropped past the memory bound before their PUBACK.",
            registry=r,
        )
        self.spool_quarantined = Counter(
            "monitor_spool_quarantined",
            "Messages MQTT can never carry (e.g. a wildcard in the topic), taken out of the spool.",
            registry=r,
        )
        self.snapshot_save_failures = Counter(
            "monitor_snapshot_save_failures",
            "Event snapshots the on-disk store could not write (the event is still published).",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "monitor_spool_oldest_age_seconds",
            "Age of the oldest message in the spool; 0 when it is empty.",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "monitor_gpu_memory_bytes", "GPU memory reserved by the detector (0 on the CPU).", registry=r
        )
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds... of this process.
        ProcessCollector(registry=r)
        self.ready = Gauge("monitor_ready", "1 once the model is loaded and warmed up.", registry=r)
        self.classifier_crops = Counter(
            "monitor_classifier_crops",
            "Crops of tracked objects the classifier named.",
            ["camera"],
            registry=r,
        )
        self.loop_iterations = Counter(
            "monitor_loop_iterations", "Iterations of the pipeline loop.", registry=r
        )
        for stage in STAGES:
            self.stage_duration.labels(stage)
        # The families with a camera label.
        self.recording_bytes = Gauge(
            "monitor_recording_bytes", "Bytes of recording segments and clips on disk.", registry=r
        )
        self.clips = Counter("monitor_clips", "Clips of events and visits made.", ["camera"], registry=r)
        self.clip_failures = Counter(
            "monitor_clip_failures",
            "Clips that could not be made (the end event's clip_error), by reason.",
            ["camera", "reason"],
            registry=r,
        )
        self.recording_segments_dropped = Counter(
            "monitor_recording_segments_dropped",
            "Recording segments not written (disk full, read-only) or deleted to stay within retention.",
            registry=r,
        )
        self.tracker_restarts = Counter(
            "monitor_tracker_restarts",
            "Tracking worker processes (detect.workers) restarted after dying or hanging.",
            registry=r,
        )
        self.reviews = Counter(
            "monitor_reviews", "Visit (review item) messages emitted.", ["camera", "type"], registry=r
        )
        self._per_camera = (
            self.frames,
            self.frames_processed,
            self.frames_dropped,
            self.camera_reconnects,
            self.camera_up,
            self.camera_enabled,
            self.camera_frame_age,
            self.events,
            self.events_suppressed,
            self.classifier_crops,
            self.clips,
            self.clip_failures,
            self.reviews,
        )

    def stage(self, name: str) -> Histogram:
        """``stage_duration``'s series of one stage (kept: ``labels`` costs a lookup and a lock a call)."""
        child = self._stages.get(name)
        if child is None:
            child = self._stages[name] = self.stage_duration.labels(name)
        return child

    def processed(self, camera: str) -> Counter:
        """``frames_processed``'s series of one camera (kept until ``remove_camera``)."""
        child = self._processed.get(camera)
        if child is None:
            child = self._processed[camera] = self.frames_processed.labels(camera)
        return child

    def add_camera(self, camera: str) -> None:
        """Create the camera's series at zero so dashboards see it before its first frame."""
        for family in (
            self.frames,
            self.frames_processed,
            self.frames_dropped,
            self.camera_reconnects,
            self.classifier_crops,
            self.clips,
        ):
            family.labels(camera)
        for reason in SUPPRESSION_REASONS:
            self.events_suppressed.labels(camera, reason)
        self.camera_up.labels(camera).set(0)

    def remove_camera(self, camera: str) -> None:
        """Drop every series of a camera (after it was removed from the configuration)."""
        for family in self._per_camera:
            family.remove_by_labels({"camera": camera})
        self._processed.pop(camera, None)
