"""``monitor predict --format megadetector``: MegaDetector batch output, checked by the megadetector package.

Real parts: the real test weights, pictures and a clip cut from the test
footage, the package's own validator (``validate_batch_results``) and loader
(``load_api_results``). Boxes are compared with what ``monitor predict``'s
JSON lines (the /predict contract) give for the same files.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import ImageFile

from monitor.classifier import Classifier
from monitor.cli import EXIT_CONFIG, EXIT_STARTUP, main
from monitor.detector import Detector
from monitor.errors import ConfigError
from monitor.megadetector import (
    FORMAT_VERSION,
    Categories,
    checkpoint_path,
    normalised_box,
    top_classes,
)
from monitor.runtime import sha256_of
from monitor.settings import ModelSettings
from tests.conftest import CLIP, PEOPLE_JPG, TEST_LABELS

IMGSZ = 320
MODEL_ARGS = ("--label", "Normal=person", "--label", "Fall=person", "--imgsz", str(IMGSZ), "--device", "cpu")
CLIP_FRAMES = 30  # the short clip: the first 3 s of the test footage
VID_STRIDE = 10
SUMMARY = re.compile(
    r"^megadetector: images=(\d+) videos=(\d+) frames=(\d+) failures=(\d+) resumed=(\d+) output=(.+)$", re.M
)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def summary(self) -> dict[str, int]:
        """The summary line's counts."""
        found = SUMMARY.findall(self.err)
        assert len(found) == 1, f"expected one summary line on stderr, got:\n{self.err}"
        keys = ("images", "videos", "frames", "failures", "resumed")
        return dict(zip(keys, (int(v) for v in found[0][:5]), strict=True))


def run_predict(argv: Sequence[object]) -> Ran:
    """``monitor predict ARGV`` in this process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["predict", *(str(a) for a in argv)])
    return Ran(code, out.getvalue(), err.getvalue())


def run_megadetector(folder: Path, output: Path, weights: Path, *extra: object) -> Ran:
    return run_predict(
        [folder, "--model", weights, *MODEL_ARGS, "--format", "megadetector", "--output", output, *extra]
    )


@contextlib.contextmanager
def pillow_flags_kept() -> Iterator[None]:
    """Import megadetector modules in this block: one of them (``visualization_utils``) sets Pillow's
    ``LOAD_TRUNCATED_IMAGES`` for the whole process on import, and truncated pictures would then decode."""
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated


def validate(output: Path, base: Path) -> dict:
    """The megadetector package's validator on ``output``, files checked to exist under ``base``."""
    with pillow_flags_kept():
        from megadetector.postprocessing.validate_batch_results import (
            ValidateBatchResultsOptions,
            validate_batch_results,
        )

    options = ValidateBatchResultsOptions()
    options.check_image_existence = True
    options.relative_path_base = str(base)
    options.return_data = True
    checked = validate_batch_results(str(output), options)
    results = checked["validation_results"]
    assert results["errors"] == [], results["errors"]
    assert results["warnings"] == [], results["warnings"]
    return checked


def write_frames(folder: Path, names: dict[int, str]) -> None:
    """Frames of the test footage as picture files: ``{frame index: path under folder}``."""
    capture = cv2.VideoCapture(str(CLIP))
    try:
        for index in range(max(names) + 1):
            ok, frame = capture.read()
            assert ok, f"the test clip ends before frame {index}"
            if index in names:
                path = folder / names[index]
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), frame), path
    finally:
        capture.release()


