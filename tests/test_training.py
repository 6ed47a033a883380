"""The model workflow commands: ``monitor train``, ``val`` and ``export``, run in-process.

Training uses a tiny generated data set (squares and discs) and a randomly
initialised ``yolov8s.yaml``, so nothing is downloaded; export parity uses the
real test weights on the test clip. Classification (``--task classify``) uses
the walker/pavement crops of the test clip (``tests.classifier_data``) and the
session's ``classifier_weights`` trained on them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import supervision as sv
import torch
import yaml

from monitor import training, training_classify
from monitor.classifier import Classifier
from monitor.cli import EXIT_CONFIG, EXIT_STARTUP, build_parser, main
from monitor.detector import Detector
from monitor.runtime import sha256_of
from monitor.settings import ModelSettings
from tests import classifier_data
from tests.conftest import CLIP, PEOPLE_JPG, TEST_LABELS, base_config, free_port, wait_until

CLASSES = ["square", "disc"]
IMAGE_SIZE = 64
SHA256 = re.compile(r"^[0-9a-f]{64}$")
COLUMNS = {"class", "images", "instances", "precision", "recall", "mAP50", "mAP50-95"}
METRICS = {"precision", "recall", "mAP50", "mAP50-95"}
EXPORT_IMGSZ = 320
PARITY_CONF = 0.3
PARITY_IOU = 0.9
PARITY_CONF_TOLERANCE = 0.02
# torch.onnx's TorchScript exporter, which Ultralytics 8.4 calls, warns about its own deprecation.
ONNX_EXPORT_WARNINGS = (
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:The feature will be removed:DeprecationWarning:torch.onnx",
)


@dataclass
class Ran:
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[object]) -> Ran:
    """``monitor ARGV`` in this process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Ran(code, out.getvalue(), err.getvalue())


def make_shapes_dataset(root: Path, n_train: int = 24, n_val: int = 8, seed: int = 0) -> Path:
    """A YOLO-format data set of filled squares (class 0) and discs (class 1) on dark 64x64 images.

    Image ``i`` always holds one shape of class ``i % 2``, so both classes are in
    each split, and sometimes a second shape of a random class.

    Returns:
        The data set YAML.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), int(rng.integers(0, 60)), np.uint8)
            classes = [i % 2] + ([int(rng.integers(0, 2))] if rng.random() < 0.5 else [])
            lines = []
            for cls in classes:
                side = int(rng.integers(14, 28))
                x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - side, 2))
                colour = tuple(int(c) for c in rng.integers(120, 256, 3))
                if cls == 0:
                    cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), colour, -1)
                else:
                    cv2.circle(image, (x0 + side // 2, y0 + side // 2), side // 2, colour, -1)
                cx, cy, wh = (x0 + side / 2) / IMAGE_SIZE, (y0 + side / 2) / IMAGE_SIZE, side / IMAGE_SIZE
                lines.append(f"{cls} {cx:.6f} {cy:.6f} {wh:.6f} {wh:.6f}")
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.png"), image)
            (root / "labels" / split / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    names = dict(enumerate(CLASSES))
    data.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": names})
    )
    return data


def val_label_counts(data: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Val images, and per class name: labelled boxes and images holding the class."""
    files = sorted((data.parent / "labels" / "val").glob("*.txt"))
    instances = dict.fromkeys(CLASSES, 0)
    images = dict.fromkeys(CLASSES, 0)
    for file in files:
        ids = [int(line.split()[0]) for line in file.read_text().splitlines()]
        for cls in ids:
            instances[CLASSES[cls]] += 1
        for cls in set(ids):
            images[CLASSES[cls]] += 1
    return len(files), instances, images


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def trained(shapes_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ran, Path]:
    """``monitor train`` for one epoch at imgsz 64 on the CPU, from random weights."""
    project = tmp_path_factory.mktemp("runs")
    argv = ["train", "--data", shapes_data, "--model", "yolov8s.yaml", "--epochs", 1, "--imgsz", IMAGE_SIZE]
    argv += ["--batch", 8, "--device", "cpu", "--project", project, "--name", "shapes"]
    return run_cli(argv), project


def test_train_prints_best_weights_and_a_model_card_describing_them(
    trained: tuple[Ran, Path], shapes_data: Path
) -> None:
    ran, project = trained
    assert ran.code == 0, ran.err
    best, card_path = (Path(line) for line in ran.out.splitlines())
    assert best == project / "shapes" / "weights" / "best.pt"
    assert best.is_file()
    assert card_path == best.with_name("model_card.json")
    card = json.loads(card_path.read_text())
    assert card["classes"] == CLASSES
    assert SHA256.match(card["weights_sha256"])
    assert card["weights_sha256"] == sha256_of(best)
    assert set(card["metrics"]) == METRICS
    assert all(0.0 <= v <= 1.0 for v in card["metrics"].values())
    assert SHA256.match(card["data_sha256"])
    assert card["data_sha256"] == training.dataset_sha256(shapes_data)
    assert (card["epochs"], card["imgsz"], card["base_model"]) == (1, IMAGE_SIZE, "yolov8s.yaml")
    assert card["ultralytics"].startswith("8.")


