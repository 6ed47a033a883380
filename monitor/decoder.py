"""The decoder child: one process per camera, writing frames into shared memory.

A Python thread stuck inside a C call (an OpenCV read on a frozen RTSP
connection) cannot be killed, so every camera is decoded in its own child
process that the parent (``sources.Source``) can kill and restart. The child:

* opens the stream with OpenCV's FFmpeg backend (RTSP over TCP, open and
  read timeouts), or with NVDEC through PyNvVideoCodec, plays a local file in
  real time and loops it;
* decodes every frame but converts and scales only the ones due at the
  camera's detect fps (``grab`` for all, ``retrieve`` for those);
* writes each due frame into one of ``SLOTS`` slots of a shared-memory block
  the parent owns, with the frame letterboxed into the network's input beside
  it (``monitor.letterbox``), then sends a small ``FrameReady`` message on a
  pipe; it never writes into the slot the parent holds (``Slots``);
* when it gives up, sends ``Failed`` with a fixed phrase: FFmpeg's own
  messages (which may hold the URL's credentials) never leave the process.

This module is also the protocol between the two sides: the messages, the
slot layout and the frame size.
"""

from __future__ import annotations

import ctypes
import multiprocessing.connection as mpc
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal

from monitor.decoder_nvdec import NvdecCapture
from monitor.logs import redact
from monitor.settings import CameraSettings
from monitor.slots import Handoff, Slots

#: Frames larger than this (pixels) are scaled down, keeping their aspect.
MAX_NATIVE = (1920, 1080)
#: FFmpeg input options: RTSP over TCP (no UDP loss), and at most 1 s of stream
#: probing (the default 5 s makes every (re)connect slow).
FFMPEG_OPTIONS = "rtsp_transport;tcp|analyzeduration;1000000"

Decoder = Literal["cpu", "nvdec"]


# Messages from the decoder child to the parent.
@dataclass(frozen=True, slots=True)
class Opening:
    """The child is up and starts opening the stream (open_timeout runs from here)."""


@dataclass(frozen=True, slots=True)
class Opened:
    width: int
    height: int
    fps: float
    decoder: Decoder = "cpu"
    #: Why the stream is decoded on the CPU although nvdec was chosen.
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class SegmentClosed:
    """A recording segment is complete on disk (``monitor.recording``): clips waiting for it may be cut."""

    path: str
    start: float
    end: float
    bytes: int


@dataclass(frozen=True, slots=True)
class RecordingFailed:
    """Segments cannot be written (a full disk): detection goes on, recording retries later."""

    reason: str


@dataclass(frozen=True, slots=True)
class RecordTarget:
    """Where and how a recording camera's child writes its segments."""

    directory: str
    segment: float


@dataclass(frozen=True, slots=True)
class Failed:
    """The child gives up: ``reason`` for the status; ``stalled`` when frames stopped coming."""

    reason: str
    stalled: bool = False


def stall_reason(settings: CameraSettings) -> str:
    """The reason of a ``stalled`` camera: no frame for ``stall_timeout`` seconds."""
    return f"no frame for {settings.stall_timeout:g} s"


def frame_bytes(settings: CameraSettings) -> int:
    """Bytes of one frame: the configured detect size, else the native cap."""
    width = settings.detect.width or MAX_NATIVE[0]
    height = settings.detect.height or MAX_NATIVE[1]
    return width * height * 3


#: The body of a decoder child: (the stream's URL, its slots, the stderr reader) -> exit code.
ChildBody = Callable[[str, "Slots", "_StderrReasons"], int]


def run_child(settings: CameraSettings, handoff: Handoff, conn: mpc.Connection, body: ChildBody) -> None:
    """What every decoder child does around its loop; exits non-zero with a ``Failed`` message.

    The OpenCV child (``decoder_main``) and a recording camera's PyAV child
    (``monitor.decoder_av.record_main``) share it: signals, FFmpeg's captured
    output, the shared memory, and a failure reported without the URL.
    """
    # Ctrl-C reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # FFmpeg's messages say why a stream failed, but can carry the URL with its
    # credentials: they go to a pipe that only ``_StderrReasons`` reads.
    reasons = _StderrReasons()
    os.environ["OPENCV_FFMPEG_DEBUG"] = "1"
    os.environ["OPENCV_LOG_LEVEL"] = "WARNING"
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = FFMPEG_OPTIONS
    url = settings.url.get_secret_value()
    shm = SharedMemory(name=handoff.shm_name)
    try:
        code = body(url, Slots(shm, handoff, conn), reasons)
    except Exception as exc:  # report, never print a traceback with the URL
        conn.send(Failed(redact(f"decoder error: {exc}")))
        code = 70
    finally:
        shm.close()
    os._exit(code)