def write_short_clip(path: Path, frames: int = CLIP_FRAMES) -> None:
    """The first ``frames`` frames of the test footage as an MPEG-4 file at its 10 fps."""
    capture = cv2.VideoCapture(str(CLIP))
    fps = capture.get(cv2.CAP_PROP_FPS)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (768, 576))
    assert writer.isOpened(), "OpenCV cannot write MPEG-4 here"
    try:
        for _ in range(frames):
            ok, frame = capture.read()
            assert ok
            writer.write(frame)
    finally:
        writer.release()
        capture.release()


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A camera-trap folder: the people photo, frames of the clip (some in subfolders) and a short video."""
    folder = tmp_path_factory.mktemp("trap")
    shutil.copyfile(PEOPLE_JPG, folder / "people.jpg")
    write_frames(
        folder, {40: "frame_000040.jpg", 150: "night/frame_000150.jpg", 290: "night/deep/frame_290.png"}
    )
    (folder / "clips").mkdir()
    write_short_clip(folder / "clips" / "short.mp4")
    return folder


@pytest.fixture(scope="module")
def expected_files() -> set[str]:
    return {
        "people.jpg",
        "frame_000040.jpg",
        "night/frame_000150.jpg",
        "night/deep/frame_290.png",
        "clips/short.mp4",
    }


@pytest.fixture(scope="module")
def megadetector_run(weights: Path, footage: Path, tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("results") / "results.json"
    ran = run_megadetector(footage, output, weights, "--vid-stride", VID_STRIDE)
    assert ran.code == 0, ran.err
    return ran, output


@pytest.fixture(scope="module")
def jsonl_run(weights: Path, footage: Path) -> dict[tuple[str, int | None], list[dict]]:
    """``monitor predict``'s JSON lines for the same folder: ``{(file, frame): results}``."""
    ran = run_predict([footage, "--model", weights, *MODEL_ARGS, "--vid-stride", VID_STRIDE])
    assert ran.code == 0, ran.err
    lines = [json.loads(line) for line in ran.out.splitlines()]
    return {
        (Path(ln["path"]).relative_to(footage).as_posix(), ln.get("frame")): ln["results"] for ln in lines
    }


def test_output_passes_the_megadetector_validator_with_every_file_checked(megadetector_run, footage):
    _, output = megadetector_run
    checked = validate(output, footage)
    detections = sum(len(im["detections"]) for im in checked["images"])
    assert detections > 0, "people are in the photo and the clip"
    # The validator went through every detection, not only the file's shape.
    assert dict(checked["validation_results"]["detection_category_id_to_count"]) == {"1": detections}


def test_info_names_the_weights_and_format_and_the_classes_merge_to_one_category(megadetector_run, weights):
    _, output = megadetector_run
    data = json.loads(output.read_text())
    assert set(data) == {"info", "detection_categories", "images"}
    info = data["info"]
    assert info["format_version"] == FORMAT_VERSION == "1.6"
    assert info["detector"] == f"{weights.name}@{sha256_of(weights)[:12]}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", info["detection_completion_time"])
    assert info["detector_metadata"]["image_size"] == IMGSZ
    assert "classifier" not in info
    # Normal and Fall are both renamed person: one id, and "0" (MegaDetector's "empty") unused.
    assert data["detection_categories"] == {"1": "person"}
    for image in data["images"]:
        for detection in image["detections"]:
            assert set(detection) <= {"category", "conf", "bbox", "frame_number"}, "no classifier ran"


def test_each_file_appears_once_relative_to_the_folder_with_forward_slashes(
    megadetector_run, footage, expected_files
):
    ran, output = megadetector_run
    files = [image["file"] for image in json.loads(output.read_text())["images"]]
    assert sorted(files) == sorted(expected_files)
    assert ran.summary() == {"images": 4, "videos": 1, "frames": 3, "failures": 0, "resumed": 0}
    assert ran.out == "", "the results go to --output, not stdout"
    assert not checkpoint_path(output).exists()
    assert not list(output.parent.glob("*.tmp"))