def test_train_defaults_are_the_seeds_imgsz_416_and_10_epochs(
    shapes_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``monitor train --data D`` alone trains as the seed did; checked without a 10-epoch run."""
    args = build_parser().parse_args(["train", "--data", str(shapes_data)])
    assert (args.epochs, args.batch, args.device) == (10, 16, "auto")
    # model and imgsz are the task's (yolov8n-cls.pt at 224 for classify): the command fills them in.
    assert (args.imgsz, args.model, args.task) == (None, None, None)
    # What the command hands to training.train, recorded instead of training.
    calls: list[dict[str, object]] = []
    best = tmp_path / "exp" / "weights" / "best.pt"

    def record(data: Path, **kwargs: object) -> Path:
        calls.append({"data": data, **kwargs})
        return best

    monkeypatch.setattr(training, "train", record)
    ran = run_cli(["train", "--data", shapes_data])
    assert ran.code == 0, ran.err
    assert ran.out.splitlines() == [str(best), str(best.with_name("model_card.json"))]
    (call,) = calls
    assert (call["data"], call["imgsz"], call["epochs"], call["model"]) == (
        shapes_data,
        416,
        10,
        "yolov8s.pt",
    )


def test_val_reports_all_and_each_class_with_ultralytics_columns(
    trained: tuple[Ran, Path], shapes_data: Path
) -> None:
    best = trained[1] / "shapes" / "weights" / "best.pt"
    argv = [
        "val",
        "--data",
        shapes_data,
        "--model",
        best,
        "--imgsz",
        IMAGE_SIZE,
        "--batch",
        8,
        "--device",
        "cpu",
    ]
    n_images, instances, images = val_label_counts(shapes_data)

    as_json = run_cli([*argv, "--json"])
    assert as_json.code == 0, as_json.err
    rows = {row["class"]: row for row in json.loads(as_json.out)["rows"]}
    assert list(rows) == ["all", *CLASSES]
    assert all(set(row) == COLUMNS for row in rows.values())
    assert (rows["all"]["images"], rows["all"]["instances"]) == (n_images, sum(instances.values()))
    for name in CLASSES:
        assert (rows[name]["images"], rows[name]["instances"]) == (images[name], instances[name])

    table = run_cli(argv)
    assert table.code == 0, table.err
    header, *lines = table.out.splitlines()
    assert header.split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert [line.split()[0] for line in lines] == ["all", *CLASSES]
    assert lines[0].split()[1:3] == [str(n_images), str(sum(instances.values()))]


@dataclass
class UltralyticsVal:
    """What Ultralytics' own ``YOLO(model).val(...)`` returned and logged."""

    metrics: object  # ultralytics.utils.metrics.DetMetrics
    table: list[str]  # the rows it logged: 'all', then one per class


def ultralytics_val(model: Path, data: Path, imgsz: int, batch: int, project: Path) -> UltralyticsVal:
    """``YOLO(model).val`` called directly, with the per-class rows its validator logs captured."""
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    yolo = YOLO(str(model))
    names = {"all", *(str(n) for n in yolo.names.values())}
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)  # YOLO_VERBOSE=False would hide the table
    try:
        metrics = yolo.val(
            data=str(data), imgsz=imgsz, batch=batch, device="cpu", plots=False, project=str(project)
        )
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    table = [m for m in logged if len(m.split()) == 7 and m.split()[0] in names]
    assert table, f"Ultralytics logged no per-class table: {logged}"
    return UltralyticsVal(metrics, table)


def assert_val_matches_ultralytics(model: Path, data: Path, imgsz: int, tmp_path: Path) -> list[dict]:
    """``monitor val`` (JSON and table) reports what Ultralytics' own val does; returns the JSON rows."""
    argv = ["val", "--data", data, "--model", model, "--imgsz", imgsz, "--batch", 8, "--device", "cpu"]
    as_json, table = run_cli([*argv, "--json"]), run_cli(argv)
    assert as_json.code == 0, as_json.err
    assert table.code == 0, table.err
    reference = ultralytics_val(model, data, imgsz, 8, tmp_path)
    box = reference.metrics.box  # type: ignore[attr-defined]
    names = reference.metrics.names  # type: ignore[attr-defined]
    expected = [("all", box.mp, box.mr, box.map50, box.map)]
    expected += [(str(names[int(c)]), *box.class_result(i)) for i, c in enumerate(box.ap_class_index)]
    rows = json.loads(as_json.out)["rows"]
    assert [row["class"] for row in rows] == [name for name, *_ in expected]
    for row, (name, p, r, map50, map50_95) in zip(rows, expected, strict=True):
        got = (row["precision"], row["recall"], row["mAP50"], row["mAP50-95"])
        assert got == pytest.approx((p, r, map50, map50_95), abs=1e-6), name
    # Ultralytics' logged rows carry the image and instance counts; ours must be the same lines.
    for row, line in zip(rows, reference.table, strict=True):
        assert line.split()[:3] == [row["class"], str(row["images"]), str(row["instances"])]
    assert [line.strip() for line in table.out.splitlines()[1:]] == [line.strip() for line in reference.table]
    return rows