def decoder_main(
    settings: CameraSettings, fps: float, handoff: Handoff, conn: mpc.Connection, decoder: Decoder = "cpu"
) -> None:
    """Entry point of a decoder child reading with OpenCV (or NVDEC)."""

    def body(url: str, slots: Slots, reasons: _StderrReasons) -> int:
        import cv2  # imported here: the parent's import of this module stays light

        return _decode_loop(cv2, settings, url, fps, slots, conn, reasons, decoder)

    run_child(settings, handoff, conn, body)


#: FFmpeg messages (seen through OpenCV) and the reason they give, first match wins.
_REASONS = [
    (
        re.compile(r"invalid data found|could not find codec|no video|moov atom not found", re.I),
        "no video stream",
    ),
    (re.compile(r"connection refused", re.I), "connection refused"),
    (re.compile(r"\b401\b|unauthori[sz]ed", re.I), "unauthorized"),
    (re.compile(r"\b403\b|forbidden", re.I), "forbidden"),
    (re.compile(r"\b404\b|not found|no such file", re.I), "not found"),
    (re.compile(r"timed? ?out|timeout triggered", re.I), "timeout"),
    (re.compile(r"no route to host|network is unreachable", re.I), "unreachable"),
    (re.compile(r"name or service not known|failed to resolve|name resolution", re.I), "host not found"),
]


def classify(text: str) -> str | None:
    """The fixed phrase for an FFmpeg error message, or None when none fits."""
    for pattern, reason in _REASONS:
        if pattern.search(text):
            return reason
    return None


_FFMPEG_LINE = re.compile(r"^\[OPENCV:FFMPEG:(\d+)\] (.*)")
_FFMPEG_VERBOSE = 40  # AV_LOG_VERBOSE: connection attempts and errors; lower numbers are worse


class _StderrReasons:
    """Reads the child's own stdout and stderr and remembers why FFmpeg last failed.

    Nothing read here is printed: the lines may hold the camera's credentials.
    Only the classified reason (a fixed phrase) leaves the child.

    ``latest`` synchronises with the reader instead of guessing how long it needs:
    it flushes C stdio (FFmpeg's log goes through ``printf``), then writes a marker
    line with a random token to the same pipe. A pipe keeps the order of writes, so
    once the reader has seen the marker it has classified everything FFmpeg wrote
    before the failure, however loaded the machine is.
    """

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)  # OpenCV prints FFmpeg's log to stdout,
        os.dup2(write_fd, 2)  # and its own warnings to stderr
        os.close(write_fd)
        self._reason: str | None = None
        # Random, so no FFmpeg output (an SDP body, a server's error text) can pose as one.
        self._prefix = f"monitor-stderr-sync {secrets.token_hex(8)} "
        self._sent = 0  # markers written (only latest() writes them)
        self._seen = 0  # markers the reader has reached
        self._caught_up = threading.Condition()
        self._libc = ctypes.CDLL(None)
        self._file = os.fdopen(read_fd, "r", errors="replace")
        threading.Thread(target=self._read, name="ffmpeg-stderr", daemon=True).start()

    def _read(self) -> None:
        for line in self._file:
            if line.startswith(self._prefix):
                number = line[len(self._prefix) :].strip()
                if number.isdigit():
                    with self._caught_up:
                        self._seen = max(self._seen, int(number))
                        self._caught_up.notify_all()
                continue
            match = _FFMPEG_LINE.match(line)
            if match and int(match.group(1)) <= _FFMPEG_VERBOSE:
                text = match.group(2)
            elif "timeout triggered" in line:  # OpenCV's own interrupt callback
                text = "timeout triggered"
            else:
                continue  # FFmpeg debug output, SDP bodies: never classified, never shown
            reason = classify(text)
            if reason is not None:
                with self._caught_up:
                    self._reason = reason

    def latest(self, fallback: str) -> str:
        """The last classified reason, or ``fallback``; forgets it.

        Waits (at most ``_STDERR_SYNC_TIMEOUT``) until the reader has read everything
        written to stdout and stderr before this call.
        """
        self._libc.fflush(None)  # FFmpeg's lines still in C stdio buffers go first
        self._sent += 1
        number = self._sent
        # Own line even when FFmpeg left one unfinished; os.write: no Python buffering.
        os.write(2, f"\n{self._prefix}{number}\n".encode())
        with self._caught_up:
            self._caught_up.wait_for(lambda: self._seen >= number, _STDERR_SYNC_TIMEOUT)
            reason, self._reason = self._reason, None
        return reason or fallback


