"""Alert rules, stepped frame by frame with hand-made tracked detections."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import supervision as sv

from monitor.alerts import Alert, AlertRules
from monitor.camera import CameraPipeline
from monitor.dispatch import Dispatcher
from monitor.frames import Frame
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.recorder import Recorder
from monitor.settings import FilterSettings, ObjectsSettings, Settings
from monitor.snapshots import SnapshotStore
from monitor.spool import Spool
from monitor.topics import Topics
from tests.conftest import wait_until

IMAGE = np.zeros((120, 160, 3), np.uint8)


def tracked(*objects: tuple[int, float, str]) -> sv.Detections:
    """Detections with tracker ids: (track_id, score, label)."""
    if not objects:
        return sv.Detections.empty()
    return sv.Detections(
        xyxy=np.array([[10 + i, 10, 50 + i, 90] for i, _, _ in objects], dtype=np.float32),
        confidence=np.array([s for _, s, _ in objects], dtype=np.float32),
        class_id=np.zeros(len(objects), dtype=int),
        tracker_id=np.array([i for i, _, _ in objects]),
        data={"class_name": np.array([label for _, _, label in objects], dtype=object)},
    )


def frame(t: float) -> Frame:
    return Frame("gate", int(t * 10), t, IMAGE)


@pytest.fixture
def rules() -> AlertRules:
    objects = ObjectsSettings(
        track=["person", "deer"],
        filters={"person": FilterSettings(min_score=0.4, threshold=0.6)},
        score_history=3,
        update_interval=2.0,
        max_disappeared=1.0,
    )
    return AlertRules("gate", objects, "m.pt@abc", Topics("p"))


def test_new_needs_the_median_over_threshold(rules):
    assert rules.update(tracked((1, 0.9, "person")), frame(0.0))  # median of [0.9]
    assert not AlertRules("g", rules.objects, "m", Topics("p")).update(
        tracked((1, 0.5, "person")), frame(0.0)
    )


def test_one_good_frame_among_misses_does_not_alert(rules):
    assert rules.update(tracked((1, 0.5, "person")), frame(0.0)) == []
    assert rules.update(tracked((1, 0.3, "person")), frame(0.2)) == []  # under min_score: counts 0
    alerts = rules.update(tracked((1, 0.95, "person")), frame(0.4))  # median(0.5, 0, 0.95) = 0.5
    assert alerts == []


def test_alert_not_repeated_while_track_persists(rules):
    kinds = []
    for step in range(10):
        kinds += [a.event.type for a in rules.update(tracked((7, 0.8, "person")), frame(step * 0.2))]
    assert kinds == ["new"]


def test_update_on_better_score_is_rate_limited(rules):
    events = []
    scores = [0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    for step, score in enumerate(scores):  # 0.5 s apart
        events += rules.update(tracked((3, score, "person")), frame(step * 0.5))
    assert [a.event.type for a in events] == ["new", "update"]
    update = events[1].event
    assert update.frame_time - events[0].event.frame_time >= 2.0
    assert update.top_score == pytest.approx(0.9, abs=1e-3)  # first better score 2 s after new
    assert update.snapshot == "p/gate/person/snapshot"  # a better score brings a better picture


def test_end_after_max_disappeared_with_same_event_id(rules):
    new = rules.update(tracked((4, 0.8, "person")), frame(0.0))
    assert rules.update(tracked(), frame(0.5)) == []
    end = rules.update(tracked(), frame(1.2))
    assert [a.event.type for a in end] == ["end"]
    assert end[0].event.event_id == new[0].event.event_id
    assert end[0].event.end_time == 0.0
    assert rules.update(tracked(), frame(3.0)) == []


def test_an_end_is_timed_from_the_frame_that_decided_it_not_from_the_last_sighting(rules):
    # monitor_alert_latency_seconds starts at Alert.capture_time: for an `end` that is the
    # frame in which the track was found missing for max_disappeared (1 s here), so the
    # wait the rules make on purpose never counts as the daemon's delay.
    rules.update(tracked((4, 0.8, "person")), frame(100.0))
    (end,) = rules.update(tracked(), frame(101.4))
    assert end.event.type == "end"
    assert end.event.frame_time == 100.0  # the payload still reports the last sighting
    assert end.capture_time == 101.4
    rules.update(tracked((5, 0.8, "person")), frame(200.0))
    (quiet,) = rules.expire(203.0)  # the camera went quiet: decided when the loop looked
    assert quiet.capture_time == 203.0
    rules.update(tracked((6, 0.8, "person")), frame(300.0))
    before = time.time()
    (stopped,) = rules.expire(float("inf"))  # shutdown: decided now
    assert before <= stopped.capture_time <= time.time()


def test_unconfirmed_track_ends_silently(rules):
    rules.update(tracked((5, 0.45, "person")), frame(0.0))
    assert rules.expire(10.0) == []


def test_labels_without_filter_use_defaults(rules):
    assert rules.update(tracked((8, 0.65, "deer")), frame(0.0)) == []  # default threshold 0.7
    assert [a.event.label for a in rules.update(tracked((9, 0.75, "deer")), frame(0.2))] == ["deer"]


def test_new_event_carries_a_jpeg_snapshot(rules):
    (alert,) = rules.update(tracked((1, 0.9, "person")), frame(5.0))
    assert alert.event.snapshot == "p/gate/person/snapshot"
    assert alert.snapshot is not None
    assert alert.snapshot[:2] == b"\xff\xd8"
    assert alert.event.box == [11.0, 10.0, 51.0, 90.0]
    assert alert.capture_time == 5.0


def test_two_tracks_get_two_event_ids(rules):
    alerts = rules.update(tracked((1, 0.9, "person"), (2, 0.9, "person")), frame(0.0))
    assert len({a.event.event_id for a in alerts}) == 2


def rules_with(**objects) -> AlertRules:
    settings = ObjectsSettings(
        track=["person", "deer"],
        filters={
            "person": FilterSettings(min_score=0.4, threshold=0.6),
            "deer": FilterSettings(threshold=0.6),
        },
        score_history=3,
        update_interval=1.0,
        max_disappeared=1.0,
        **objects,
    )
    return AlertRules("gate", settings, "m.pt@abc", Topics("p"), required_zones=None)


def test_category_tells_wildlife_from_people():
    rules = rules_with()
    alerts = rules.update(tracked((1, 0.9, "person"), (2, 0.9, "deer")), frame(0.0))
    assert {a.event.label: a.event.category for a in alerts} == {"person": "person", "deer": "wildlife"}


def test_min_frames_delays_new():
    settings = ObjectsSettings(track=["deer"], filters={"deer": FilterSettings(threshold=0.5, min_frames=3)})
    rules = AlertRules("gate", settings, "m", Topics("p"))
    steps = [rules.update(tracked((1, 0.9, "deer")), frame(t * 0.2)) for t in range(4)]
    kinds = [[a.event.type for a in alerts] for alerts in steps]
    assert kinds == [[], [], ["new"], []]


def test_zones_are_reported_and_a_zone_change_is_an_update():
    rules = rules_with()
    (new,) = rules.update(tracked((1, 0.9, "person")), frame(0.0), zones=[["driveway"]])
    assert new.event.current_zones == ["driveway"]
    assert new.event.entered_zones == ["driveway"]
    assert rules.update(tracked((1, 0.9, "person")), frame(1.5), zones=[["driveway"]]) == []
    (moved,) = rules.update(tracked((1, 0.9, "person")), frame(3.0), zones=[["porch"]])
    assert moved.event.type == "update"
    assert moved.event.current_zones == ["porch"]
    assert moved.event.entered_zones == ["driveway", "porch"]


def test_required_zone_holds_back_objects_outside_it():
    settings = ObjectsSettings(track=["person"], filters={"person": FilterSettings(threshold=0.6)})
    rules = AlertRules("gate", settings, "m", Topics("p"), required_zones=["porch"])
    assert rules.update(tracked((1, 0.9, "person")), frame(0.0), zones=[["driveway"]]) == []
    (new,) = rules.update(tracked((1, 0.9, "person")), frame(0.2), zones=[["porch"]])
    assert new.event.type == "new"


def run_sequence(rules: AlertRules) -> list:
    """Three people appearing 10 s apart, each for 3 s."""
    alerts = []
    for person in range(3):
        start = person * 10.0
        for step in range(15):
            alerts += rules.update(tracked((person + 1, 0.9, "person")), frame(start + step * 0.2))
        alerts += rules.update(tracked(), frame(start + 5.0))
    return alerts


@pytest.mark.parametrize(
    ("limits", "reason", "silenced_tracks"),
    [({"cooldown": 15.0}, "cooldown", 1), ({"max_events_per_minute": 1}, "rate_limit", 2)],
)
def test_suppressed_events_are_exactly_the_ones_not_sent(limits, reason, silenced_tracks):
    free = run_sequence(rules_with())
    limited = run_sequence(rules_with(**limits))
    sent = [a for a in limited if a.suppressed is None]
    suppressed = [a for a in limited if a.suppressed is not None]
    assert {a.suppressed for a in suppressed} == {reason}
    assert len(sent) + len(suppressed) == len(free)
    assert len({a.event.event_id for a in suppressed}) == silenced_tracks
    assert all(a.snapshot is None for a in suppressed)


def test_stationary_object_sends_no_updates_and_is_not_re_announced():
    rules = rules_with(stationary_after=2.0, stationary_max_disappeared=30.0)
    events = []
    for step in range(40):  # 8 s standing still with a rising score
        events += rules.update(tracked((1, 0.7 + step * 0.005, "person")), frame(step * 0.2))
    assert [a.event.type for a in events] == ["new", "update"]  # updates stop once it is stationary
    # ByteTrack loses it for 5 s, then finds it on the same spot under a new id.
    assert rules.update(tracked(), frame(13.0)) == []
    again = rules.update(tracked((2, 0.9, "person")), frame(13.2))
    assert again == []
    (end,) = rules.expire(13.2 + 31.0)
    assert end.event.event_id == events[0].event.event_id
    assert end.event.stationary


# -- a camera's rules, built from real Settings by CameraPipeline --------------------------------


def detected(*objects: tuple[str, float, list[float]]) -> sv.Detections:
    """Untracked detector output: (label, score, xyxy box in frame pixels)."""
    if not objects:
        return sv.Detections.empty()
    return sv.Detections(
        xyxy=np.array([box for _, _, box in objects], dtype=np.float32),
        confidence=np.array([s for _, s, _ in objects], dtype=np.float32),
        class_id=np.zeros(len(objects), dtype=int),
        data={"class_name": np.array([label for label, _, _ in objects], dtype=object)},
    )


def camera_settings(objects: dict, cameras: dict | None = None) -> Settings:
    return Settings(
        model={"path": "m.pt"},
        detect={"fps": 5},
        objects=objects,
        cameras=cameras or {"gate": {"url": "gate.mp4"}},
    )


def play(pipeline: CameraPipeline, *objects: tuple[str, float, list[float]], steps: int = 10) -> list[Alert]:
    """The same detections in ``steps`` frames 0.2 s apart, then the camera empty until every track ends."""
    camera = pipeline.rules.camera
    alerts = []
    for step in range(steps):
        alerts += pipeline.process(detected(*objects), Frame(camera, step, step * 0.2, IMAGE)).alerts
    alerts += pipeline.process(detected(), Frame(camera, steps, steps * 0.2, IMAGE)).alerts
    return alerts + pipeline.rules.expire(float("inf"))


def pipeline_for(settings: Settings, camera: str = "gate") -> CameraPipeline:
    return CameraPipeline(camera, settings, "m.pt@abc", Topics("p"), None)


FRAME_AREA = IMAGE.shape[0] * IMAGE.shape[1]  # 160 x 120 = 19200 px
SMALL = [10.0, 10.0, 20.0, 20.0]  # 100 px, 0.5 % of the frame
MEDIUM = [40.0, 20.0, 80.0, 100.0]  # 3200 px, 16.7 %
LARGE = [5.0, 5.0, 155.0, 115.0]  # 16500 px, 86 %


@pytest.mark.parametrize(
    ("limits", "box", "alerts"),
    [
        # pixels (values above 1)
        ({"min_area": 500, "max_area": 10_000}, SMALL, False),
        ({"min_area": 500, "max_area": 10_000}, MEDIUM, True),
        ({"min_area": 500, "max_area": 10_000}, LARGE, False),
        # fractions of the frame (values up to 1): 2 % = 384 px, 50 % = 9600 px
        ({"min_area": 0.02, "max_area": 0.5}, SMALL, False),
        ({"min_area": 0.02, "max_area": 0.5}, MEDIUM, True),
        ({"min_area": 0.02, "max_area": 0.5}, LARGE, False),
        # exactly 1 is a fraction, the whole frame, not one pixel
        ({"min_area": 1}, MEDIUM, False),
        ({"max_area": 1}, LARGE, True),
        # 2 is pixels
        ({"min_area": 2}, SMALL, True),
        ({"max_area": 2}, SMALL, False),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_box_outside_min_or_max_area_never_alerts(limits, box, alerts):
    pipeline = pipeline_for(
        camera_settings({"track": ["person"], "filters": {"person": {"threshold": 0.6, **limits}}})
    )
    events = play(pipeline, ("person", 0.9, box))
    kinds = [a.event.type for a in events]
    if alerts:
        assert kinds == ["new", "end"]
        assert events[0].event.box == box
    else:
        assert kinds == []
        assert pipeline.track_ids == set()  # filtered before tracking: never even a track


def test_area_limits_apply_per_label():
    pipeline = pipeline_for(
        camera_settings(
            {"track": ["person", "deer"], "filters": {"person": {"threshold": 0.6, "min_area": 1000}}}
        )
    )
    events = play(pipeline, ("person", 0.9, SMALL), ("deer", 0.9, [100.0, 10.0, 110.0, 20.0]))
    assert [(a.event.type, a.event.label) for a in events] == [("new", "deer"), ("end", "deer")]


PERSON_BOX = [10.0, 10.0, 50.0, 90.0]
DEER_BOX = [100.0, 40.0, 150.0, 80.0]


def test_camera_objects_override_track_and_filters_for_that_camera_only():
    settings = camera_settings(
        {"track": ["person", "deer"], "filters": {"deer": {"threshold": 0.95}}},
        cameras={
            "gate": {
                "url": "gate.mp4",
                "objects": {"track": ["deer"], "filters": {"deer": {"threshold": 0.8}}},
            },
            "yard": {"url": "yard.mp4"},
        },
    )
    scene = (("person", 0.9, PERSON_BOX), ("deer", 0.9, DEER_BOX))
    gate = play(pipeline_for(settings, "gate"), *scene)
    yard = play(pipeline_for(settings, "yard"), *scene)
    # gate: only deer are tracked there, and its own deer threshold (0.8) lets 0.9 through
    assert [(a.event.type, a.event.label) for a in gate] == [("new", "deer"), ("end", "deer")]
    # yard keeps the globals: person tracked, deer held back by the global threshold 0.95
    assert [(a.event.type, a.event.label) for a in yard] == [("new", "person"), ("end", "person")]


def test_camera_filter_override_leaves_the_other_labels_global_filters():
    settings = camera_settings(
        {"track": ["person", "deer"], "filters": {"person": {"threshold": 0.95}}},
        cameras={
            "gate": {"url": "gate.mp4", "objects": {"filters": {"deer": {"min_area": 5000}}}},
            "yard": {"url": "yard.mp4"},
        },
    )
    scene = (("person", 0.9, PERSON_BOX), ("deer", 0.9, DEER_BOX))  # deer box: 2000 px
    # gate: its deer filter (min_area) replaces the deer defaults; person keeps the global 0.95
    assert play(pipeline_for(settings, "gate"), *scene) == []
    yard = play(pipeline_for(settings, "yard"), *scene)
    assert [(a.event.type, a.event.label) for a in yard] == [("new", "deer"), ("end", "deer")]


def test_label_outside_the_track_list_never_produces_events():
    pipeline = pipeline_for(camera_settings({"track": ["person"]}))
    scene = (("person", 0.9, PERSON_BOX), ("cat", 0.99, DEER_BOX), ("car", 0.99, [60.0, 60.0, 90.0, 110.0]))
    events = play(pipeline, *scene)
    assert {a.event.label for a in events} == {"person"}
    assert len(pipeline.track_ids) == 1  # the cat and the car were not even tracked


OTHER_PERSON_BOX = [60.0, 60.0, 90.0, 110.0]
Scene = tuple[tuple[str, float, list[float]], ...]


def play_scenes(pipeline: CameraPipeline, *scenes: Scene, steps: int = 10) -> list[Alert]:
    """Each scene held for ``steps`` frames 0.2 s apart, one after the other, then every track ends."""
    camera = pipeline.rules.camera
    alerts = []
    for index, objects in enumerate(itertools.chain.from_iterable([s] * steps for s in scenes)):
        alerts += pipeline.process(detected(*objects), Frame(camera, index, index * 0.2, IMAGE)).alerts
    return alerts + pipeline.rules.expire(float("inf"))


COOLDOWN_CAMERAS = {"gate": {"url": "gate.mp4"}, "yard": {"url": "yard.mp4"}}


def cooldown_settings(port: int = 1883) -> Settings:
    return Settings(
        model={"path": "m.pt"},
        detect={"fps": 5},
        objects={"track": ["person", "deer"], "cooldown": 30.0, "max_disappeared": 1.0},
        mqtt={"port": port, "topic_prefix": "t"},
        cameras=COOLDOWN_CAMERAS,
    )


def gate_and_yard(settings: Settings) -> tuple[list[Alert], list[Alert]]:
    """gate: a person, then a deer, then another person (all within the cooldown); yard: a person."""
    gate = play_scenes(
        pipeline_for(settings, "gate"),
        (("person", 0.9, PERSON_BOX),),
        (("deer", 0.9, DEER_BOX),),
        (("person", 0.9, OTHER_PERSON_BOX),),
    )
    yard = play_scenes(pipeline_for(settings, "yard"), (("person", 0.9, PERSON_BOX),))
    return gate, yard


def test_cooldown_is_per_camera_and_label():
    gate, yard = gate_and_yard(cooldown_settings())
    news = [(a.event.label, a.event.box, a.suppressed) for a in gate if a.event.type == "new"]
    assert news == [
        ("person", PERSON_BOX, None),
        ("deer", DEER_BOX, None),  # another label on the same camera still alerts
        ("person", OTHER_PERSON_BOX, "cooldown"),  # the same label within 30 s does not
    ]
    # the silenced person's end is silenced too; the others' go out
    assert [(a.event.type, a.suppressed) for a in gate if a.event.box == OTHER_PERSON_BOX] == [
        ("new", "cooldown"),
        ("end", "cooldown"),
    ]
    # the same label on another camera, inside gate's person cooldown, still alerts
    assert [(a.event.type, a.event.label, a.suppressed) for a in yard] == [
        ("new", "person", None),
        ("end", "person", None),
    ]


def test_suppressed_counter_counts_exactly_the_events_not_sent(tmp_path, broker, subscriber_factory):
    settings = cooldown_settings(broker.port)
    gate, yard = gate_and_yard(settings)
    metrics = Metrics()
    for camera in COOLDOWN_CAMERAS:
        metrics.add_camera(camera)  # as the daemon's sources do
    snapshots = SnapshotStore(tmp_path / "snapshots", 10)
    sub = subscriber_factory(broker.port, "t/events")
    with (
        Spool(tmp_path / "spool.db") as spool,
        Publisher(settings.mqtt, spool, metrics) as publisher,
        Recorder(tmp_path / "recordings", metrics) as recorder,
    ):
        dispatch = Dispatcher(publisher, metrics, snapshots, recorder)
        for camera in COOLDOWN_CAMERAS:
            dispatch.add_camera(camera, settings)
        for alerts in (gate, yard):
            dispatch.publish(alerts)  # as the daemon's loop does
        wait_until(lambda: spool.count() == 0, 10, "every sent event acknowledged")

    def suppressed(camera: str, reason: str) -> float | None:
        labels = {"camera": camera, "reason": reason}
        return metrics.registry.get_sample_value("monitor_events_suppressed_total", labels)

    silenced = [a for a in gate if a.suppressed is not None]
    assert [a.event.type for a in silenced] == ["new", "end"]
    assert suppressed("gate", "cooldown") == len(silenced)
    assert suppressed("gate", "rate_limit") == 0
    assert suppressed("yard", "cooldown") == suppressed("yard", "rate_limit") == 0
    sent = {(a.event.event_id, a.event.type) for a in gate + yard if a.suppressed is None}
    assert len(sent) == 6  # gate's first person and deer, yard's person: new and end each

    def received() -> set[tuple[str, str]]:
        sub.drain()
        return {(e["event_id"], e["type"]) for e in (json.loads(m.payload) for m in sub.seen)}

    # one client's messages arrive in order: once yard's last event is in, a silenced one would be too
    wait_until(lambda: sent <= received(), 10, "the sent events at the subscriber")
    assert received() == sent
