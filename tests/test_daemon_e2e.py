"""The whole daemon on real parts: GStreamer RTSP cameras, Mosquitto, real YOLOv8s weights."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import cv2
import numpy as np
import pytest

from monitor.alerts import Event
from tests.conftest import base_config, free_port, wait_until

pytestmark = pytest.mark.integration

EVENT_FIELDS = {
    "type",
    "event_id",
    "camera",
    "label",
    "sub_label",
    "sub_label_score",
    "score",
    "top_score",
    "box",
    "track_id",
    "start_time",
    "end_time",
    "frame_time",
    "model",
    "snapshot",
    "clip",  # null: these cameras do not record
    "clip_error",
    "instance",
    "category",
    "current_zones",
    "entered_zones",
    "stationary",
}


def test_two_rtsp_cameras_alert_person_over_mqtt_and_stop_cleanly(
    weights, tmp_path, broker, rtsp_server, subscriber_factory, daemon_factory
):
    events = subscriber_factory(broker.port, "test/#")
    config = base_config(
        weights,
        tmp_path,
        broker.port,
        free_port(),
        cameras={
            "cam1": {"url": rtsp_server.url("cam1")},
            "cam2": {"url": rtsp_server.url("cam2")},
        },
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    daemon = daemon_factory(
        config, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    )
    # systemd's protocol: READY=1 once warmed up, then WATCHDOG=1 from the loop.
    assert notify.recv(4096) == b"READY=1"
    assert notify.recv(4096).startswith(b"WATCHDOG=1\nSTATUS=")

    new = events.wait_for(
        lambda m: m.topic == "test/events" and json.loads(m.payload)["type"] == "new", 60, "a new event"
    )
    payload = json.loads(new.payload)
    assert set(payload) == EVENT_FIELDS
    event = Event.model_validate(payload)
    assert event.label == "person"
    assert event.camera in {"cam1", "cam2"}
    x1, y1, x2, y2 = event.box
    assert 0 <= x1 < x2 <= 768, event.box
    assert 0 <= y1 < y2 <= 576, event.box
    assert 0.35 <= event.score <= event.top_score <= 1
    assert event.start_time <= event.frame_time <= time.time()
    assert event.end_time is None
    assert event.snapshot == f"test/{event.camera}/person/snapshot"

    assert event.category == "person"
    # The same event on the camera's per-category topic, for subscribers who want only people.
    copy = events.wait_for(
        lambda m: (
            m.topic == f"test/{event.camera}/person"
            and (json.loads(m.payload)["event_id"], json.loads(m.payload)["type"]) == (event.event_id, "new")
        ),
        10,
        "the per-category copy",
    )
    assert Event.model_validate_json(copy.payload) == event
    events.wait_for(lambda m: m.topic == event.snapshot, 10, "the snapshot")
    late = subscriber_factory(broker.port, event.snapshot)  # subscribes after: gets the retained copy
    snap = late.wait_for(lambda m: m.retain, 10, "the retained snapshot")
    image = cv2.imdecode(np.frombuffer(snap.payload, np.uint8), cv2.IMREAD_COLOR)
    served = urllib.request.urlopen(
        f"http://127.0.0.1:{daemon.http_port}/api/events/{event.event_id}/snapshot.jpg", timeout=5
    ).read()
    assert served[:2] == b"\xff\xd8"
    assert image is not None
    assert image.shape == (576, 768, 3)

    # The PUBACK of that event has been counted: capture -> PUBACK latency.
    wait_until(
        lambda: daemon.metrics()["monitor_alert_latency_seconds_count"] >= 1, 10, "alert latency samples"
    )
    before = daemon.metrics()
    wait_until(
        lambda: all(
            daemon.metrics()[f'monitor_camera_frames_processed_total{{camera="{c}"}}']
            > before[f'monitor_camera_frames_processed_total{{camera="{c}"}}']
            for c in ("cam1", "cam2")
        ),
        15,
        "processed-frame counters of both cameras to rise",
    )
    after = daemon.metrics()
    for camera in ("cam1", "cam2"):
        assert after[f'monitor_camera_frames_total{{camera="{camera}"}}'] > 0
        assert after[f'monitor_camera_up{{camera="{camera}"}}'] == 1
    assert after[f'monitor_events_total{{camera="{event.camera}",label="person",type="new"}}'] >= 1

    # Two cameras at the same fps share forward passes.
    assert after["monitor_batch_size_count"] > after['monitor_batch_size_bucket{le="1.0"}'], (
        "every forward pass held a single frame"
    )

    status = events.wait_for(lambda m: m.topic == "test/cam1/status", 5, "cam1's status")
    assert json.loads(status.payload)["state"] in {"starting", "online"}

    started = time.monotonic()
    assert daemon.terminate(timeout=10) == 0
    assert time.monotonic() - started < 10
    events.wait_for(lambda m: m.topic == "test/available" and m.payload == b"offline", 5, "available=offline")
    # Every track that got a `new` also got its `end` before `offline`.
    events.drain()
    bodies = [json.loads(m.payload) for m in events.seen if m.topic == "test/events"]
    news = {b["event_id"] for b in bodies if b["type"] == "new"}
    ends = {b["event_id"] for b in bodies if b["type"] == "end"}
    assert news
    assert news <= ends
    notify.close()


def test_with_tracking_workers_a_killed_worker_is_restarted_and_the_camera_keeps_alerting(
    weights, tmp_path, broker, rtsp_server, subscriber_factory, daemon_factory
):
    """``detect.workers``: the camera's tracks run in a worker process; kill -9 it mid-visit."""
    import psutil

    events = subscriber_factory(broker.port, "test/events")
    config = base_config(
        weights,
        tmp_path,
        broker.port,
        free_port(),
        detect={"fps": 4, "max_batch": 8, "workers": 1},
        cameras={"cam1": {"url": rtsp_server.url("cam1")}},
    )
    daemon = daemon_factory(config)

    def kind(m, type_):  # type: ignore[no-untyped-def]
        return json.loads(m.payload)["type"] == type_

    first = json.loads(events.wait_for(lambda m: kind(m, "new"), 60, "a new event").payload)
    (worker,) = [
        p for p in psutil.Process(daemon.proc.pid).children(recursive=True) if p.name() == "monitor-track0"
    ]
    killed_at = time.time()
    worker.kill()
    # Its open track ends (the new worker knows nothing of it), and the camera alerts again.
    end = events.wait_for(
        lambda m: kind(m, "end") and json.loads(m.payload)["event_id"] == first["event_id"], 30, "its end"
    )
    assert json.loads(end.payload)["camera"] == "cam1"
    events.wait_for(  # a track the new worker started: the camera alerts again
        lambda m: kind(m, "new") and json.loads(m.payload)["start_time"] > killed_at,
        60,
        "a new track's event",
    )
    wait_until(lambda: "tracking worker 0 failed" in daemon.log(), 10, "the worker's failure in the log")
    assert daemon.metrics()["monitor_tracker_restarts_total"] == 1
    (restarted,) = [
        p for p in psutil.Process(daemon.proc.pid).children(recursive=True) if p.name() == "monitor-track0"
    ]
    assert restarted.pid != worker.pid
    assert daemon.terminate(timeout=10) == 0
