"""Sub-labels: the vote over a track's crops, when crops are taken, and what events say.

Unit tests with hand-made tracked detections and a stand-in classifier (the
real one is exercised in tests/test_classifier.py and end to end on the RTSP
camera there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from pydantic import ValidationError

from monitor.alerts import AlertRules
from monitor.camera import CameraPipeline
from monitor.classifier import Classification, square_crop
from monitor.classifier_settings import seconds
from monitor.frames import Frame
from monitor.metrics import Metrics
from monitor.pipeline import PipelineStep
from monitor.settings import ClassifierSettings, ObjectsSettings, Settings
from monitor.topics import Topics
from tests.test_alerts import IMAGE, tracked

CLASSIFIER = ClassifierSettings(path=Path("cls.pt"), every=2.0, max_per_track=3, min_score=0.6)


def frame(t: float, camera: str = "gate") -> Frame:
    return Frame(camera, int(t * 10), t, IMAGE)


def rules_for(track: list[str], classifier: ClassifierSettings = CLASSIFIER, **objects: object) -> AlertRules:
    settings = ObjectsSettings(track=track, update_interval=5.0, max_disappeared=1.0, **objects)  # type: ignore[arg-type]
    return AlertRules("gate", settings, "m.pt@abc", Topics("p"), classifier=classifier)


def step(rules: AlertRules, t: float, objects: Sequence[tuple[int, float, str]], named: dict[int, str]):
    """One frame: ask which detections to crop, answer those in ``named`` (track id -> class at 0.9)."""
    found = tracked(*objects)
    wanted = rules.wanted(found, t)
    ids = [objects[i][0] for i in wanted]
    classes = {i: Classification(named[objects[i][0]], 0.9) for i in wanted if objects[i][0] in named}
    return ids, rules.update(found, frame(t), classes=classes)


def test_crops_are_taken_when_confirmed_then_every_and_at_most_max_per_track():
    rules = rules_for(["cow"])
    asked = [t for t in np.arange(0.0, 12.0, 0.5) if step(rules, float(t), [(1, 0.8, "cow")], {1: "cow"})[0]]
    assert asked == [0.0, 2.0, 4.0]  # first frame, then every 2 s, then max_per_track (3) stops it


def test_after_every_a_crop_waits_for_a_frame_as_good_but_not_past_twice_every():
    rules = rules_for(["cow"])
    scores = {0.0: 0.8, 2.0: 0.5, 2.5: 0.6, 3.0: 0.85, 3.5: 0.5}
    asked = [t for t, s in scores.items() if step(rules, t, [(1, s, "cow")], {1: "cow"})[0]]
    assert asked == [0.0, 3.0]  # 2.0 and 2.5 score worse than the first crop's 0.8
    rules = rules_for(["cow"])
    asked = [t for t, s in {0.0: 0.8, 2.0: 0.5, 4.0: 0.5}.items() if step(rules, t, [(1, s, "cow")], {})[0]]
    assert asked == [0.0, 4.0]  # a crop never answered is asked again; 2 x every ends the wait


def test_one_bad_crop_does_not_flip_the_vote_and_the_score_is_the_share_of_crops():
    vote = {"every": 0.5, "max_per_track": 5, "min_score": 0.5}
    rules = rules_for(["cow"], classifier=CLASSIFIER.model_copy(update=vote))
    votes = [("elephant", 0.9), ("elephant", 0.8), ("buffalo", 0.99)]
    events = []
    for n, (label, score) in enumerate(votes):
        found = tracked((1, 0.9, "cow"))
        assert rules.wanted(found, n * 0.5) == [0]
        events += rules.update(found, frame(n * 0.5), classes={0: Classification(label, score)})
    assert [a.event.type for a in events] == ["new"]  # the buffalo crop changed nothing
    last = rules.expire(float("inf"))[0].event  # the end says where the vote stands
    assert last.label == "cow"
    assert last.sub_label == "elephant"
    assert last.sub_label_score == pytest.approx((0.9 + 0.8) / 3, abs=1e-4)


def test_below_min_score_there_is_no_sub_label_and_the_label_stands():
    rules = rules_for(["cow"])
    found = tracked((1, 0.9, "cow"))
    rules.wanted(found, 0.0)
    (alert,) = rules.update(found, frame(0.0), classes={0: Classification("elephant", 0.4)})
    assert (alert.event.label, alert.event.sub_label, alert.event.sub_label_score) == ("cow", None, None)
    assert alert.event.snapshot == "p/gate/cow/snapshot"


def test_a_camera_tracking_only_elephant_alerts_on_what_the_classifier_calls_elephant():
    rules = rules_for(["elephant"])
    _, alerts = step(rules, 0.0, [(1, 0.9, "cow"), (2, 0.9, "cow")], {1: "elephant", 2: "buffalo"})
    assert [(a.event.track_id, a.event.type) for a in alerts] == [(1, "new")]
    event = alerts[0].event
    assert (event.label, event.sub_label, event.category) == ("cow", "elephant", "wildlife")
    assert event.snapshot == "p/gate/elephant/snapshot"


def test_a_change_of_sub_label_is_an_update_at_once_with_a_snapshot():
    rules = rules_for(["cow"], classifier=CLASSIFIER.model_copy(update={"every": 0.5, "max_per_track": 5}))
    kinds = []
    for n, label in enumerate(["buffalo", "gaur", "gaur", "gaur"]):
        _, alerts = step(rules, n * 0.5, [(1, 0.9, "cow")], {1: label})
        kinds += [(a.event.type, a.event.sub_label, a.snapshot is not None) for a in alerts]
    # votes: buffalo 0.9 | tie (first seen leads) | gaur 1.8 of 3 = 0.6 -> update | gaur 2.7/4
    assert kinds == [("new", "buffalo", True), ("update", None, True), ("update", "gaur", True)]


def test_labels_from_names_categories_or_labels():
    by_category = rules_for(["person", "cow"])
    assert by_category.wanted(tracked((1, 0.9, "person"), (2, 0.9, "cow")), 0.0) == [1]
    by_label = rules_for(
        ["person", "cow"], classifier=CLASSIFIER.model_copy(update={"labels_from": ["person"]})
    )
    assert by_label.wanted(tracked((1, 0.9, "person"), (2, 0.9, "cow")), 0.0) == [0]


def test_the_sub_labels_filter_decides_when_it_has_one():
    strict = {"elephant": {"threshold": 0.95}}
    rules = rules_for(["cow", "elephant"], filters=strict)
    _, alerts = step(rules, 0.0, [(1, 0.9, "cow")], {1: "elephant"})
    assert alerts == []  # 0.9 < elephant's 0.95, though cow's default threshold (0.7) passes


def test_durations_take_units():
    assert [seconds(v) for v in ("2s", "500ms", "1.5m", "1h", "3", 4)] == [2.0, 0.5, 90.0, 3600.0, 3.0, 4]
    with pytest.raises(ValidationError, match="expected a duration"):
        ClassifierSettings(path=Path("c.pt"), every="soon")  # type: ignore[arg-type]


def settings(**camera: object) -> Settings:
    return Settings.model_validate(
        {
            "model": {"path": "m.pt"},
            "objects": {"track": ["cow"]},
            "classifier": {"path": "cls.pt", "every": "1s", "min_score": 0.5},
            "cameras": {"gate": {"url": "rtsp://cam/1", **camera}, "yard": {"url": "rtsp://cam/2"}},
        }
    )


def test_a_camera_override_changes_or_disables_the_classifier():
    config = settings(classifier={"min_score": 0.9, "every": "250ms"})
    gate = config.classifier_for("gate")
    assert gate is not None
    assert (gate.min_score, gate.every, config.classifier_for("yard").min_score) == (0.9, 0.25, 0.5)  # type: ignore[union-attr]
    off = settings(classifier=False)
    assert off.classifier_for("gate") is None
    assert CameraPipeline("gate", off, "m", Topics("p"), None).rules.sublabeler is None
    assert CameraPipeline("yard", off, "m", Topics("p"), None).rules.sublabeler is not None


def test_a_camera_override_without_a_classifier_section_is_refused():
    with pytest.raises(ValidationError, match=r"cameras \['gate'\] change the classifier"):
        Settings.model_validate(
            {"model": {"path": "m.pt"}, "cameras": {"gate": {"url": "rtsp://c", "classifier": {"every": 1}}}}
        )


def test_square_crop_is_centred_padded_grey_and_resized():
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 90:110] = 255
    crop = square_crop(image, [90, 40, 110, 60], margin=1.0)  # 40 x 40 around a 20 x 20 white square
    assert crop.shape == (40, 40, 3)
    assert crop[10:30, 10:30].min() == 255
    assert crop[:10].max() == 0
    edge = square_crop(image, [0, 0, 20, 20], size=64, margin=0.0)
    assert edge.shape == (64, 64, 3)
    corner = square_crop(image, [-10, -10, 10, 10], margin=0.0)
    assert (corner[:10, :10] == 114).all()
    assert (corner[10:, 10:] == 0).all()


class FakeClassifier:
    """Counts its calls; names every crop after its mean brightness."""

    max_batch = 2

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def crops(self, image: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[np.ndarray]:
        return [square_crop(image, box, 32) for box in boxes]

    def classify(self, crops: Sequence[np.ndarray]) -> list[Classification]:
        self.calls.append(len(crops))
        if self.fail:
            raise RuntimeError("device lost")
        return [Classification("bright" if c.mean() > 100 else "dark", 0.9) for c in crops]


class FakeDetector:
    """Three cows per frame."""

    def detect_timed(self, images, conf=None, keys=None, prepared=None):  # type: ignore[no-untyped-def]
        from monitor.detector import BatchTimings, Detected

        found = sv.Detections(
            xyxy=np.array([[10, 10, 40, 40], [60, 10, 90, 40], [100, 10, 130, 40]], np.float32),
            confidence=np.array([0.9, 0.9, 0.9], np.float32),
            class_id=np.zeros(3, int),
            data={"class_name": np.array(["cow"] * 3, dtype=object)},
        )
        return Detected([found] * len(images), BatchTimings(0.0, 0.0, 0.0))


def step_for(classifier: FakeClassifier) -> tuple[PipelineStep, list, Metrics]:
    config = settings()
    config = config.model_copy(
        update={
            "objects": config.objects.model_copy(
                update={"tracker": config.objects.tracker.model_copy(update={"min_frames": 1})}
            )
        }
    )
    cameras = {name: CameraPipeline(name, config, "m", Topics("p"), None) for name in ("gate", "yard")}
    alerts: list = []
    metrics = Metrics()
    pipeline = PipelineStep(FakeDetector(), cameras, metrics, 0.25, alerts.extend, classifier=classifier)  # type: ignore[arg-type]
    return pipeline, alerts, metrics


def test_crops_of_every_camera_go_through_in_batches_and_back_to_their_camera():
    classifier = FakeClassifier()
    pipeline, alerts, metrics = step_for(classifier)
    bright = np.full((120, 160, 3), 200, np.uint8)
    pipeline.run([Frame("gate", 0, 0.8, bright), Frame("yard", 0, 0.8, IMAGE)])  # ByteTrack: no ids yet
    pipeline.run([Frame("gate", 1, 1.0, bright), Frame("yard", 1, 1.0, IMAGE)])
    assert classifier.calls == [2, 2, 2]  # 6 crops (3 tracks x 2 cameras), max_batch 2
    news = {(a.event.camera, a.event.sub_label) for a in alerts if a.event.type == "new"}
    assert news == {("gate", "bright"), ("yard", "dark")}
    assert metrics.classifier_crops.labels("gate")._value.get() == 3


def test_a_failing_classifier_costs_sub_labels_never_alerts(caplog):
    pipeline, alerts, _ = step_for(FakeClassifier(fail=True))
    pipeline.run([Frame("gate", 0, 0.8, IMAGE)])
    pipeline.run([Frame("gate", 1, 1.0, IMAGE)])
    assert [(a.event.type, a.event.sub_label) for a in alerts] == [("new", None)] * 3
    assert "classifier failed on 3 crop(s)" in caplog.text


def test_snapshots_show_the_sub_label_beside_the_label(monkeypatch):
    drawn: list[list[str]] = []
    rules = rules_for(["cow"])
    monkeypatch.setattr(
        rules._annotator, "draw", lambda image, found, labels, zones: drawn.append(labels) or image
    )
    step(rules, 0.0, [(1, 0.9, "cow")], {1: "gaur"})
    assert drawn == [["gaur (cow) 0.90"]]
