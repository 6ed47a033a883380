"""The classifier stage with real parts: a classifier trained here on crops of the test clip
(``classifier_weights``: classes ``walker`` and ``pavement``), the real detector weights,
the GStreamer RTSP server and Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.classifier import Classifier, square_crop
from monitor.detector import Detector
from monitor.errors import DetectorError
from monitor.settings import ModelSettings
from tests.conftest import PEOPLE_JPG, TEST_LABELS, base_config, free_port

CLS_IMGSZ = 64


@pytest.fixture(scope="module")
def people(weights: Path) -> tuple[np.ndarray, list[list[float]]]:
    """The people picture and the boxes the real detector finds on it."""
    image = cv2.imread(str(PEOPLE_JPG))
    detector = Detector(ModelSettings(path=weights, imgsz=416, device="cpu", labels=TEST_LABELS), 1)
    (found,) = detector.detect([image], conf=0.25)
    assert len(found) >= 3, "the test picture shows several people"
    return image, found.xyxy.tolist()


def test_crops_classify_as_ultralytics_predict_classifies_the_same_square(
    classifier_weights, people, tmp_path
):
    from ultralytics import YOLO  # type: ignore[attr-defined]

    image, boxes = people
    ours = Classifier(classifier_weights, CLS_IMGSZ, device="cpu", backend="torch")
    crops = ours.crops(image, boxes)
    probs = ours.probabilities(crops)
    model = YOLO(str(classifier_weights))
    for crop, row in zip(crops, probs, strict=True):
        path = tmp_path / "crop.png"  # lossless: Ultralytics reads exactly these pixels
        cv2.imwrite(str(path), crop)
        (result,) = model.predict(str(path), imgsz=CLS_IMGSZ, device="cpu", verbose=False)
        theirs = result.probs.data.cpu().numpy()
        assert int(theirs.argmax()) == int(row.argmax())
        np.testing.assert_allclose(row, theirs, atol=0.02)
    named = ours.classify(crops)
    assert sum(c.label == "walker" for c in named) > len(named) / 2, named


def test_the_classifier_runs_through_openvino_as_through_torch(classifier_weights, people):
    image, boxes = people
    torch_probs = Classifier(classifier_weights, CLS_IMGSZ, device="cpu", backend="torch")
    exported = Classifier(classifier_weights, CLS_IMGSZ, device="cpu", backend="openvino")
    assert exported.runtime == "openvino"
    crops = torch_probs.crops(image, boxes)
    np.testing.assert_allclose(exported.probabilities(crops), torch_probs.probabilities(crops), atol=0.02)


def test_a_detector_is_not_a_classifier_and_a_classifier_not_a_detector(
    weights, classifier_weights, tmp_path
):
    with pytest.raises(DetectorError, match="is a 'detect' model; a 'classify' model is needed"):
        Classifier(weights, CLS_IMGSZ, device="cpu", backend="torch")
    with pytest.raises(DetectorError, match="is a 'classify' model; a 'detect' model is needed"):
        Detector(ModelSettings(path=classifier_weights, imgsz=320, device="cpu"), 1)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(DetectorError, match="could not be loaded as a YOLO model"):
        Classifier(junk, CLS_IMGSZ, device="cpu")
    with pytest.raises(DetectorError, match="does not exist"):
        Classifier(tmp_path / "missing.pt", CLS_IMGSZ, device="cpu")


def test_square_crops_of_the_test_picture_are_what_the_classifier_gets(classifier_weights, people):
    image, boxes = people
    classifier = Classifier(classifier_weights, CLS_IMGSZ, device="cpu", backend="torch")
    for crop, box in zip(classifier.crops(image, boxes), boxes, strict=True):
        assert np.array_equal(crop, square_crop(image, box, CLS_IMGSZ))


@pytest.mark.integration
def test_the_daemon_names_people_on_the_rtsp_camera_and_a_camera_can_turn_it_off(
    weights, classifier_weights, tmp_path, broker, rtsp_server, subscriber_factory, daemon_factory
):
    config = base_config(
        weights,
        tmp_path,
        broker.port,
        free_port(),
        cameras={
            "cam1": {"url": rtsp_server.url("cam1")},
            "cam2": {"url": rtsp_server.url("cam2"), "classifier": False},
        },
        classifier={
            "path": str(classifier_weights),
            "imgsz": CLS_IMGSZ,
            "labels_from": ["person"],
            "every": "1s",
            "min_score": 0.5,
        },
    )
    config["model"]["imgsz"] = 320
    sub = subscriber_factory(broker.port, "test/events")
    daemon = daemon_factory(config)

    def event_on(camera: str, named: bool):
        def match(message) -> bool:
            event = json.loads(message.payload)
            return event["camera"] == camera and (event["sub_label"] is not None) == named

        return match

    named = json.loads(sub.wait_for(event_on("cam1", True), 90, "a cam1 event with a sub_label").payload)
    assert named["label"] == "person"
    assert named["sub_label"] == "walker"
    assert 0.5 <= named["sub_label_score"] <= 1
    sub.wait_for(lambda m: json.loads(m.payload)["camera"] == "cam2", 60, "a cam2 event")
    sub.drain()
    events = [json.loads(m.payload) for m in sub.seen]
    assert all(e["sub_label"] is None for e in events if e["camera"] == "cam2")
    first = [e for e in events if e["camera"] == "cam1" and e["type"] == "new"]
    assert sum(e["sub_label"] == "walker" for e in first) > len(first) / 2  # people, mostly named so
    metrics = daemon.metrics()
    assert metrics['monitor_classifier_crops_total{camera="cam1"}'] > 0
    assert metrics.get('monitor_classifier_crops_total{camera="cam2"}', 0) == 0
    assert metrics['monitor_stage_duration_seconds_count{stage="classify"}'] > 0
    assert daemon.terminate() == 0
