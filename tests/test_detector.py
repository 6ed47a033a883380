"""The batched detector finds what Ultralytics' own predict finds, on real frames."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import supervision as sv

from monitor.detector import Detector, place
from monitor.errors import DetectorError
from monitor.letterbox import Letterboxed, NetInput, letterbox_into
from monitor.settings import ModelSettings
from tests.conftest import CLIP, TEST_IMGSZ, TEST_LABELS

#: Detections this close to the confidence floor may fall on either side of it.
BORDER = 0.02


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(CLIP))
    out = []
    index = 0
    while len(out) < 6:
        ok, frame = cap.read()
        assert ok, "the test clip ended early"
        if index % 40 == 0:
            out.append(frame)
        index += 1
    cap.release()
    return out


@pytest.fixture(scope="module")
def detector(weights: Path) -> Detector:
    return Detector(
        ModelSettings(path=weights, imgsz=TEST_IMGSZ, device="cpu", labels=TEST_LABELS, backend="torch"), 16
    )


def _reference(weights: Path, images: list[np.ndarray]) -> list[sv.Detections]:
    from ultralytics import YOLO

    model = YOLO(str(weights))
    return [
        sv.Detections.from_ultralytics(model.predict(im, imgsz=TEST_IMGSZ, verbose=False)[0]) for im in images
    ]


def _assert_same(ours: sv.Detections, ref: sv.Detections, names: dict[int, str]) -> None:
    floor = 0.25 + BORDER
    sure_ref = ref[ref.confidence >= floor]
    sure_ours = ours[ours.confidence >= floor]
    for a, b in ((sure_ref, ours), (sure_ours, ref)):
        if len(a) == 0:
            continue
        assert len(b) > 0, "a detection has no counterpart"
        iou = sv.box_iou_batch(a.xyxy, b.xyxy)
        match = iou.argmax(axis=1)
        assert (iou.max(axis=1) >= 0.9).all(), iou.max(axis=1)
        assert np.abs(a.confidence - b.confidence[match]).max() <= 0.02
        assert (a.class_id == b.class_id[match]).all()
    assert set(ours.data["class_name"]) <= {"person"}
    assert all(names[c] == "person" for c in ours.class_id)


def test_batch_matches_ultralytics_predict_per_frame(weights, detector, frames):
    ours = detector.detect(frames)
    reference = _reference(weights, frames)
    assert sum(len(r) for r in reference) >= 6, "the clip should show people"
    for o, r in zip(ours, reference, strict=True):
        _assert_same(o, r, detector.names)


def test_batch_of_mixed_cameras_matches_predict(weights, detector, frames):
    mixed = [frames[0], cv2.resize(frames[1], (640, 360)), cv2.resize(frames[2], (1280, 960)), frames[3]]
    ours = detector.detect(mixed)
    for o, r, image in zip(ours, _reference(weights, mixed), mixed, strict=True):
        _assert_same(o, r, detector.names)
        if len(o):
            assert (o.xyxy[:, [0, 2]] <= image.shape[1]).all()
            assert (o.xyxy[:, [1, 3]] <= image.shape[0]).all()


def test_every_batch_is_padded_afresh_nothing_of_an_earlier_batch_reaches_the_network(detector, frames):
    # The uint8 batch is kept from batch to batch (no allocation per batch): each row must
    # still be exactly its frame's letterbox and grey everywhere else, whatever came before.
    big, small = cv2.resize(frames[1], (1280, 960)), cv2.resize(frames[0], (640, 360))
    net = detector.net_input

    def expected(images: list[np.ndarray]) -> np.ndarray:
        boxes = _letterboxed(images, net)
        height = max(b.image.shape[0] for b in boxes)
        width = max(b.image.shape[1] for b in boxes)
        batch = np.full((len(images), height, width, 3), 114, np.uint8)
        for row, b in zip(batch, boxes, strict=True):
            row[: b.image.shape[0], : b.image.shape[1]] = b.image
        return batch[..., ::-1].transpose(0, 3, 1, 2) / 255

    for images in ([big, big], [big, small], [small], [small, big], [big, small]):
        tensor, _ = detector._preprocess(images)
        assert np.allclose(tensor.numpy(), expected(images), atol=1e-6), [im.shape for im in images]


def _letterboxed(images: list[np.ndarray], net: NetInput) -> list[Letterboxed]:
    """What the decoder children hand over beside each frame."""
    out = []
    for image in images:
        p = net.place(*image.shape[:2])
        box = np.empty((p.input_height, p.input_width, 3), np.uint8)
        letterbox_into(image, box, p)
        out.append(Letterboxed(box, p, net))
    return out


def _assert_identical(ours: list[sv.Detections], want: list[sv.Detections]) -> None:
    for a, b in zip(ours, want, strict=True):
        assert np.array_equal(a.xyxy, b.xyxy)
        assert np.array_equal(a.confidence, b.confidence)
        assert np.array_equal(a.class_id, b.class_id)


def test_frames_letterboxed_by_their_decoder_are_detected_without_reading_their_pixels(detector, frames):
    mixed = [frames[0], cv2.resize(frames[1], (1920, 1080)), frames[2], cv2.resize(frames[3], (1280, 720))]
    own = detector.detect(mixed)
    assert sum(len(d) for d in own) >= 3, "the clip should show people"
    blank = [np.zeros_like(image) for image in mixed]  # the frames' own pixels: never read
    ours = detector.detect_timed(blank, prepared=_letterboxed(mixed, detector.net_input)).detections
    _assert_identical(ours, own)  # boxes in each frame's own pixels, as if it had letterboxed them


def test_a_letterbox_made_for_another_input_is_made_again(detector, frames):
    net = detector.net_input
    other = NetInput(net.imgsz * 2, net.stride, net.rect)  # a decoder started for another model
    prepared = _letterboxed(frames[:2], other)
    _assert_identical(
        detector.detect_timed(frames[:2], prepared=prepared).detections, detector.detect(frames[:2])
    )


def test_empty_frame_gives_no_detections(detector):
    (result,) = detector.detect([np.zeros((10, 10, 3), np.uint8)])
    assert len(result) == 0


@pytest.mark.parametrize("rect", [True, False])
@pytest.mark.parametrize(
    "shape", [(576, 768), (720, 1280), (1080, 1080), (1080, 1920), (481, 641), (33, 1000), (1000, 33)]
)
def test_placement_is_ultralytics_letterbox(shape, rect):
    # A white frame through Ultralytics' own LetterBox: the input's size is its output's,
    # and the picture sits where the pixels are not the padding grey.
    from ultralytics.data.augment import LetterBox

    out = LetterBox(new_shape=(416, 416), auto=rect, stride=32)(image=np.full((*shape, 3), 255, np.uint8))
    rows, cols = np.nonzero(out[:, :, 0] != 114)
    p = place(shape[0], shape[1], 416, 32, rect=rect)
    assert (p.input_height, p.input_width) == out.shape[:2]
    assert (p.top, p.left) == (rows.min(), cols.min())
    assert (p.height, p.width) == (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(DetectorError, match="does not exist"):
        Detector(ModelSettings(path=tmp_path / "nope.pt", device="cpu"), 16)


def test_corrupt_weights_are_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(DetectorError, match="could not be loaded as a YOLO model"):
        Detector(ModelSettings(path=bad, device="cpu"), 16)


def test_auto_backend_on_cpu_exports_openvino_once_and_keeps_parity(weights, tmp_path, frames):
    local = tmp_path / "models" / "best.pt"
    local.parent.mkdir()
    local.write_bytes(weights.read_bytes())
    settings = ModelSettings(path=local, imgsz=TEST_IMGSZ, device="cpu", labels=TEST_LABELS)
    first = Detector(settings, 16)
    assert first.runtime == "openvino"
    exports = sorted(p.name for p in local.parent.iterdir() if p.name.endswith("_openvino_model"))
    assert exports == [f"best-{first.sha256[:12]}-{TEST_IMGSZ}_openvino_model"]
    cached = exports[0]
    modified = (local.parent / cached).stat().st_mtime_ns
    second = Detector(settings, 16)  # uses the cached export
    assert (local.parent / cached).stat().st_mtime_ns == modified
    assert second.label == f"best.pt@{first.sha256[:12]}"
    for ours, ref in zip(second.detect(frames), _reference(weights, frames), strict=True):
        _assert_same(ours, ref, second.names)


def _reference_cuda(weights: Path, images: list[np.ndarray]) -> list[sv.Detections]:
    """Ultralytics' own predict on CUDA device 0 in fp16, one frame at a time."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    return [
        sv.Detections.from_ultralytics(
            model.predict(im, imgsz=TEST_IMGSZ, device=0, half=True, verbose=False)[0]
        )
        for im in images
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_cuda_fp16_batch_matches_ultralytics_predict_on_device_0(weights, frames, compile_):
    settings = ModelSettings(
        path=weights,
        imgsz=TEST_IMGSZ,
        device="cuda:0",
        labels=TEST_LABELS,
        backend="torch",
        compile=compile_,
    )
    detector = Detector(settings, max_batch=len(frames))
    assert (detector.runtime, detector.half, detector.compiled) == ("torch", True, compile_)
    detector.warmup()
    # Five frames: with compile the batch is padded up to the bucket of 8, and the padding dropped.
    batch = frames[:5]
    reference = _reference_cuda(weights, batch)
    assert sum(len(r) for r in reference) >= 5, "the clip should show people"
    for _ in range(2):  # the second pass replays what the first captured (CUDA graphs when compiled)
        ours = detector.detect(batch)
        assert len(ours) == len(batch)
        for o, r, image in zip(ours, reference, batch, strict=True):
            _assert_same(o, r, detector.names)
            if len(o):
                assert (o.xyxy[:, [0, 2]] <= image.shape[1]).all()
                assert (o.xyxy[:, [1, 3]] <= image.shape[0]).all()
    assert detector.memory_bytes() > 0
