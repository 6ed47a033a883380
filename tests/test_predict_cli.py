"""``monitor predict PATH...``: JSON lines in the /predict format for images, folders and videos.

Run in-process on the real test weights; the video is the test clip, read at a
large stride so only a few frames go through the model.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from monitor.cli import EXIT_CONFIG, EXIT_STARTUP, main
from monitor.predict import PredictResponse, count_inputs, decode_image
from tests.conftest import CLIP, PEOPLE_JPG

IMGSZ = 320
VID_STRIDE = 100
MODEL_ARGS = ("--label", "Normal=person", "--label", "Fall=person", "--imgsz", str(IMGSZ), "--device", "cpu")


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out.splitlines()]


def run_predict(argv: Sequence[object]) -> Ran:
    """``monitor predict ARGV`` in this process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["predict", *(str(a) for a in argv)])
    return Ran(code, out.getvalue(), err.getvalue())


def clip_frames() -> int:
    """Frames of the test clip, counted by reading them (not from the container's header)."""
    capture = cv2.VideoCapture(str(CLIP))
    count = 0
    try:
        while capture.grab():
            count += 1
    finally:
        capture.release()
    return count


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A folder holding a copy of the people photo (same name) and a tiny black PNG."""
    folder = tmp_path_factory.mktemp("pictures")
    copy = folder / PEOPLE_JPG.name
    shutil.copyfile(PEOPLE_JPG, copy)
    black = folder / "black.png"
    assert cv2.imwrite(str(black), np.zeros((16, 16, 3), np.uint8))
    return folder, copy, black


@pytest.fixture(scope="module")
def predicted(weights: Path, inputs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory):
    folder = inputs[0]
    save = tmp_path_factory.mktemp("annotated") / "out"
    argv = [PEOPLE_JPG, folder, CLIP, "--model", weights, *MODEL_ARGS, "--vid-stride", VID_STRIDE]
    ran = run_predict([*argv, "--save", save])
    assert ran.code == 0, ran.err
    return ran, save


def assert_person_boxes_inside(results: list[dict], width: int, height: int) -> None:
    assert results, "the photo shows people"
    for result in results:
        assert result["label"] == "person"
        assert 0.25 <= result["confidence"] <= 1
        x1, y1, x2, y2 = result["boxes"]
        assert 0 <= x1 < x2 <= width, result["boxes"]
        assert 0 <= y1 < y2 <= height, result["boxes"]


def test_one_line_per_picture_and_per_video_frame_read_in_order(predicted, inputs):
    ran, _ = predicted
    _, copy, black = inputs
    lines = ran.lines()
    frames = list(range(0, clip_frames(), VID_STRIDE))
    assert len(frames) >= 2, "the clip should give a few frames at this stride"
    assert [line["path"] for line in lines] == [str(PEOPLE_JPG), str(black), str(copy)] + [str(CLIP)] * len(
        frames
    )
    assert [line.get("frame") for line in lines] == [None, None, None, *frames]
    # The progress bar's total is the number of lines, not every frame of the video.
    assert count_inputs([PEOPLE_JPG, inputs[0], CLIP], vid_stride=VID_STRIDE) == len(lines)


def test_every_line_has_the_predict_endpoint_shape(predicted):
    for line in predicted[0].lines():
        expected_keys = {"path", "results"} | ({"frame"} if "frame" in line else set())
        assert set(line) == expected_keys
        response = PredictResponse.model_validate({"results": line["results"]})
        assert response.model_dump() == {"results": line["results"]}
        for result in line["results"]:
            assert set(result) == {"label", "confidence", "boxes"}
            assert round(result["confidence"], 2) == result["confidence"]


def test_people_photo_gives_person_boxes_inside_it_and_its_copy_the_same(predicted, inputs):
    by_path = {line["path"]: line for line in predicted[0].lines() if "frame" not in line}
    photo = by_path[str(PEOPLE_JPG)]["results"]
    assert_person_boxes_inside(photo, 768, 576)
    assert by_path[str(inputs[1])]["results"] == photo
    assert by_path[str(inputs[2])]["results"] == []


def test_video_frames_show_people_inside_the_frame(predicted):
    video = [line for line in predicted[0].lines() if "frame" in line]
    assert any(line["results"] for line in video), "people walk through the test clip"
    for line in video:
        if line["results"]:
            assert_person_boxes_inside(line["results"], 768, 576)


def test_save_writes_one_decodable_annotated_copy_per_line(predicted, inputs):
    ran, save = predicted
    lines = ran.lines()
    written = sorted(p.name for p in save.iterdir())
    frames = [f"{CLIP.stem}_{line['frame']:06d}.jpg" for line in lines if "frame" in line]
    # Two pictures named people.jpg: the second copy does not overwrite the first.
    assert written == sorted(["people.jpg", "people-2.jpg", "black.jpg", *frames])
    photo = cv2.imread(str(PEOPLE_JPG))
    for name in written:
        data = (save / name).read_bytes()
        assert data[:2] == b"\xff\xd8", f"{name} is not a JPEG"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None, name
        assert image.shape == ((16, 16, 3) if name == "black.jpg" else (576, 768, 3)), name
    for name in ("people.jpg", "people-2.jpg"):
        annotated = cv2.imread(str(save / name)).astype(np.int16)
        # Boxes were drawn: far more than JPEG re-encoding noise differs from the photo.
        assert (np.abs(annotated - photo).max(axis=2) > 60).sum() > 1000, name


def test_missing_path_is_a_clear_error_and_nothing_is_printed(weights, tmp_path):
    missing = tmp_path / "nope.jpg"
    ran = run_predict([PEOPLE_JPG, missing, "--model", weights, *MODEL_ARGS])
    assert ran.code == EXIT_STARTUP
    assert ran.out == ""
    assert ran.err.strip() == f"error: {missing}: no such file or folder"


def test_file_that_is_not_a_picture_is_a_clear_error(weights, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("name,count\nelephant,3\n")
    ran = run_predict([notes, "--model", weights, *MODEL_ARGS])
    assert ran.code == EXIT_STARTUP
    assert ran.out == ""
    assert ran.err.startswith(f"error: {notes}: not a picture: expected one of JPEG")


def test_zero_video_stride_is_refused(weights):
    ran = run_predict([CLIP, "--model", weights, *MODEL_ARGS, "--vid-stride", 0])
    assert ran.code == EXIT_CONFIG
    assert ran.out == ""
    assert "--vid-stride: must be at least 1, got 0" in ran.err


@pytest.mark.parametrize(
    ("imgsz", "reason"),
    [
        pytest.param(412, "must be a multiple of 32 (the model's stride), got 412", id="not-a-multiple"),
        pytest.param(100, "must be a multiple of 32 (the model's stride), got 100", id="small-odd"),
        pytest.param(0, "greater than or equal to 32", id="zero"),
        pytest.param(-64, "greater than or equal to 32", id="negative"),
    ],
)
def test_imgsz_that_the_model_cannot_take_is_refused_like_in_the_config(weights, imgsz, reason):
    ran = run_predict([PEOPLE_JPG, "--model", weights, "--device", "cpu", "--imgsz", imgsz])
    assert ran.code == EXIT_CONFIG
    assert ran.out == "", "nothing is predicted"
    assert ran.err.startswith("error: --imgsz: "), ran.err
    assert reason in ran.err


def test_imgsz_flag_is_checked_over_a_valid_config_too(weights, tmp_path):
    config = tmp_path / "monitor.yaml"
    config.write_text(f"model:\n  path: {weights}\n  imgsz: {IMGSZ}\n  device: cpu\n")
    ran = run_predict([PEOPLE_JPG, "--config", config, "--imgsz", 100])
    assert ran.code == EXIT_CONFIG
    assert ran.out == ""
    assert "error: --imgsz: Value error, must be a multiple of 32 (the model's stride), got 100" in ran.err


def _png_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif.tobytes())  # lossless: pixels compare exactly
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoded_pictures_are_turned_as_pillows_exif_transpose_turns_them(orientation):
    """decode_image applies EXIF orientation itself (no extra full-size copies): same pixels as Pillow."""
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    data = _png_with_orientation(stored, orientation)
    with Image.open(io.BytesIO(data)) as picture:
        expected = np.asarray(ImageOps.exif_transpose(picture).convert("RGB"))[:, :, ::-1]
    decoded = decode_image(data, max_pixels=10_000)
    assert decoded.flags.c_contiguous
    assert decoded.flags.writeable
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "LA"])
def test_every_mode_decodes_to_what_pillows_rgb_conversion_gives(mode):
    """Converted strip by strip (a tall picture spans several strips): as one whole convert("RGB")."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (3000, 700, 3), dtype=np.uint8))
    picture = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    buffer = io.BytesIO()
    picture.save(buffer, "TIFF")
    with Image.open(io.BytesIO(buffer.getvalue())) as reread:
        expected = np.asarray(reread.convert("RGB"))[:, :, ::-1]
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), max_pixels=10**7), expected)