def test_boxes_load_with_load_api_results_as_the_predict_endpoint_gives_them(megadetector_run, jsonl_run):
    with pillow_flags_kept():
        from megadetector.postprocessing.load_api_results import load_api_results

    _, output = megadetector_run
    table, other = load_api_results(str(output))
    assert other["detection_categories"] == {"1": "person"}
    compared = 0
    for _, row in table.iterrows():
        file, detections = row["file"], row["detections"]
        if file.endswith(".mp4"):
            assert row["frame_rate"] == 10.0
            assert row["frames_processed"] == list(range(0, CLIP_FRAMES, VID_STRIDE))
            for frame in row["frames_processed"]:
                ours = [d for d in detections if d["frame_number"] == frame]
                compared += assert_same_boxes(ours, jsonl_run[(file, frame)], 768, 576)
        else:  # the photo and the frames are all 768x576, as the footage
            compared += assert_same_boxes(detections, jsonl_run[(file, None)], 768, 576)
    assert compared >= 5, "enough boxes to compare"
    assert {key for key in jsonl_run if key[1] is None} == {
        (f, None) for f in table["file"] if not f.endswith(".mp4")
    }


def assert_same_boxes(ours: list[dict], expected: list[dict], width: int, height: int) -> int:
    """Our normalised boxes, back in pixels, match /predict's within 1 px and 0.01 in confidence."""
    assert len(ours) == len(expected), (ours, expected)
    left = [
        (np.array([x * width, y * height, (x + w) * width, (y + h) * height]), d["conf"], d["category"])
        for d in ours
        for x, y, w, h in [d["bbox"]]
    ]
    for result in expected:
        assert result["label"] == "person"
        box = np.array(result["boxes"])
        k = min(range(len(left)), key=lambda i: float(np.abs(left[i][0] - box).max()))
        pixels, conf, category = left.pop(k)
        assert np.abs(pixels - box).max() <= 1.0, (pixels, box)
        assert conf == pytest.approx(result["confidence"], abs=0.0051)
        assert category == "1"
    for d in ours:
        x, y, w, h = d["bbox"]
        assert 0 <= x <= 1
        assert 0 <= y <= 1
        assert 0 < w <= 1 - x + 1e-4
        assert 0 < h <= 1 - y + 1e-4
    return len(expected)


def test_detections_are_sorted_by_confidence_and_rounded_like_megadetector(megadetector_run):
    _, output = megadetector_run
    for image in json.loads(output.read_text())["images"]:
        if "frame_rate" in image:
            continue
        confs = [d["conf"] for d in image["detections"]]
        assert confs == sorted(confs, reverse=True)
        for d in image["detections"]:
            assert round(d["conf"], 3) == d["conf"]
            assert all(round(v, 4) == v for v in d["bbox"])