def test_val_on_the_tiny_data_set_matches_ultralytics_own_val(
    trained: tuple[Ran, Path], shapes_data: Path, tmp_path: Path
) -> None:
    best = trained[1] / "shapes" / "weights" / "best.pt"
    rows = assert_val_matches_ultralytics(best, shapes_data, IMAGE_SIZE, tmp_path)
    n_images, instances, _ = val_label_counts(shapes_data)
    assert (rows[0]["images"], rows[0]["instances"]) == (n_images, sum(instances.values()))


@pytest.fixture(scope="module")
def clip_data(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A val split of clip frames labelled from the test weights' own boxes, some dropped, all jittered.

    A one-epoch model finds nothing (every metric 0); on this set the real
    weights score between 0 and 1, so a wrong column or class cannot hide.
    """
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("clip-data")
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    detector = Detector(ModelSettings(path=weights, imgsz=EXPORT_IMGSZ, device="cpu", backend="torch"), 16)
    frames = parity_frames()
    rng = np.random.default_rng(0)
    for i, (frame, found) in enumerate(zip(frames, detector.detect(frames, conf=PARITY_CONF), strict=True)):
        height, width = frame.shape[:2]
        lines = []
        for k, (box, cls) in enumerate(zip(found.xyxy, found.class_id, strict=True)):
            if k % 3 == 2:  # a missed label: the model's box becomes a false positive
                continue
            x1, y1, x2, y2 = box + rng.normal(0, 3, 4)
            cx, cy, w, h = (
                (x1 + x2) / 2 / width,
                (y1 + y2) / 2 / height,
                (x2 - x1) / width,
                (y2 - y1) / height,
            )
            lines.append(f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        cv2.imwrite(str(root / "images" / "val" / f"{i:03d}.png"), frame)
        (root / "labels" / "val" / f"{i:03d}.txt").write_text("".join(f"{line}\n" for line in lines))
    data = root / "data.yaml"
    names = {int(k): str(v) for k, v in YOLO(str(weights)).names.items()}
    data.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val", "names": names})
    )
    return data


def test_val_of_the_real_weights_matches_ultralytics_own_val(
    weights: Path, clip_data: Path, tmp_path: Path
) -> None:
    rows = assert_val_matches_ultralytics(weights, clip_data, EXPORT_IMGSZ, tmp_path)
    assert 0 < rows[0]["precision"] < 1, "metrics strictly between 0 and 1 make the comparison tell"
    assert 0 < rows[0]["mAP50-95"] < rows[0]["mAP50"] < 1
    assert len(rows) >= 2, "at least one class row besides 'all'"


def test_dataset_hash_follows_labels_but_not_ultralytics_label_cache(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=2)
    before = training.dataset_sha256(data)
    (tmp_path / "shapes" / "labels" / "train" / "nested.cache").write_bytes(b"cache")
    assert training.dataset_sha256(data) == before
    label = tmp_path / "shapes" / "labels" / "val" / "000.txt"
    label.write_text(label.read_text().replace("0 ", "1 ", 1))
    assert training.dataset_sha256(data) != before


def parity_frames() -> list[np.ndarray]:
    """Every 20th of the first 120 clip frames, and the people photo."""
    capture = cv2.VideoCapture(str(CLIP))
    frames = []
    try:
        for index in range(120):
            ok, frame = capture.read()
            assert ok, f"{CLIP} ended at frame {index}"
            if index % 20 == 0:
                frames.append(frame)
    finally:
        capture.release()
    photo = cv2.imread(str(PEOPLE_JPG))
    assert photo is not None
    return [*frames, photo]


@dataclass
class Exported:
    ran: Ran
    pt: Path
    onnx: Path


@pytest.fixture(scope="module")
def exported(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """``monitor export --format onnx`` of a copy of the test weights, once for the module's tests."""
    folder = tmp_path_factory.mktemp("export")
    pt = folder / "fall.pt"
    shutil.copyfile(weights, pt)  # the export lands next to the weights: keep it out of site-packages
    ran = run_cli(["export", "--model", pt, "--format", "onnx", "--imgsz", EXPORT_IMGSZ])
    assert ran.code == 0, ran.err
    return Exported(ran, pt, Path(ran.out.strip()))


@pytest.mark.filterwarnings(*ONNX_EXPORT_WARNINGS)
def test_onnx_export_is_dynamic_and_detects_like_the_pt_weights(exported: Exported) -> None:
    ran, pt, onnx = exported.ran, exported.pt, exported.onnx
    assert ran.out == f"{pt.with_suffix('.onnx')}\n"
    assert onnx.is_file()
    settings = {"imgsz": EXPORT_IMGSZ, "device": "cpu", "conf": PARITY_CONF}
    reference = Detector(ModelSettings(path=pt, backend="torch", **settings), 16)
    exported = Detector(ModelSettings(path=onnx, **settings), 16)
    assert exported.rect, "a dynamic export takes the same rectangular batches as the .pt weights"
    frames = parity_frames()
    expected, got = reference.detect(frames), exported.detect(frames)
    assert sum(len(d) for d in expected) > 0, "parity needs detections to compare"
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert len(have) == len(want), f"frame {i}: {len(have)} boxes from ONNX, {len(want)} from .pt"
        if not len(want):
            continue
        iou = sv.box_iou_batch(want.xyxy, have.xyxy)
        match = iou.argmax(axis=1)
        assert (iou.max(axis=1) >= PARITY_IOU).all(), f"frame {i}: IoU {iou.max(axis=1)}"
        assert have.confidence is not None
        assert want.confidence is not None
        assert have.class_id is not None
        assert want.class_id is not None
        np.testing.assert_allclose(have.confidence[match], want.confidence, atol=PARITY_CONF_TOLERANCE)
        np.testing.assert_array_equal(have.class_id[match], want.class_id)


def test_openvino_export_predicts_like_the_pt_weights(weights: Path, tmp_path: Path) -> None:
    """``monitor export --format openvino``, then ``monitor predict`` on the folder it prints.

    The real weights, not the one-epoch shapes model: that one finds nothing,
    and parity on no boxes could not fail.
    """
    pt = tmp_path / "fall.pt"
    shutil.copyfile(weights, pt)  # the export lands next to the weights: keep it out of site-packages
    ran = run_cli(["export", "--model", pt, "--format", "openvino", "--imgsz", EXPORT_IMGSZ])
    assert ran.code == 0, ran.err
    folder = tmp_path / "fall_openvino_model"
    assert ran.out == f"{folder}\n"
    assert {p.name for p in folder.iterdir()} >= {"fall.xml", "fall.bin", "metadata.yaml"}

    pictures = tmp_path / "frames"
    pictures.mkdir()
    for i, frame in enumerate(parity_frames()):
        assert cv2.imwrite(str(pictures / f"{i:02d}.png"), frame)  # lossless: both sides see the same pixels
    argv = ["predict", pictures, "--model", folder, "--imgsz", EXPORT_IMGSZ, "--device", "cpu"]
    predicted = run_cli([*argv, "--conf", PARITY_CONF])
    assert predicted.code == 0, predicted.err
    lines = [json.loads(line) for line in predicted.out.splitlines()]
    paths = sorted(pictures.iterdir())
    assert [line["path"] for line in lines] == [str(p) for p in paths]

    reference = Detector(
        ModelSettings(path=pt, imgsz=EXPORT_IMGSZ, device="cpu", backend="torch", conf=PARITY_CONF), 16
    )
    expected = reference.detect([cv2.imread(str(p)) for p in paths])
    assert sum(len(d) for d in expected) > 0, "parity needs detections to compare"
    for path, want, line in zip(paths, expected, lines, strict=True):
        results = line["results"]
        assert len(results) == len(want), (
            f"{path.name}: {len(results)} boxes from OpenVINO, {len(want)} from .pt"
        )
        if not results:
            continue
        have = np.array([r["boxes"] for r in results], dtype=np.float32)
        iou = sv.box_iou_batch(want.xyxy, have)
        match = iou.argmax(axis=1)
        assert (iou.max(axis=1) >= PARITY_IOU).all(), f"{path.name}: IoU {iou.max(axis=1)}"
        assert want.confidence is not None
        scores = np.array([r["confidence"] for r in results])
        # predict rounds confidences to 2 decimals: allow that on top of the parity tolerance.
        np.testing.assert_allclose(scores[match], want.confidence, atol=PARITY_CONF_TOLERANCE + 0.005)
        assert [results[j]["label"] for j in match] == list(want.data["class_name"]), path.name


@pytest.mark.filterwarnings(*ONNX_EXPORT_WARNINGS)
def test_predict_endpoint_serves_the_exported_model(exported: Exported, tmp_path: Path) -> None:
    """`monitor serve` with model.path pointing at an ONNX export answers /predict like the .pt does."""
    pt, onnx = exported.pt, exported.onnx
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(onnx), "imgsz": EXPORT_IMGSZ, "device": "cpu", "labels": TEST_LABELS},
                "http": {"port": port},
            }
        )
    )
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, "monitor serve on the ONNX model")
        answer = httpx.post(f"{url}/predict", files={"file": ("p.jpg", PEOPLE_JPG.read_bytes())}, timeout=30)
        assert answer.status_code == 200
        results = answer.json()["results"]
        reference = Detector(
            ModelSettings(path=pt, imgsz=EXPORT_IMGSZ, device="cpu", backend="torch", labels=TEST_LABELS), 16
        )
        (expected,) = reference.detect([cv2.imread(str(PEOPLE_JPG))])
        assert len(results) == len(expected) > 0
        assert {r["label"] for r in results} == {"person"}
        got = np.array([r["boxes"] for r in results], dtype=np.float32)
        assert (sv.box_iou_batch(expected.xyxy, got).max(axis=1) >= PARITY_IOU).all()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.mark.integration
