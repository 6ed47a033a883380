"""Single pictures through the model: the seed's ``/predict`` contract and ``monitor predict``.

The seed project served ``POST /predict`` returning
``{"results": [{"label", "confidence", "boxes": [x1, y1, x2, y2]}]}`` with
confidences rounded to 2 decimals and boxes in image pixels; ``PredictResponse``
keeps that shape exactly.

Uploads are checked before any pixel is decoded: Pillow reads the header for
the format and the size, so a decompression bomb is refused by its declared
size, and an unknown format never reaches a decoder. Each refusal is an
``ImageError`` carrying the HTTP status it maps to.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import supervision as sv
from pi_heif import register_heif_opener
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field

from monitor.errors import ConfigError, MonitorError

#: Formats accepted for upload (Pillow's names).
FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "HEIF")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".ts"}
# Pillow's own bomb guard warns or raises at a fixed limit; ``decode_image`` applies
# the configured one (http.max_pixels) from the header, before decoding.
Image.MAX_IMAGE_PIXELS = None
register_heif_opener()


class ImageError(MonitorError):
    """An upload that is not a usable picture.

    Attributes:
        status: The HTTP status it maps to (413, 415 or 422).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PredictResult(BaseModel):
    """One detection, as the seed returned it."""

    label: str
    confidence: float = Field(description="Rounded to 2 decimals.")
    boxes: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in image pixels.")


class PredictResponse(BaseModel):
    """The body of ``POST /predict``."""

    results: list[PredictResult]


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an uploaded picture to HxWx3 uint8 BGR (EXIF orientation applied, like cv2.imread).

    Raises:
        ImageError: 415 not a picture or an unsupported format, 413 more than
            ``max_pixels``, 422 corrupt or truncated.
    """
    if not data:
        raise ImageError(422, "the file is empty")
    try:
        picture = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(415, f"not a picture: expected one of {', '.join(FORMATS)}") from None
    except (OSError, ValueError) as exc:
        raise ImageError(422, f"unreadable picture: {exc}") from exc
    with picture:
        if picture.format not in FORMATS:
            expected = ", ".join(FORMATS)
            raise ImageError(415, f"unsupported format {picture.format}: expected one of {expected}")
        width, height = picture.size
        if width * height > max_pixels:
            raise ImageError(
                413, f"picture is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
        try:
            picture.load()
            upright = ImageOps.exif_transpose(picture)
            rgb = np.asarray(upright.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow: truncated or corrupt data
            raise ImageError(422, f"corrupt or truncated {picture.format} picture: {exc}") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])


def to_response(detections: sv.Detections) -> PredictResponse:
    """The seed's response for one picture's detections."""
    names = detections.data.get("class_name", [])
    confidence = detections.confidence if detections.confidence is not None else np.ones(len(detections))
    return PredictResponse(
        results=[
            PredictResult(
                label=str(name),
                confidence=round(float(score), 2),
                boxes=[round(float(v), 1) for v in box],
            )
            for box, score, name in zip(detections.xyxy, confidence, names, strict=True)
        ]
    )


@dataclass(frozen=True, slots=True)
class Picture:
    """One picture to predict on: a file, or one frame of a video."""

    path: Path
    frame: int | None
    image: np.ndarray


def count_inputs(paths: list[Path], vid_stride: int = 1) -> int:
    """How many pictures ``iter_pictures`` will yield (video frames counted), for a progress bar.

    Raises:
        ImageError: A path that does not exist.
        ConfigError: ``vid_stride`` below 1.
    """
    _check_stride(vid_stride)
    total = 0
    for path in _files(paths):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            cap = cv2.VideoCapture(str(path))
            frames = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
            cap.release()
            total += -(-frames // vid_stride)  # frames 0, stride, 2 * stride ... below the count
        else:
            total += 1
    return total


def iter_pictures(paths: list[Path], vid_stride: int = 1) -> Iterator[Picture]:
    """Images, the images in folders (recursively, sorted), and every ``vid_stride``-th video frame.

    Raises:
        ImageError: A file that is neither a supported image nor a video.
        ConfigError: ``vid_stride`` below 1.
    """
    _check_stride(vid_stride)
    for path in _files(paths):
        if path.suffix.lower() in VIDEO_SUFFIXES:
            cap = cv2.VideoCapture(str(path))
            if not cap.isOpened():
                raise ImageError(415, f"{path}: cannot open as a video")
            index = 0
            try:
                while True:
                    ok, frame = cap.read()
                    if not ok:
                        break
                    if index % vid_stride == 0:
                        yield Picture(path, index, frame)
                    index += 1
            finally:
                cap.release()
        else:
            try:
                image = decode_image(path.read_bytes(), max_pixels=2**31)
            except ImageError as exc:  # name the file: the command line may have many
                raise ImageError(exc.status, f"{path}: {exc}") from exc
            yield Picture(path, None, image)


def annotated_name(picture: Picture, taken: set[str]) -> str:
    """The file name of ``picture``'s annotated copy, unique among ``taken`` (which it joins).

    ``people.jpg`` becomes ``people.jpg``, frame 40 of ``clip.mp4`` becomes
    ``clip_000040.jpg``; a second ``people.jpg`` from another folder becomes
    ``people-2.jpg`` instead of overwriting the first.
    """
    stem = picture.path.stem + (f"_{picture.frame:06d}" if picture.frame is not None else "")
    name, n = f"{stem}.jpg", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.jpg"
    taken.add(name)
    return name


def _check_stride(vid_stride: int) -> None:
    if vid_stride < 1:
        raise ConfigError([f"--vid-stride: must be at least 1, got {vid_stride}"])


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
            )
        elif path.is_file():
            yield path
        else:
            raise ImageError(422, f"{path}: no such file or folder")
