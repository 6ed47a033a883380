"""Tracking workers (``detect.workers``): real worker processes behind the daemon's ``PipelineStep``.

The detector is a stand-in (people walking across four cameras, a few boxes
each, moving a little every frame), so the tests can run many frames and kill
a worker at a chosen one; ByteTrack, the masks, zones and the alert rules are
the real ones, in the workers and the main process as in the daemon. The
daemon with workers on a real RTSP camera is in tests/test_daemon_e2e.py.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import supervision as sv

from monitor import workers as workers_module
from monitor.alerts import Alert
from monitor.camera import CameraPipeline
from monitor.detector import BatchTimings, Detected
from monitor.frames import Frame
from monitor.metrics import Metrics
from monitor.pipeline import PipelineStep
from monitor.settings import Settings
from monitor.topics import Topics
from monitor.workers import TrackingWorkers

CAMERAS = ("gate", "yard", "barn", "road")
IMAGE = np.zeros((360, 640, 3), np.uint8)
FPS = 10.0


class Walkers:
    """People crossing each camera: camera ``k`` shows ``k % 3 + 1`` of them, each visible for a while."""

    t = 0.0  # the time of the batch being detected

    def detect_timed(self, images, conf=None, keys=None, prepared=None):  # type: ignore[no-untyped-def]
        out = []
        for key in keys:
            n = CAMERAS.index(key)
            t = self.t
            boxes = []
            for person in range(n % 3 + 1):
                # Each person walks right for 6 s, then is gone for 2 s (the track ends), again.
                phase = (t + person * 1.7 + n) % 8.0
                if phase < 6.0:
                    x = 20 + 80 * person + 60 * phase
                    boxes.append([x, 100 + 60 * person, x + 40, 200 + 60 * person])
            out.append(
                sv.Detections(
                    xyxy=np.array(boxes, np.float32).reshape(-1, 4),
                    confidence=np.full(len(boxes), 0.9, np.float32),
                    class_id=np.zeros(len(boxes), int),
                    data={"class_name": np.array(["person"] * len(boxes), dtype=object)},
                )
            )
        return Detected(out, BatchTimings(0.0, 0.0, 0.0))


def _settings() -> Settings:
    return Settings.model_validate(
        {
            "model": {"path": "m.pt"},
            "detect": {"fps": FPS},
            "objects": {
                "track": ["person"],
                "max_disappeared": 0.5,
                "update_interval": 1.0,
                "filters": {"person": {"min_score": 0.5, "min_frames": 2}},
            },
            "cameras": {name: {"url": f"rtsp://cam/{name}"} for name in CAMERAS},
        }
    )


def _step(
    workers: TrackingWorkers | None, events: list[Alert], metrics: Metrics
) -> tuple[PipelineStep, Walkers]:
    config = _settings()
    cameras = {n: CameraPipeline(n, config, "m.pt@abc", Topics("p"), None) for n in CAMERAS}
    walkers = Walkers()
    step = PipelineStep(walkers, cameras, metrics, 0.25, on_alerts=events.extend, workers=workers)
    return step, walkers


def _run(step: PipelineStep, walkers: Walkers, first: int, last: int) -> None:
    """Frames ``first`` to ``last - 1`` of every camera, in batches of all four."""
    for n in range(first, last):
        walkers.t = n / FPS
        step.run([Frame(c, n, 1000.0 + n / FPS, IMAGE) for c in CAMERAS])


def _story(events: list[Alert]) -> dict[str, list[tuple[str, str, float]]]:
    """Each camera's events as (type, event id, frame time), in the order they came out."""
    story: dict[str, list[tuple[str, str, float]]] = {c: [] for c in CAMERAS}
    for alert in events:
        event = alert.event
        story[event.camera].append((event.type, event.event_id, event.frame_time))
    return story


def _track_ids(events: list[Alert], camera: str, kind: str | None = None) -> set[int]:
    return {a.event.track_id for a in events if a.event.camera == camera and kind in (None, a.event.type)}


def test_with_workers_each_cameras_events_are_the_same_and_in_frame_order():
    alone: list[Alert] = []
    step, walkers = _step(None, alone, Metrics())
    _run(step, walkers, 0, 200)
    spread: list[Alert] = []
    with TrackingWorkers(2) as workers:
        step, walkers = _step(workers, spread, Metrics())
        _run(step, walkers, 0, 200)
        assert len({*workers.pids()}) == 2
    kinds = lambda events: [(c, [(t, round(at, 3)) for t, _, at in s]) for c, s in _story(events).items()]  # noqa: E731
    assert kinds(spread) == kinds(alone)  # the same decisions as tracking in the main process
    for camera, story in _story(spread).items():
        times = [at for _, _, at in story]
        assert [t for t, _, _ in story].count("new") >= 2, camera  # several visits
        assert times == sorted(times), f"{camera}: events out of frame order"
        unended = 0
        for event_id in dict.fromkeys(i for _, i, _ in story):
            types = [t for t, i, _ in story if i == event_id]
            assert types[0] == "new", (camera, types)
            unended += types[-1] != "end"
        people = CAMERAS.index(camera) % 3 + 1
        assert unended <= people, camera  # only those still walking at the last frame


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_killed_or_hung_worker_is_restarted_its_tracks_end_and_its_cameras_keep_alerting(how, monkeypatch):
    """SIGKILL: the worker is gone. SIGSTOP: it never answers, so it is taken for hung and killed."""
    monkeypatch.setattr(workers_module, "ANSWER_TIMEOUT", 1.0)
    baseline: list[Alert] = []
    step, walkers = _step(None, baseline, Metrics())
    _run(step, walkers, 0, 120)
    events: list[Alert] = []
    metrics = Metrics()
    with TrackingWorkers(2, restarts=metrics.tracker_restarts.inc) as workers:
        step, walkers = _step(workers, events, metrics)
        _run(step, walkers, 0, 25)  # 2.5 s: every camera has an open event
        victim = workers.pids()[0]
        mark = len(events)
        os.kill(victim, how)
        _run(step, walkers, 25, 120)
        assert victim not in workers.pids()
        assert len(workers.pids()) == 2
    assert metrics.registry.get_sample_value("monitor_tracker_restarts_total") == 1
    before, after, expected = _story(events[:mark]), _story(events[mark:]), _story(baseline)
    # Cameras are dealt to the workers in the order first seen: gate and barn on the first.
    for camera in ("gate", "barn"):
        started = {i for t, i, _ in before[camera] if t == "new"}
        still_open = started - {i for t, i, _ in before[camera] if t == "end"}
        assert still_open, f"{camera}: no open event when the worker died"
        first = after[camera][: len(still_open)]
        assert [t for t, _, _ in first] == ["end"] * len(still_open), f"{camera}: its open events did not end"
        assert {i for _, i, _ in first} == still_open
        new_ids = [i for t, i, _ in after[camera] if t == "new"]
        assert new_ids, f"{camera} stopped alerting after its worker died"
        assert not set(new_ids) & started
        assert not _track_ids(events[mark:], camera, "new") & _track_ids(events[:mark], camera)  # no id back
    for camera in ("yard", "road"):  # on the other worker: exactly what tracking in-process decided
        assert [t for t, _, _ in before[camera] + after[camera]] == [t for t, _, _ in expected[camera]]


def test_workers_must_be_at_least_one():
    with pytest.raises(ValueError, match="count must be >= 1"):
        TrackingWorkers(0)