@pytest.mark.filterwarnings(*ONNX_EXPORT_WARNINGS)
def test_daemon_on_the_exported_model_alerts_person_over_mqtt(
    exported: Exported, tmp_path: Path, broker, subscriber_factory, daemon_factory
) -> None:
    """`monitor run` with model.path pointing at the ONNX export: a file camera, a real broker."""
    events = subscriber_factory(broker.port, "test/events")
    config = base_config(
        exported.onnx, tmp_path, broker.port, free_port(), cameras={"walkway": {"url": str(CLIP)}}
    )
    config["model"]["imgsz"] = EXPORT_IMGSZ
    daemon = daemon_factory(config)

    new = events.wait_for(lambda m: json.loads(m.payload)["type"] == "new", 60, "a new event")
    event = json.loads(new.payload)
    assert (event["camera"], event["label"]) == ("walkway", "person")
    assert event["model"] == f"fall.onnx@{sha256_of(exported.onnx)[:12]}", "the event names the export"
    x1, y1, x2, y2 = event["box"]
    assert 0 <= x1 < x2 <= 768, event["box"]
    assert 0 <= y1 < y2 <= 576, event["box"]
    assert 0.35 <= event["score"] <= event["top_score"] <= 1
    assert f"model {exported.onnx} loaded on cpu" in daemon.log(), "the daemon loaded the export itself"
    assert daemon.terminate() == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["train", "--data", "{tmp}/missing.yaml"], "does not exist", id="train-missing-data"),
        pytest.param(
            ["train", "--data", "{data}", "--model", "yolov8s.pt"],
            "must be a local .pt",
            id="train-pt-by-name",
        ),
        pytest.param(
            ["train", "--data", "{data}", "--model", "{tmp}/gone.pt"],
            "must be a local .pt",
            id="train-missing-pt",
        ),
        pytest.param(["train", "--data", "{data}", "--imgsz", "412"], "try 416", id="train-imgsz-not-stride"),
        pytest.param(
            ["val", "--data", "{tmp}/missing.yaml", "--model", "{tmp}/gone.pt"],
            "does not exist",
            id="val-missing",
        ),
        pytest.param(
            ["export", "--model", "{tmp}/gone.pt", "--format", "onnx"],
            "must be a local .pt",
            id="export-missing-pt",
        ),
    ],
)
def test_model_workflow_errors_exit_3_with_the_reason(
    argv: list[str], message: str, shapes_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # so a bare "yolov8s.pt" is not in the working directory
    ran = run_cli([a.format(tmp=tmp_path, data=shapes_data) for a in argv])
    assert ran.code == EXIT_STARTUP
    assert ran.out == ""
    assert ran.err.startswith("error: ")
    assert message in ran.err
    assert list(tmp_path.iterdir()) == [], "nothing is downloaded or written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_engine_export_without_cuda_says_so(weights: Path) -> None:
    ran = run_cli(["export", "--model", weights, "--format", "engine"])
    assert ran.code == EXIT_STARTUP
    assert "needs CUDA" in ran.err


# -- classification: monitor train/val/export --task classify -----------------------------------

CLS_CLASSES = list(classifier_data.CLASSES)
CLS_IMGSZ = classifier_data.CROP_SIZE
CLS_METRICS = {"top1", "top5"}
CLS_COLUMNS = {"class", "images", "top1", "top5"}
#: Clearly above the 0.5 of guessing between two classes; the fixture reaches 1.0.
MIN_VAL_TOP1 = 0.85
CLS_PARITY_TOLERANCE = 0.02


def card_of(weights: Path) -> dict:
    return json.loads(weights.with_name("model_card.json").read_text())


@pytest.fixture(scope="module")
def cls_data(classifier_weights: Path) -> Path:
    """The walker/pavement folder the session's classifier was trained on (its card names it)."""
    return Path(card_of(classifier_weights)["data"])


@pytest.fixture(scope="module")
def people_crops(weights: Path) -> dict[str, list[np.ndarray]]:
    """Square crops of the people photo: the people the real detector finds, and ground no box touches."""
    image = cv2.imread(str(PEOPLE_JPG))
    detector = Detector(
        ModelSettings(path=weights, imgsz=classifier_data.DETECT_IMGSZ, device="cpu", labels=TEST_LABELS), 1
    )
    (found,) = detector.detect([image], conf=classifier_data.LOOSE_CONF)
    assert found.confidence is not None
    people = [box for box, score in zip(found.xyxy, found.confidence, strict=True) if score >= 0.25]
    assert len(people) >= 3, "the photo shows several people"
    ground = classifier_data.pavement_boxes(image.shape, found.xyxy, people, np.random.default_rng(1), 8)
    assert len(ground) >= 4
    return {
        "walker": [square_crop_of(image, box) for box in people],
        "pavement": [square_crop_of(image, box) for box in ground],
    }


def square_crop_of(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
    from monitor.classifier import square_crop

    return square_crop(image, box, CLS_IMGSZ)


def test_the_clip_classifier_reaches_a_val_top1_far_above_chance(
    classifier_weights: Path, cls_data: Path
) -> None:
    card = card_of(classifier_weights)
    assert card["task"] == "classify"
    assert card["classes"] == CLS_CLASSES
    assert set(card["metrics"]) == CLS_METRICS
    assert card["metrics"]["top1"] >= MIN_VAL_TOP1, card["metrics"]
    assert card["metrics"]["top5"] == 1.0, "two classes: the right one is always in the top five"
    assert card["weights_sha256"] == sha256_of(classifier_weights)
    checked = training_classify.check_classify_data(cls_data)
    assert card["data_sha256"] == training_classify.classify_data_sha256(checked)
    assert (card["base_model"], card["imgsz"]) == ("yolov8n-cls.yaml", CLS_IMGSZ)
    for split, counts in checked.counts.items():
        assert set(counts) == set(CLS_CLASSES), split
        assert all(60 <= n <= 150 for n in counts.values()), (split, counts)


def test_the_clip_classifier_calls_people_of_the_photo_walkers_and_its_ground_pavement(
    classifier_weights: Path, people_crops: dict[str, list[np.ndarray]]
) -> None:
    classifier = Classifier(classifier_weights, imgsz=CLS_IMGSZ, device="cpu", backend="torch")
    for expected, crops in people_crops.items():
        labels = [c.label for c in classifier.classify(crops)]
        assert labels.count(expected) > len(labels) / 2, (expected, labels)


@pytest.fixture(scope="module")
def cls_trained(cls_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ran, Path]:
    """``monitor train --task classify`` for one epoch at imgsz 32 on the CPU, from random weights."""
    project = tmp_path_factory.mktemp("cls-runs")
    argv = ["train", "--task", "classify", "--data", cls_data, "--model", "yolov8n-cls.yaml"]
    argv += ["--epochs", 1, "--imgsz", 32, "--batch", 32, "--device", "cpu", "--project", project]
    return run_cli([*argv, "--name", "walker"]), project


def test_train_classify_prints_best_weights_and_a_card_with_top1_top5(
    cls_trained: tuple[Ran, Path], cls_data: Path
) -> None:
    ran, project = cls_trained
    assert ran.code == 0, ran.err
    best, card_path = (Path(line) for line in ran.out.splitlines())
    assert best == project / "walker" / "weights" / "best.pt"
    assert card_path == best.with_name("model_card.json")
    card = json.loads(card_path.read_text())
    assert (card["task"], card["classes"], card["base_model"]) == (
        "classify",
        CLS_CLASSES,
        "yolov8n-cls.yaml",
    )
    assert (card["epochs"], card["imgsz"], card["batch"]) == (1, 32, 32)
    assert set(card["metrics"]) == CLS_METRICS
    assert all(0.0 <= v <= 1.0 for v in card["metrics"].values())
    assert card["weights_sha256"] == sha256_of(best)
    checked = training_classify.check_classify_data(cls_data)
    assert card["data_sha256"] == training_classify.classify_data_sha256(checked)
    assert not Path(f"{cls_data}_split").exists(), "nothing is split beside the data"


@pytest.mark.parametrize("task", [[], ["--task", "classify"]], ids=["inferred", "explicit"])
def test_train_classify_defaults_are_yolov8n_cls_at_224_and_10_epochs(
    task: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder as --data means classify; the defaults are then the classifier's. Recorded, not trained."""
    calls: list[dict[str, object]] = []
    best = tmp_path / "exp" / "weights" / "best.pt"

    def record(data: Path, **kwargs: object) -> Path:
        calls.append({"data": data, **kwargs})
        return best

    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a folder must not train a detector")

    monkeypatch.setattr(training_classify, "train_classifier", record)
    monkeypatch.setattr(training, "train", refuse)
    ran = run_cli(["train", "--data", tmp_path, *task])
    assert ran.code == 0, ran.err
    assert ran.out.splitlines() == [str(best), str(best.with_name("model_card.json"))]
    (call,) = calls
    assert (call["data"], call["model"], call["imgsz"]) == (tmp_path, "yolov8n-cls.pt", 224)
    assert (call["epochs"], call["batch"], call["device"]) == (10, 16, "auto")


def ultralytics_cls_val(model: Path, data: Path, imgsz: int, project: Path) -> tuple[float, float]:
    """Top-1 and top-5 accuracy from Ultralytics' own ``YOLO(model).val`` on the val split."""
    from ultralytics import YOLO

    metrics = YOLO(str(model)).val(
        data=str(data), split="val", imgsz=imgsz, batch=16, device="cpu", plots=False, project=str(project)
    )
    return float(metrics.top1), float(metrics.top5)


@pytest.mark.parametrize("which", ["fixture", "one-epoch"])
def test_val_classify_reports_top1_top5_overall_and_per_class_as_ultralytics_does(
    which: str,
    classifier_weights: Path,
    cls_trained: tuple[Ran, Path],
    cls_data: Path,
    tmp_path: Path,
) -> None:
    """On the good classifier and on a one-epoch one (whose per-class rows differ), JSON and table."""
    if which == "fixture":
        model, imgsz = classifier_weights, CLS_IMGSZ
    else:
        model, imgsz = cls_trained[1] / "walker" / "weights" / "best.pt", 32
    argv = ["val", "--task", "classify", "--data", cls_data, "--model", model, "--imgsz", imgsz]
    argv += ["--device", "cpu"]
    as_json = run_cli([*argv, "--json"])
    assert as_json.code == 0, as_json.err
    report = json.loads(as_json.out)
    assert (report["task"], report["imgsz"], report["model"]) == ("classify", imgsz, str(model))
    rows = {row["class"]: row for row in report["rows"]}
    assert list(rows) == ["all", *CLS_CLASSES]
    assert all(set(row) == CLS_COLUMNS for row in rows.values())
    counts = training_classify.check_classify_data(cls_data).counts["val"]
    assert [rows[name]["images"] for name in CLS_CLASSES] == [counts[name] for name in CLS_CLASSES]
    assert rows["all"]["images"] == sum(counts.values())
    assert (report["top1"], report["top5"]) == (rows["all"]["top1"], rows["all"]["top5"])
    theirs = ultralytics_cls_val(model, cls_data, imgsz, tmp_path)
    assert (report["top1"], report["top5"]) == pytest.approx(theirs, abs=1e-6)
    weighted = sum(rows[n]["top1"] * rows[n]["images"] for n in CLS_CLASSES) / rows["all"]["images"]
    assert weighted == pytest.approx(report["top1"], abs=1e-6), "per-class rows add up to the 'all' row"
    if which == "fixture":
        assert report["top1"] >= MIN_VAL_TOP1
        assert report["top1"] == pytest.approx(card_of(model)["metrics"]["top1"], abs=1e-6)

    table = run_cli(argv)
    assert table.code == 0, table.err
    header, *lines = table.out.splitlines()
    assert header.split() == ["Class", "Images", "top1_acc", "top5_acc"]
    assert [line.split()[0] for line in lines] == ["all", *CLS_CLASSES]
    assert [int(line.split()[1]) for line in lines] == [rows[n]["images"] for n in ["all", *CLS_CLASSES]]
    assert float(lines[0].split()[2]) == pytest.approx(report["top1"], abs=1e-3)


@pytest.mark.filterwarnings(*ONNX_EXPORT_WARNINGS)
@pytest.mark.parametrize(("fmt", "suffix"), [("onnx", ".onnx"), ("openvino", "_openvino_model")])
def test_classifier_export_classifies_crops_like_the_pt_weights(
    fmt: str,
    suffix: str,
    classifier_weights: Path,
    people_crops: dict[str, list[np.ndarray]],
    tmp_path: Path,
) -> None:
    pt = tmp_path / "walker.pt"
    shutil.copyfile(classifier_weights, pt)  # the export lands next to the weights
    ran = run_cli(["export", "--model", pt, "--format", fmt, "--imgsz", CLS_IMGSZ])
    assert ran.code == 0, ran.err
    out = tmp_path / f"walker{suffix}"
    assert ran.out == f"{out}\n"
    assert out.exists()
    crops = [crop for group in people_crops.values() for crop in group]
    reference = Classifier(pt, imgsz=CLS_IMGSZ, device="cpu", backend="torch")
    exported = Classifier(out, imgsz=CLS_IMGSZ, device="cpu")
    assert exported.runtime == "exported"
    assert exported.names == reference.names == dict(enumerate(CLS_CLASSES))
    want, got = reference.probabilities(crops), exported.probabilities(crops)
    np.testing.assert_allclose(got, want, atol=CLS_PARITY_TOLERANCE)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))


def write_class_folders(root: Path, layout: dict[str, int]) -> None:
    """``{"train/a": 2, ...}``: that many small random PNGs in each folder (0: an empty folder)."""
    rng = np.random.default_rng(0)
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / folder / f"{i}.png"), image)


