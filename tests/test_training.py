"""The model workflow commands: ``monitor train``, ``val`` and ``export``, run in-process.

Training uses a tiny generated data set (squares and discs) and a randomly
initialised ``yolov8s.yaml``, so nothing is downloaded; export parity uses the
real test weights on the test clip.
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

from monitor import training
from monitor.cli import EXIT_STARTUP, build_parser, main
from monitor.detector import Detector
from monitor.runtime import sha256_of
from monitor.settings import ModelSettings
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
    assert (args.imgsz, args.epochs, args.batch) == (416, 10, 16)
    assert (args.model, args.device) == ("yolov8s.pt", "auto")
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
