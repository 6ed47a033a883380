"""The metrics contract a Prometheus user relies on: names, units, label sets, per-camera series.

Dashboards and alert rules are written against these names (config/grafana,
config/prometheus): a rename, a unit that is not the base unit, or a label
without a bound (a URL, a track id) breaks them or the Prometheus server.
"""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import Metrics

#: Label names with a bounded set of values (cameras come from the configuration).
BOUNDED_LABELS = {"camera", "label", "type", "stage", "reason", "version"}
#: Families that measure time: base unit seconds.
SECONDS = {
    "monitor_alert_latency_seconds",
    "monitor_detect_latency_seconds",
    "monitor_stage_duration_seconds",
    "monitor_camera_last_frame_age_seconds",
    "monitor_spool_oldest_age_seconds",
}
#: Families that measure memory or disk: base unit bytes.
BYTES = {"monitor_gpu_memory_bytes", "monitor_recording_bytes"}
#: Counts of things, and 0/1 states: no unit.
UNITLESS = {
    "monitor_build",
    "monitor_batch_size",
    "monitor_camera_frames",
    "monitor_camera_frames_processed",
    "monitor_camera_frames_dropped",
    "monitor_events",
    "monitor_classifier_crops",
    "monitor_events_suppressed",
    "monitor_camera_up",
    "monitor_camera_enabled",
    "monitor_camera_reconnects",
    "monitor_mqtt_connected",
    "monitor_spool_pending",
    "monitor_spool_dropped",
    "monitor_mqtt_publish_refused",
    "monitor_spool_degraded",
    "monitor_spool_bypassed",
    "monitor_spool_bypass_dropped",
    "monitor_spool_quarantined",
    "monitor_snapshot_save_failures",
    "monitor_ready",
    "monitor_loop_iterations",
    "monitor_clips",
    "monitor_clip_failures",
    "monitor_recording_segments_dropped",
    "monitor_reviews",
    "monitor_tracker_restarts",
}
#: Series that ``add_camera`` creates at zero.
CAMERA_SERIES = [
    ("monitor_camera_frames_total", {}),
    ("monitor_camera_frames_processed_total", {}),
    ("monitor_camera_frames_dropped_total", {}),
    ("monitor_camera_reconnects_total", {}),
    ("monitor_camera_up", {}),
    ("monitor_events_suppressed_total", {"reason": "cooldown"}),
    ("monitor_events_suppressed_total", {"reason": "rate_limit"}),
]


def exported(metrics: Metrics) -> dict[str, str]:
    """Family name -> type, of everything the registry exports."""
    return {f.name: f.type for f in metrics.registry.collect()}


def scraped(metrics: Metrics) -> list[tuple[str, str, dict[str, str]]]:
    """(family type, sample name, labels) of each sample, as a scrape of ``/metrics`` reads them."""
    text = generate_latest(metrics.registry).decode()
    return [(f.type, s.name, s.labels) for f in text_string_to_metric_families(text) for s in f.samples]


def families(metrics: Metrics) -> dict[str, MetricWrapperBase]:
    return {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}


def test_every_family_is_one_the_dashboards_know_by_that_name():
    names = {n for n in exported(Metrics()) if not n.startswith(("process_", "python_"))}
    assert names == SECONDS | BYTES | UNITLESS, "a metric was renamed, or a new one is not in the tables"


@pytest.mark.parametrize("name", sorted(exported(Metrics())))
def test_every_family_starts_with_monitor_and_ends_in_the_base_unit_it_measures(name):
    if name.startswith(("process_", "python_")):  # prometheus_client's own collectors
        return
    assert name.startswith("monitor_")
    if name in SECONDS:
        assert name.endswith("_seconds")
    elif name in BYTES:
        assert name.endswith("_bytes")
    else:
        assert not name.endswith(("_seconds", "_milliseconds", "_ms", "_bytes", "_kb", "_mb")), name


def test_counters_end_in_total_and_nothing_else_does():
    metrics = Metrics()
    metrics.add_camera("gate")
    metrics.events.labels("gate", "deer", "new").inc()
    samples = scraped(metrics)
    counters = {name for kind, name, _ in samples if kind == "counter"}
    assert "monitor_events_total" in counters
    assert all(name.endswith("_total") for name in counters), counters
    others = {name for kind, name, _ in samples if kind != "counter" and not name.endswith("_created")}
    assert not any(name.endswith("_total") for name in others), others


@pytest.mark.parametrize("name", sorted(families(Metrics())))
def test_labels_come_only_from_a_bounded_set(name):
    labels = set(families(Metrics())[name]._labelnames)
    assert labels <= BOUNDED_LABELS, f"{name} has unbounded labels {labels - BOUNDED_LABELS}"


def test_add_camera_creates_its_series_at_zero_and_no_other_cameras():
    metrics = Metrics()
    metrics.add_camera("gate")
    sample = metrics.registry.get_sample_value
    for name, labels in CAMERA_SERIES:
        assert sample(name, {"camera": "gate", **labels}) == 0, name
        assert sample(name, {"camera": "yard", **labels}) is None, name


def cameras_in(metrics: Metrics) -> set[str]:
    return {labels["camera"] for _, _, labels in scraped(metrics) if "camera" in labels}


def test_remove_camera_drops_every_series_of_that_camera_and_keeps_the_others():
    metrics = Metrics()
    for camera in ("gate", "yard"):
        metrics.add_camera(camera)
        metrics.frames.labels(camera).inc()
        metrics.camera_enabled.labels(camera).set(1)
        metrics.camera_frame_age.labels(camera).set(0.5)
        metrics.events.labels(camera, "deer", "new").inc()
        metrics.events_suppressed.labels(camera, "cooldown").inc()
    assert cameras_in(metrics) == {"gate", "yard"}
    metrics.remove_camera("gate")
    assert cameras_in(metrics) == {"yard"}
    assert (
        metrics.registry.get_sample_value(
            "monitor_events_total", {"camera": "yard", "label": "deer", "type": "new"}
        )
        == 1
    )
    metrics.remove_camera("gate")  # again, or a camera that never had a sample: nothing to do


def test_remove_camera_drops_every_family_that_has_a_camera_label():
    metrics = Metrics()
    with_camera = [f for f in families(metrics).values() if "camera" in f._labelnames]
    for family in with_camera:
        family.labels(*["gate" for _ in family._labelnames])
    metrics.remove_camera("gate")
    assert cameras_in(metrics) == set()