def test_an_empty_folder_gives_a_valid_file_with_no_images(weights, tmp_path):
    (tmp_path / "empty").mkdir()
    output = tmp_path / "results.json"
    ran = run_megadetector(tmp_path / "empty", output, weights)
    assert ran.code == 0, ran.err
    assert ran.summary() == {"images": 0, "videos": 0, "frames": 0, "failures": 0, "resumed": 0}
    assert validate(output, tmp_path / "empty")["images"] == []


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where most files cannot be used: truncated JPEG, text named .jpg, two broken videos."""
    folder = tmp_path_factory.mktemp("broken")
    data = PEOPLE_JPG.read_bytes()
    shutil.copyfile(PEOPLE_JPG, folder / "good.jpg")
    (folder / "cut").mkdir()
    (folder / "cut" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("species,count\nelephant,3\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video\n")
    (folder / "cut" / "head.mp4").write_bytes(CLIP.read_bytes()[:20_000])  # opens, no frame decodes
    return folder


def test_unusable_files_become_failure_entries_and_the_run_exits_1(
    weights, broken, megadetector_run, tmp_path
):
    output = tmp_path / "results.json"
    ran = run_megadetector(broken, output, weights)
    assert ran.code == 1, ran.err
    assert "Traceback" not in ran.err
    assert ran.summary() == {"images": 1, "videos": 0, "frames": 0, "failures": 5, "resumed": 0}
    checked = validate(output, broken)
    by_file = {image["file"]: image for image in checked["images"]}
    assert set(by_file) == {
        "good.jpg",
        "cut/truncated.jpg",
        "notes.jpg",
        "empty.png",
        "text.mp4",
        "cut/head.mp4",
    }
    for file in ("cut/truncated.jpg", "notes.jpg", "empty.png"):
        assert by_file[file]["failure"].startswith("image access failure: "), by_file[file]
        assert by_file[file]["detections"] is None
    assert "truncated" in by_file["cut/truncated.jpg"]["failure"]
    assert "not a picture" in by_file["notes.jpg"]["failure"]
    for file in ("text.mp4", "cut/head.mp4"):
        video = by_file[file]
        assert video["failure"].startswith("Failure processing video: "), video
        assert video["detections"] is None
        assert video["frame_rate"] == -1.0
        assert video["frames_processed"] == []
    # The good picture's results are there, the same as the people photo's in the clean run.
    clean = {im["file"]: im for im in json.loads(megadetector_run[1].read_text())["images"]}
    assert by_file["good.jpg"]["detections"] == clean["people.jpg"]["detections"]
    assert by_file["good.jpg"]["detections"], "people are in the photo"


@pytest.fixture
def frames_folder(tmp_path: Path) -> Path:
    """Seven frames of the test footage, two in a subfolder."""
    folder = tmp_path / "frames"
    names = {i * 40: f"{'late/' if i >= 5 else ''}f{i * 40:03d}.jpg" for i in range(7)}
    write_frames(folder, names)
    return folder


def count_detections(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[int]:
    """Count ``Detector.detect`` calls (one a picture here); KeyboardInterrupt at call ``interrupt_at``."""
    calls: list[int] = []
    detect = Detector.detect

    def counting(self, images, conf=None):
        calls.append(len(images))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return detect(self, images, conf)

    monkeypatch.setattr(Detector, "detect", counting)
    return calls


def test_interrupted_run_resumes_from_its_checkpoint_without_redoing_files(
    weights, frames_folder, tmp_path, monkeypatch
):
    output = tmp_path / "out" / "results.json"
    checkpoint = checkpoint_path(output)
    assert checkpoint.name == "results.json.checkpoint.json"
    calls = count_detections(monkeypatch, interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        run_megadetector(frames_folder, output, weights, "--checkpoint", 2)
    assert len(calls) == 6
    assert not output.exists(), "no output until the run completes"
    saved = json.loads(checkpoint.read_text())
    # Written after files 2 and 4; the fifth was done but not yet checkpointed, the sixth interrupted.
    assert [im["file"] for im in saved["checkpoint"]] == ["f000.jpg", "f040.jpg", "f080.jpg", "f120.jpg"]
    assert not list(output.parent.glob("*.tmp"))

    calls = count_detections(monkeypatch)
    ran = run_megadetector(frames_folder, output, weights, "--checkpoint", 2)
    assert ran.code == 0, ran.err
    assert len(calls) == 3, "only the three files not in the checkpoint went through the model"
    assert ran.summary() == {"images": 7, "videos": 0, "frames": 0, "failures": 0, "resumed": 4}
    assert not checkpoint.exists(), "the checkpoint goes once the output is complete"
    resumed = json.loads(output.read_text())
    files = [im["file"] for im in resumed["images"]]
    assert sorted(files) == sorted(
        p.relative_to(frames_folder).as_posix() for p in frames_folder.rglob("*.jpg")
    )
    assert len(files) == len(set(files)) == 7

    # The same results as a run that was never interrupted.
    monkeypatch.undo()
    straight = tmp_path / "straight.json"
    assert run_megadetector(frames_folder, straight, weights).code == 0
    assert resumed["images"] == json.loads(straight.read_text())["images"]
    validate(output, frames_folder)


def test_a_checkpoint_of_other_options_is_refused_and_kept(weights, frames_folder, tmp_path, monkeypatch):
    output = tmp_path / "results.json"
    count_detections(monkeypatch, interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_megadetector(frames_folder, output, weights, "--checkpoint", 1)
    monkeypatch.undo()
    before = checkpoint_path(output).read_bytes()
    ran = run_megadetector(frames_folder, output, weights, "--conf", 0.5)
    assert ran.code == EXIT_CONFIG
    assert "was written by another run: conf 0.25 there, 0.5 here" in ran.err
    assert not output.exists()
    assert checkpoint_path(output).read_bytes() == before


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Ultralytics YOLOv8n-cls network (untrained, seeded), classes deer, fox and deer again.

    Untrained, its scores are close to each other, but it is the real classifier
    stage: the same weights loaded through ``Classifier`` give the expected scores.
    """
    from ultralytics.nn.tasks import ClassificationModel

    torch.manual_seed(0)
    model = ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)
    model.names = {0: "deer", 1: "fox", 2: "deer"}
    path = tmp_path_factory.mktemp("classifier") / "species-cls.pt"
    torch.save({"model": model.eval(), "train_args": {}}, path)
    return path


