"""The network input's geometry (Ultralytics' letterbox), shared by the detector and the decoder children.

A decoder child letterboxes each frame it hands over into the network's
input size itself (``NetInput``), so the main process never touches a
frame's full-resolution pixels to detect it: its per-frame cost does not
depend on the camera's resolution. The detector checks that a frame's
letterbox is the one it would have made (the same ``place``), and makes it
itself otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114  # Ultralytics' letterbox grey


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a frame sits in the network input.

    Attributes:
        left: Padding columns before the image.
        top: Padding rows before the image.
        width: Scaled image width.
        height: Scaled image height.
        input_width: Width of the padded input this frame alone would need.
        input_height: Height of the padded input this frame alone would need.
    """

    left: int
    top: int
    width: int
    height: int
    input_width: int
    input_height: int


def place(height: int, width: int, imgsz: int, stride: int, rect: bool) -> Placement:
    """Ultralytics' letterbox geometry for one frame (``LetterBox(auto=rect)``)."""
    scale = min(imgsz / height, imgsz / width)
    new_w, new_h = max(round(width * scale), 1), max(round(height * scale), 1)
    dw, dh = imgsz - new_w, imgsz - new_h
    if rect:
        dw, dh = dw % stride, dh % stride
    half_w, half_h = dw / 2, dh / 2
    left, right = round(half_w - 0.1), round(half_w + 0.1)
    top, bottom = round(half_h - 0.1), round(half_h + 0.1)
    return Placement(left, top, new_w, new_h, new_w + left + right, new_h + top + bottom)


@dataclass(frozen=True, slots=True)
class NetInput:
    """The detector's input geometry, which the decoder children letterbox frames into.

    Attributes:
        imgsz: ``model.imgsz``.
        stride: The network's largest stride.
        rect: True when the network takes each batch's minimal rectangle (``.pt``, dynamic
            exports); False for a fixed ``imgsz`` x ``imgsz`` input.
    """

    imgsz: int
    stride: int
    rect: bool

    @property
    def max_bytes(self) -> int:
        """Bytes of the largest letterbox (the input is never wider or taller than ``imgsz``)."""
        return self.imgsz * self.imgsz * 3

    def place(self, height: int, width: int) -> Placement:
        """Where a ``height`` x ``width`` frame goes in the input."""
        return place(height, width, self.imgsz, self.stride, self.rect)


@dataclass(frozen=True, slots=True)
class Letterboxed:
    """A frame already letterboxed into the network input.

    Attributes:
        image: ``input_height`` x ``input_width`` x 3 uint8 BGR, padded with ``PAD_VALUE``.
        placement: Where the frame sits in it.
        net: The geometry it was made for.
    """

    image: np.ndarray
    placement: Placement
    net: NetInput


def letterbox_into(image: np.ndarray, dest: np.ndarray, p: Placement) -> None:
    """Letterbox ``image`` into ``dest`` (``p.input_height`` x ``p.input_width`` x 3), as the detector does.

    cv2's uint8 ``INTER_LINEAR`` resize into the middle, ``PAD_VALUE`` around it: the
    detector's own CPU preprocessing, and Ultralytics' ``LetterBox``.
    """
    if image.shape == dest.shape:  # already the input's size (a letterbox made by a child)
        np.copyto(dest, image)
        return
    bottom, right = p.top + p.height, p.left + p.width
    dest[: p.top] = PAD_VALUE
    dest[bottom:] = PAD_VALUE
    dest[p.top : bottom, : p.left] = PAD_VALUE
    dest[p.top : bottom, right:] = PAD_VALUE
    target = dest[p.top : bottom, p.left : right]
    if (p.height, p.width) == image.shape[:2]:
        target[...] = image
    else:
        cv2.resize(image, (p.width, p.height), dst=target, interpolation=cv2.INTER_LINEAR)


def put(row: np.ndarray, image: np.ndarray, p: Placement) -> None:
    """``image`` letterboxed into one row of a batch at ``p``, ``PAD_VALUE`` in the rest of the row.

    The row may be larger than ``p``'s input (a batch of mixed shapes takes the largest).
    """
    if row.shape[:2] == (p.input_height, p.input_width):  # the usual case: one shape in the batch
        letterbox_into(image, row, p)
        return
    letterbox_into(image, row[: p.input_height, : p.input_width], p)
    row[p.input_height :] = PAD_VALUE
    row[: p.input_height, p.input_width :] = PAD_VALUE


class BatchBuffer:
    """A uint8 batch of network inputs (NHWC), kept from batch to batch.

    A fresh batch per call costs an allocation and a pass filling it, thousands
    of times a second with many cameras; this one is made once per
    input shape (a few per deployment), and each image writes only its own row
    (``put``).
    """

    #: Input shapes kept at most (mixed cameras give a few; beyond, the oldest goes).
    SHAPES = 8

    def __init__(self) -> None:
        self._arrays: dict[tuple[int, int], np.ndarray] = {}

    def take(self, rows: int, height: int, width: int) -> np.ndarray:
        """``rows`` x ``height`` x ``width`` x 3, contiguous, its contents left from before."""
        key = (height, width)
        array = self._arrays.get(key)
        if array is None or len(array) < rows:
            if array is None and len(self._arrays) >= self.SHAPES:
                del self._arrays[next(iter(self._arrays))]
            array = self._arrays[key] = np.empty((rows, height, width, 3), np.uint8)
        return array[:rows]
