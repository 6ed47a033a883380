"""NVDEC for the decoder child: PyNvVideoCodec behind the part of ``cv2.VideoCapture`` it uses.

``monitor.decoder`` opens a camera with it when the camera's decoder is
``nvdec`` (or ``auto`` with PyNvVideoCodec installed), and falls back to
OpenCV when it raises.
"""

from __future__ import annotations

import ctypes
from collections import deque
from typing import Any

import numpy as np


class NvdecCapture:
    """NVDEC through PyNvVideoCodec, behind the part of ``cv2.VideoCapture`` the loop uses.

    PyNvVideoCodec's demuxer (its own FFmpeg) reads the stream, the GPU's video
    decoder decodes it into host memory as NV12, and ``retrieve`` converts that
    to BGR with OpenCV, so everything after the decoder is the same as on the CPU.
    The open and read timeouts are the parent's watchdog (``open_timeout``,
    ``stall_timeout``): this child is killed when either runs out.

    Raises:
        Exception: Whatever PyNvVideoCodec raises when it cannot open or decode the
            stream (no GPU, an unsupported codec); the caller falls back to the CPU.
    """

    def __init__(self, cv2: Any, url: str, gpu: int = 0) -> None:
        import PyNvVideoCodec as nvc

        self._cv2 = cv2
        self._demuxer = nvc.CreateDemuxer(filename=url)
        self._decoder = nvc.CreateDecoder(
            gpuid=gpu, codec=self._demuxer.GetNvCodecId(), usedevicememory=False
        )
        self._packets = iter(self._demuxer)
        self._pending: deque[Any] = deque()
        self._frame: Any = None
        self._fps = float(self._demuxer.FrameRate())

    def isOpened(self) -> bool:  # cv2.VideoCapture's name
        return True

    def get(self, prop: int) -> float:
        return self._fps if prop == self._cv2.CAP_PROP_FPS else 0.0

    def grab(self) -> bool:
        while not self._pending:
            packet = next(self._packets, None)
            if packet is None:
                return False
            self._pending.extend(self._decoder.Decode(packet))
        self._frame = self._pending.popleft()
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        frame, self._frame = self._frame, None
        if frame is None:
            return False, None
        width, height = int(self._decoder.GetWidth()), int(self._decoder.GetHeight())
        size = int(frame.framesize())
        if size != width * height * 3 // 2:  # not 8-bit 4:2:0 (NV12)
            return False, None
        address = ctypes.cast(frame.GetPtrToPlane(0), ctypes.POINTER(ctypes.c_uint8))
        nv12 = np.ctypeslib.as_array(address, shape=(size,)).reshape(height * 3 // 2, width)
        return True, self._cv2.cvtColor(nv12, self._cv2.COLOR_YUV2BGR_NV12)

    def release(self) -> None:
        self._pending.clear()
        self._frame = self._decoder = self._demuxer = self._packets = None