def test_a_classifier_adds_merged_categories_and_top_classes_per_box(
    weights, classifier_weights, footage, tmp_path
):
    config = tmp_path / "monitor.yaml"  # backend torch: no export of the untrained network
    labels = "".join(f"    {k}: {v}\n" for k, v in TEST_LABELS.items())
    config.write_text(
        f"model:\n  path: {weights}\n  imgsz: {IMGSZ}\n  device: cpu\n  backend: torch\n  labels:\n{labels}"
    )
    output = tmp_path / "results.json"
    picture = footage / "frame_000040.jpg"
    argv = [picture, "--config", config, "--format", "megadetector", "--output", output]
    ran = run_predict([*argv, "--classifier", classifier_weights, "--classifier-imgsz", 64])
    assert ran.code == 0, ran.err
    checked = validate(output, footage)
    assert checked["classification_categories"] == {"0": "deer", "1": "fox"}
    info = checked["info"]
    classifier = Classifier(classifier_weights, 64, device="cpu", backend="torch")
    assert info["classifier"] == classifier.label
    assert info["classification_completion_time"] == info["detection_completion_time"]
    (image,) = checked["images"]
    assert image["file"] == "frame_000040.jpg"

    # The expected scores: the same boxes' crops through the same classifier, deer's two classes summed.
    frame = cv2.imread(str(picture))
    detector = Detector(
        ModelSettings(path=weights, imgsz=IMGSZ, device="cpu", backend="torch", labels=TEST_LABELS), 1
    )
    (found,) = detector.detect([frame], conf=0.25)
    assert len(found) >= 2, "people walk through this frame"
    probs = classifier.probabilities(classifier.crops(frame, found.xyxy.tolist()))
    merged = np.stack([probs[:, 0] + probs[:, 2], probs[:, 1]], axis=1)
    order = np.argsort(-found.confidence, kind="stable")
    assert len(image["detections"]) == len(found)
    for detection, k in zip(image["detections"], order, strict=True):
        assert detection["bbox"] == list(normalised_box(found.xyxy[k], 768, 576))
        # deer (two classes summed) first, then fox: both kept (at least 0.01), most likely first.
        assert [c[0] for c in detection["classifications"]] == ["0", "1"]
        assert [c[1] for c in detection["classifications"]] == pytest.approx(merged[k].tolist(), abs=0.0015)


@pytest.mark.parametrize(
    ("names", "first", "categories", "of_class"),
    [
        pytest.param(
            {0: "Normal", 1: "Fall"}, 1, {"1": "Normal", "2": "Fall"}, {0: "1", 1: "2"}, id="distinct"
        ),
        pytest.param({0: "person", 1: "person"}, 1, {"1": "person"}, {0: "1", 1: "1"}, id="renamed-to-one"),
        pytest.param(
            {2: "deer", 0: "deer", 1: "fox"},
            0,
            {"0": "deer", "1": "fox"},
            {0: "0", 1: "1", 2: "0"},
            id="merged",
        ),
    ],
)
def test_categories_give_one_id_per_name_in_class_order(names, first, categories, of_class):
    made = Categories.from_names(names, first=first, model="detector")
    assert made.names == categories
    assert made.of_class == of_class