#: Most seconds ``latest`` waits for the stderr reader before reporting without it.
_STDERR_SYNC_TIMEOUT = 1.0


def _open_with(
    cv2: Any, settings: CameraSettings, url: str, decoder: Decoder
) -> tuple[Any, Decoder, str | None]:
    """Open the stream with ``decoder``; NVDEC that fails falls back to the CPU.

    Returns:
        The capture, the decoder it uses, and why NVDEC is not used (else None).
    """
    if decoder == "nvdec":
        try:
            return NvdecCapture(cv2, url), "nvdec", None
        except Exception as exc:  # no GPU, no NVDEC for this codec, a stream it cannot read
            fallback = redact(f"nvdec cannot decode this stream ({type(exc).__name__}: {exc})")
            return _open(cv2, settings, url), "cpu", fallback
    return _open(cv2, settings, url), "cpu", None


def _open(cv2: Any, settings: CameraSettings, url: str) -> Any:
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(settings.open_timeout * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(settings.stall_timeout * 1000),
    ]
    return cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def target_size(settings: CameraSettings, width: int, height: int) -> tuple[int, int]:
    if settings.detect.width and settings.detect.height:
        return settings.detect.width, settings.detect.height
    scale = min(1.0, (MAX_NATIVE[0] * MAX_NATIVE[1] / (width * height)) ** 0.5)
    return max(1, int(width * scale)), max(1, int(height * scale))


def _decode_loop(
    cv2: Any,
    settings: CameraSettings,
    url: str,
    fps: float,
    slots: Slots,
    conn: mpc.Connection,
    reasons: _StderrReasons,
    decoder: Decoder = "cpu",
) -> int:
    if settings.is_file and not os.path.isfile(url):
        conn.send(Failed("not found"))
        return 2
    conn.send(Opening())
    cap, decoder, fallback = _open_with(cv2, settings, url, decoder)
    if not cap.isOpened():
        fallback = "no video stream" if settings.is_file else "cannot open stream"
        conn.send(Failed(reasons.latest(fallback)))
        return 2
    native_fps = cap.get(cv2.CAP_PROP_FPS)
    native_fps = native_fps if 0 < native_fps < 1000 else 25.0
    period = 1.0 / fps
    next_due = 0.0
    played = 0  # frames of the file played in this loop (real-time pacing)
    play_start = time.monotonic()
    opened = False
    while True:
        grab_started = time.monotonic()
        grabbed = cap.grab()
        if opened and time.monotonic() - grab_started >= settings.stall_timeout:
            # FFmpeg's read timeout fired: the connection is open but nothing arrives. OpenCV
            # then flushes the decoder and can still hand out a frame it held back, one per
            # timeout, which would keep a frozen camera "online" at 1/stall_timeout fps.
            conn.send(Failed(stall_reason(settings), stalled=True))
            return 5
        if not grabbed:
            if settings.is_file and slots.seq > 0:
                cap.release()
                cap, decoder, _ = _open_with(cv2, settings, url, decoder)
                played, play_start = 0, time.monotonic()
                continue
            conn.send(Failed(reasons.latest("end of stream" if opened else "no video stream")))
            return 3
        if settings.is_file:
            played += 1
            delay = play_start + played / native_fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        now = time.monotonic()
        if opened and now < next_due - 0.25 * period:
            continue  # decoded (keeps the H.264 state) but not converted
        ok, image = cap.retrieve()
        if not ok or image is None or image.ndim != 3:
            conn.send(Failed("undecodable frame"))
            return 4
        height, width = image.shape[:2]
        if not opened:
            conn.send(Opened(width, height, native_fps, decoder, fallback))
            opened = True
        out_w, out_h = target_size(settings, width, height)
        if (out_w, out_h) != (width, height):
            image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
        slots.publish(image)
        next_due = max(next_due + period, now)