SPLIT = {"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1}


@pytest.mark.parametrize(
    ("layout", "extra", "message"),
    [
        pytest.param(
            {"a": 2, "b": 2}, None, "has class folders (a, b) but no train/ and val/", id="no-splits"
        ),
        pytest.param({"train/a": 2, "train/b": 2}, None, "has train/ but no val/ split", id="no-val"),
        pytest.param(
            {"train/a": 2, "val/a": 1}, None, "needs at least 2 class folders, found only 'a'", id="one-class"
        ),
        pytest.param({**SPLIT, "train/c": 0, "val/c": 1}, None, "train/c/ holds no images", id="empty-class"),
        pytest.param({**SPLIT, "val/c": 1}, None, "val/ has c, which train/ lacks", id="val-extra"),
        pytest.param({**SPLIT, "test/a": 1}, None, "test/ lacks b", id="test-lacks-class"),
        pytest.param(SPLIT, ("train/b/broken.jpg", b"not a jpeg"), "train/b/broken.jpg", id="unreadable"),
        pytest.param(SPLIT, ("val/a/tiny.png", "5x5"), "(5x5, under 10 px)", id="tiny-image"),
        pytest.param({}, None, "does not exist", id="missing-folder"),
    ],
)
@pytest.mark.parametrize("command", ["train", "val"])
def test_bad_classification_data_fails_with_the_reason_before_ultralytics_runs(
    command: str,
    layout: dict[str, int],
    extra: tuple[str, object] | None,
    message: str,
    classifier_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    write_class_folders(data, layout)
    if extra is not None:
        name, content = extra
        if content == "5x5":
            assert cv2.imwrite(str(data / name), np.zeros((5, 5, 3), np.uint8))
        else:
            assert isinstance(content, bytes)
            (data / name).write_bytes(content)
    before = sorted(tmp_path.rglob("*"))
    model = ["--model", "yolov8n-cls.yaml"] if command == "train" else ["--model", classifier_weights]
    ran = run_cli([command, "--task", "classify", "--data", data, *model, "--device", "cpu"])
    assert ran.code == EXIT_STARTUP, ran.err
    assert ran.out == ""
    assert ran.err.startswith("error: ")
    assert message in ran.err
    assert "Traceback" not in ran.err
    assert sorted(tmp_path.rglob("*")) == before, "nothing is split, cached or trained"


def test_val_classify_refuses_classes_the_model_does_not_know(
    classifier_weights: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    write_class_folders(data, {"train/walker": 1, "train/deer": 1, "val/walker": 1, "val/deer": 1})
    ran = run_cli(["val", "--data", data, "--model", classifier_weights, "--imgsz", CLS_IMGSZ])
    assert ran.code == EXIT_STARTUP
    assert "classes the model" in ran.err
    assert "deer (its classes: pavement, walker)" in ran.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["train", "--task", "detect", "--data", "{folder}"],
            "task 'detect' needs a data set YAML, but",
            id="train-detect-on-a-folder",
        ),
        pytest.param(
            ["train", "--task", "classify", "--data", "{yaml}"],
            "task 'classify' needs a folder laid out as DATA/train/<class>/",
            id="train-classify-on-a-yaml",
        ),
        pytest.param(
            ["train", "--data", "{folder}", "--model", "{detector}"],
            "is a 'detect' model; task 'classify' needs a classification model",
            id="train-detector-on-class-folders",
        ),
        pytest.param(
            ["train", "--data", "{yaml}", "--model", "yolov8n-cls.yaml"],
            "is a 'classify' model; task 'detect' needs a detection model",
            id="train-classifier-on-a-yaml",
        ),
        pytest.param(
            ["val", "--data", "{folder}", "--model", "{detector}"],
            "is a 'detect' model; task 'classify' needs a classification model",
            id="val-detector-on-class-folders",
        ),
        pytest.param(
            ["val", "--data", "{yaml}", "--model", "{classifier}"],
            "is a 'classify' model; task 'detect' needs a detection model",
            id="val-classifier-on-a-yaml",
        ),
    ],
)
def test_task_data_and_model_that_contradict_each_other_exit_2(
    argv: list[str],
    message: str,
    cls_data: Path,
    shapes_data: Path,
    weights: Path,
    classifier_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    values = {"folder": cls_data, "yaml": shapes_data, "detector": weights, "classifier": classifier_weights}
    project = ["--project", tmp_path / "runs"] if argv[0] == "train" else []
    ran = run_cli([*(a.format(**values) for a in argv), "--device", "cpu", *project])
    assert ran.code == EXIT_CONFIG, ran.err
    assert ran.out == ""
    assert ran.err.startswith("error: ")
    assert message in ran.err
    assert list(tmp_path.iterdir()) == [], "nothing is trained or written"


def test_classify_data_hash_follows_images_and_their_class_but_not_ultralytics_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_class_folders(data, SPLIT)
    before = training_classify.classify_data_sha256(training_classify.check_classify_data(data))
    (data / "train.cache").write_bytes(b"cache")
    (data / "train" / "a" / "notes.txt").write_text("not an image")
    assert training_classify.classify_data_sha256(training_classify.check_classify_data(data)) == before
    (data / "train" / "a" / "1.png").rename(data / "train" / "b" / "9.png")
    assert training_classify.classify_data_sha256(training_classify.check_classify_data(data)) != before