def test_a_blank_class_name_is_refused_naming_the_model():
    with pytest.raises(ConfigError, match="classifier: class 1 has a blank name"):
        Categories.from_names({0: "deer", 1: " "}, first=0, model="classifier")


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        pytest.param((100, 50, 300, 250), (0.25, 0.125, 0.5, 0.5), id="inside"),
        pytest.param((-10, -5, 500, 450), (0.0, 0.0, 1.0, 1.0), id="clipped-to-the-picture"),
        pytest.param((1, 1, 2, 2), (0.0025, 0.0025, 0.0025, 0.0025), id="rounded-to-4-digits"),
    ],
)
def test_boxes_are_normalised_x_min_y_min_width_height(box, expected):
    assert normalised_box(box, 400, 400) == expected


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        pytest.param([0.1, 0.7, 0.2], [("b", 0.7), ("c", 0.2), ("a", 0.1)], id="best-first"),
        pytest.param([0.995, 0.004, 0.001], [("a", 0.995)], id="below-0.01-dropped"),
        pytest.param([0.004, 0.003, 0.003], [("a", 0.004)], id="the-best-always-kept"),
        pytest.param(
            [0.12, 0.11, 0.13, 0.14, 0.15, 0.16, 0.19],
            [("g", 0.19), ("f", 0.16), ("e", 0.15), ("d", 0.14), ("c", 0.13)],
            id="at-most-5",
        ),
    ],
)
def test_classifications_are_the_top_classes(scores, expected):
    ids = "abcdefg"[: len(scores)]
    assert top_classes(np.array(scores, np.float32), ids) == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(
            ["--format", "megadetector"],
            "error: --output: required with --format megadetector",
            id="no-output",
        ),
        pytest.param(
            ["--output", "r.json"], "error: --output: only with --format megadetector", id="output-jsonl"
        ),
        pytest.param(
            ["--checkpoint", 5], "error: --checkpoint: only with --format megadetector", id="checkpoint-jsonl"
        ),
        pytest.param(
            ["--format", "megadetector", "--output", "r.json", "--save", "annotated"],
            "error: --save: only with --format jsonl",
            id="save-megadetector",
        ),
        pytest.param(
            ["--format", "megadetector", "--output", "r.json", "--checkpoint", 0],
            "--checkpoint: must be at least 1 file, got 0",
            id="checkpoint-zero",
        ),
        pytest.param(
            ["--format", "megadetector", "--output", "r.json", "--classifier-imgsz", 100],
            "--classifier-imgsz: must be a multiple of 32 from 32 to 1024, got 100",
            id="classifier-imgsz",
        ),
    ],
)
def test_flags_of_the_other_format_or_out_of_range_are_refused_before_any_work(
    weights, tmp_path, flags, message
):
    ran = run_predict([PEOPLE_JPG, "--model", weights, *MODEL_ARGS, *flags])
    assert ran.code == EXIT_CONFIG
    assert message in ran.err
    assert ran.out == ""
    assert not (tmp_path / "r.json").exists()


def test_missing_folder_is_a_clear_error_before_the_model_loads(weights, tmp_path, monkeypatch):
    loaded: list[object] = []
    init = Detector.__init__

    def counting(self, *args, **kwargs):
        loaded.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "__init__", counting)
    missing = tmp_path / "nope"
    ran = run_megadetector(missing, tmp_path / "r.json", weights)
    assert ran.code == EXIT_STARTUP
    assert ran.err.strip() == f"error: {missing}: no such file or folder"
    assert loaded == []
