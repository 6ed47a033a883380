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
from PIL import ExifTags, Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from monitor.errors import ConfigError, MonitorError

#: Formats accepted for upload (Pillow's names). MPO is a phone's multi-picture JPEG: its
#: first picture is the photo.
FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF", "HEIF")
#: Pixels converted to BGR at a time: the strips keep the conversion's own copies small.
_STRIP_PIXELS = 1 << 20
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".ts"}
# Pillow's own bomb guard warns or raises at a fixed limit; ``decode_image`` applies
# the configured one (http.max_pixels) from the header, before decoding.
Image.MAX_IMAGE_PIXELS = None
# Pillow keeps a picture's pixels in blocks of at most 16 MiB; glibc serves those from
# the calling thread's malloc arena and keeps them there once freed, so every HTTP worker
# thread that once decoded a big picture held on to ~200 MB more (measured). Blocks above
# glibc's largest mmap threshold (32 MiB) are mappings of their own, returned when freed.
# Small pictures are unaffected: a block is never larger than the picture.
Image.core.set_block_size(64 << 20)  # type: ignore[attr-defined]  # Pillow: not re-exported
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
            ``max_pixels``, 422 corrupt, truncated or otherwise undecodable.
    """
    with open_image(data, max_pixels) as picture:
        return picture.decode()


def open_image(data: bytes, max_pixels: int) -> UploadedImage:
    """Read an upload's header only: its format and size are checked, no pixel is decoded.

    Raises:
        ImageError: 415 not a picture or an unsupported format, 413 more than
            ``max_pixels``, 422 an unreadable header.
    """
    if not data:
        raise ImageError(422, "the file is empty")
    try:
        picture = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(415, f"not a picture: expected one of {', '.join(FORMATS)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's header parsers raise more than OSError on hostile files
        raise ImageError(422, f"unreadable picture: {exc}") from exc
    if picture.format not in FORMATS:
        picture.close()
        raise ImageError(415, f"unsupported format {picture.format}: expected one of {', '.join(FORMATS)}")
    width, height = picture.size
    if width * height > max_pixels:
        picture.close()
        raise ImageError(
            413, f"picture is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return UploadedImage(picture)


class UploadedImage:
    """An upload whose header passed ``open_image``; ``decode`` reads its pixels once.

    A context manager: leaving it frees Pillow's copy of the pixels.
    """

    def __init__(self, picture: Image.Image) -> None:
        self._picture = picture

    @property
    def format(self) -> str:
        """Pillow's name of the format (``JPEG``, ``MPO``, ``PNG`` ...)."""
        return str(self._picture.format)

    @property
    def pixels(self) -> int:
        """Width times height, as the header declares them."""
        width, height = self._picture.size
        return width * height

    def decode(self) -> np.ndarray:
        """The picture as HxWx3 uint8 BGR, upright; a multi-picture file gives its first picture.

        Memory: Pillow's decoded picture (4 bytes a pixel for RGB) plus the 3-byte
        BGR result, converted strip by strip; no other full-size copy, except
        one more of the result when the EXIF orientation turns or flips it.

        Raises:
            ImageError: 422 for anything the decoder fails on (corrupt, truncated,
                or tags of the wrong type): what the client sent is at fault.
        """
        picture = self._picture
        try:
            orientation = _orientation(picture)
            picture.load()
            width, height = picture.size
            bgr = np.empty((height, width, 3), np.uint8)
            rows = max(1, _STRIP_PIXELS // max(width, 1))
            for top in range(0, height, rows):
                bottom = min(top + rows, height)
                strip = picture.crop((0, top, width, bottom))
                if strip.mode != "RGB":
                    strip = strip.convert("RGB")
                # Pillow packs RGB as BGR itself: no RGB array to reverse and copy afterwards.
                raw = strip.tobytes("raw", "BGR")
                bgr[top:bottom] = np.frombuffer(raw, np.uint8).reshape(bottom - top, width, 3)
        except MemoryError:
            raise
        except Exception as exc:  # Pillow: truncated or corrupt data, or struct/type errors in tags
            raise ImageError(422, f"corrupt or truncated {picture.format} picture: {exc}") from exc
        finally:
            picture.close()  # frees Pillow's pixels before the orientation copy
        return _upright(bgr, orientation)

    def close(self) -> None:
        self._picture.close()

    def __enter__(self) -> UploadedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _orientation(picture: Image.Image) -> int:
    """The EXIF orientation, 1 to 8, as ``ImageOps.exif_transpose`` reads it from EXIF.

    An EXIF block that cannot be read counts as no orientation: the picture is
    used as stored, as cv2.imread does, instead of refusing it.
    """
    try:
        value = picture.getexif().get(ExifTags.Base.Orientation, 1)
    except MemoryError:
        raise
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` (HxWxC) turned as EXIF ``orientation`` says; Pillow's ``exif_transpose`` table."""
    views = {
        1: image,
        2: image[:, ::-1],  # FLIP_LEFT_RIGHT
        3: image[::-1, ::-1],  # ROTATE_180
        4: image[::-1],  # FLIP_TOP_BOTTOM
        5: image.transpose(1, 0, 2),  # TRANSPOSE
        6: np.rot90(image, -1),  # ROTATE_270 (clockwise)
        7: image.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
        8: np.rot90(image, 1),  # ROTATE_90 (counter-clockwise)
    }
    return np.ascontiguousarray(views[orientation])


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
    for path in input_files(paths):
        if is_video(path):
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
    for path in input_files(paths):
        if is_video(path):
            with Video(path) as video:
                for index, frame in video.frames(vid_stride):
                    yield Picture(path, index, frame)
        else:
            yield Picture(path, None, read_image(path))


def input_files(paths: list[Path]) -> Iterator[Path]:
    """The files ``paths`` name: files as given, and the images and videos in folders (recursive, sorted).

    Folders are listed lazily, one at a time, when the iteration reaches them.

    Raises:
        ImageError: A path that does not exist (422).
    """
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
            )
        elif path.is_file():
            yield path
        else:
            raise ImageError(422, f"{path}: no such file or folder")


def is_video(path: Path) -> bool:
    """Whether ``path`` is read as a video (by its suffix, ``VIDEO_SUFFIXES``) rather than an image."""
    return path.suffix.lower() in VIDEO_SUFFIXES


def read_image(path: Path) -> np.ndarray:
    """The picture in file ``path`` as HxWx3 uint8 BGR, upright, as ``decode_image`` decodes uploads.

    Raises:
        ImageError: The file cannot be read (422), is not a supported picture (415) or
            is corrupt or truncated (422); the message starts with the path.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(422, f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return decode_image(data, max_pixels=2**31)
    except ImageError as exc:  # name the file: the command line may have many
        raise ImageError(exc.status, f"{path}: {exc}") from exc


class Video:
    """A video file opened with OpenCV: its frame rate and its frames. A context manager.

    Args:
        path: The video file.

    Raises:
        ImageError: OpenCV cannot open ``path`` as a video (415).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._capture = cv2.VideoCapture(str(path))
        if not self._capture.isOpened():
            self._capture.release()
            raise ImageError(415, f"{path}: cannot open as a video")

    @property
    def fps(self) -> float:
        """Frames per second as the container declares them; 0.0 when it does not say."""
        return max(float(self._capture.get(cv2.CAP_PROP_FPS)), 0.0)

    def frames(self, stride: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, frame)`` for frames 0, ``stride``, 2 ``stride`` ... until the first that cannot be read.

        Frames in between are grabbed, not converted to BGR: seeking instead is not
        frame-exact in every container.

        Raises:
            ConfigError: ``stride`` below 1.
        """
        _check_stride(stride)
        index = 0
        while self._capture.grab():
            if index % stride == 0:
                ok, frame = self._capture.retrieve()
                if not ok:
                    return
                yield index, frame
            index += 1

    def close(self) -> None:
        self._capture.release()

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
