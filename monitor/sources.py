"""Camera sources: one decoder child process per camera, newest frame wins.

A Python thread stuck inside a C call (an OpenCV read on a frozen RTSP
connection) cannot be killed, so every camera is decoded in its own child
process that the daemon can kill and restart. The child:

* opens the stream with OpenCV's FFmpeg backend (RTSP over TCP, open and
  read timeouts), plays a local file in real time and loops it;
* decodes every frame but converts and scales only the ones due at the
  camera's detect fps (``grab`` for all, ``retrieve`` for those);
* writes each due frame into one of ``SLOTS`` slots of a shared-memory block
  the parent owns, then sends a small ``FrameReady`` message on a pipe.

The parent keeps only the newest ``FrameReady`` per camera; frames replaced
before the detector took them are counted as dropped, never queued. Three
slots make a copy safe without locks: the child overwrites the slot of frame
``n`` only after publishing ``n + 2``, which the parent checks after copying.
A lock would be unsafe here: a child killed while holding it would freeze the
daemon.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.util
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import random
import re
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal

import numpy as np

from monitor.logs import redact
from monitor.metrics import Metrics
from monitor.settings import CameraSettings

logger = logging.getLogger(__name__)

SLOTS = 3
#: Frames larger than this (pixels) are scaled down, keeping their aspect.
MAX_NATIVE = (1920, 1080)
#: Restart backoff: first delay, cap, and the +/- fraction of jitter.
BACKOFF_FIRST = 1.0
BACKOFF_JITTER = 0.2
#: Seconds a new decoder process may take to start (imports) before opening the stream;
#: generous because many cameras start at once on small machines.
SPAWN_TIMEOUT = 60.0
#: FFmpeg input options: RTSP over TCP (no UDP loss), and at most 1 s of stream
#: probing (the default 5 s makes every (re)connect slow).
FFMPEG_OPTIONS = "rtsp_transport;tcp|analyzeduration;1000000"
#: Seconds a decoder gets to exit after SIGTERM before SIGKILL.
KILL_GRACE = 1.0

# Decoders are forked from a forkserver: a clean process (no CUDA, no threads)
# that has already imported OpenCV and numpy, so a restart costs milliseconds
# of CPU instead of a fresh interpreter's imports. That keeps a flapping camera
# with a short backoff from eating the CPU of the healthy ones.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["monitor.sources", "cv2", "numpy"])


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame on its way to the detector.

    Attributes:
        camera: Camera name.
        seq: Frame number within the current decoder run.
        capture_time: Wall-clock seconds when the frame left the decoder.
        image: HxWx3 uint8 BGR, in frame pixels (after the camera's scaling).
    """

    camera: str
    seq: int
    capture_time: float
    image: np.ndarray


class CameraState(str, enum.Enum):
    """What a camera is doing now."""

    STARTING = "starting"
    ONLINE = "online"
    STALLED = "stalled"
    OFFLINE = "offline"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """A camera's state, as published on ``<prefix>/<camera>/status``."""

    camera: str
    state: CameraState
    since: float
    reason: str | None
    reconnects: int


# Messages from the decoder child to the parent.
@dataclass(frozen=True, slots=True)
class _Opening:
    """The child is up and starts opening the stream (open_timeout runs from here)."""


@dataclass(frozen=True, slots=True)
class _Opened:
    width: int
    height: int
    fps: float
    decoder: Decoder = "cpu"
    #: Why the stream is decoded on the CPU although nvdec was chosen.
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class _FrameReady:
    seq: int
    slot: int
    capture_time: float
    height: int
    width: int


@dataclass(frozen=True, slots=True)
class _Failed:
    """The child gives up: ``reason`` for the status; ``stalled`` when frames stopped coming."""

    reason: str
    stalled: bool = False


Decoder = Literal["cpu", "nvdec"]


def choose_decoder(camera: str, choice: str) -> Decoder:
    """The decoder a camera's child starts with: ``nvdec`` needs PyNvVideoCodec installed.

    ``nvdec`` asked for but not installed is logged (a warning: the user asked);
    ``auto`` without it is simply the CPU. Whether NVDEC then works for the stream
    (a GPU, a codec it decodes) is found out by the child, which falls back to the
    CPU and says why in its ``_Opened`` message.
    """
    if choice == "cpu":
        return "cpu"
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        if choice == "nvdec":
            logger.warning(
                "decoder nvdec: PyNvVideoCodec is not installed (pip install 'monitor[nvdec]'); "
                "decoding on the CPU",
                extra={"camera": camera},
            )
        return "cpu"
    return "nvdec"


def stall_reason(settings: CameraSettings) -> str:
    """The reason of a ``stalled`` camera: no frame for ``stall_timeout`` seconds."""
    return f"no frame for {settings.stall_timeout:g} s"


def frame_bytes(settings: CameraSettings) -> int:
    """Bytes of one slot: the configured detect size, else the native cap."""
    width = settings.detect.width or MAX_NATIVE[0]
    height = settings.detect.height or MAX_NATIVE[1]
    return width * height * 3


class Source:
    """One camera: its decoder child, its watchdog and its newest frame.

    Not thread-safe: the daemon's loop calls every method.
    """

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        fps: float,
        metrics: Metrics,
        on_status: Callable[[CameraStatus], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.fps = fps
        self._on_status = on_status
        self._slot_bytes = frame_bytes(settings)
        self._shm: SharedMemory | None = None
        self._latest_seq: Any = None
        self._proc: Any = None
        self._conn: mpc.Connection | None = None
        self._ready: _FrameReady | None = None
        self._taken_seq = -1
        # The watchdog's clock: the last frame of the current decoder, or its start.
        self._last_frame = 0.0
        # The last frame ever received, for the frame-age metric: it survives reconnects,
        # so a camera that has been offline for hours shows hours.
        self._last_received: float | None = None
        self._created = time.monotonic()
        self._started = 0.0
        self._opening = False
        self._restart_at: float | None = None
        self._backoff = BACKOFF_FIRST
        self._session_frames = False  # the current decoder delivered a frame
        self._failure: str | None = None
        self._failure_state = CameraState.OFFLINE
        self._decoder: Decoder = choose_decoder(name, settings.decoder) if settings.enabled else "cpu"
        self._fallback_logged = False
        self.state = CameraState.DISABLED if not settings.enabled else CameraState.STARTING
        self.since = time.time()
        self.reason: str | None = None
        self.reconnects = 0
        metrics.add_camera(name)
        self._frames = metrics.frames.labels(name)
        self._dropped = metrics.frames_dropped.labels(name)
        self._reconnects = metrics.camera_reconnects.labels(name)
        self._up = metrics.camera_up.labels(name)
        metrics.camera_enabled.labels(name).set(1 if settings.enabled else 0)
        # Read at scrape time: no work in the pipeline loop.
        metrics.camera_frame_age.labels(name).set_function(lambda: self.last_frame_age(time.monotonic()))

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Source:
        if not self.settings.enabled or self._spawn():
            self._set_state(self.state, None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decoder and free the shared memory. Idempotent."""
        self._stop_child()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    def _spawn(self) -> bool:
        """Start a decoder; False (camera offline, retried with backoff) when the system refuses.

        Shared memory, the pipe and the process each need file descriptors and
        memory; when those run out (``EMFILE``: a flood of HTTP clients, a full
        ``/dev/shm``) this camera waits and retries instead of taking the daemon down.
        """
        self._session_frames = False
        try:
            if self._shm is None:
                self._shm = SharedMemory(create=True, size=SLOTS * self._slot_bytes)
            if self._latest_seq is None:
                self._latest_seq = _CTX.RawValue("q", -1)
            self._start_child()
        except OSError as exc:
            self._restart(CameraState.OFFLINE, f"cannot start the decoder: {exc.strerror or exc}")
            return False
        return True

    def _start_child(self) -> None:
        assert self._shm is not None
        assert self._latest_seq is not None
        reader, writer = _CTX.Pipe(duplex=False)
        try:
            self._proc = self._new_process(writer)
            self._proc.start()
        except BaseException:
            self._proc = None
            reader.close()
            raise
        finally:
            writer.close()  # the child holds the only write end: EOF means it died
        self._conn = reader
        self._ready = None
        self._taken_seq = -1
        self._failure = None
        self._failure_state = CameraState.OFFLINE
        now = time.monotonic()
        self._started = now
        self._opening = False
        self._last_frame = now
        self._restart_at = None

    def _new_process(self, writer: mpc.Connection) -> Any:
        assert self._shm is not None
        return _CTX.Process(
            target=_decoder_main,
            name=f"monitor-decoder-{self.name}",
            args=(
                self.settings,
                self.fps,
                self._shm.name,
                self._slot_bytes,
                self._latest_seq,
                writer,
                self._decoder,
            ),
            daemon=True,
        )

    def _stop_child(self) -> None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(KILL_GRACE)
            if proc.is_alive():
                proc.kill()
        proc.join()
        proc.close()

    # -- the loop's calls ----------------------------------------------------
    @property
    def connection(self) -> mpc.Connection | None:
        """The pipe to wait on (``multiprocessing.connection.wait``), if running."""
        return self._conn

    def drain(self) -> None:
        """Read every pending message from the decoder."""
        conn = self._conn
        while conn is not None and not conn.closed:
            try:
                if not conn.poll():
                    return
                message = conn.recv()
            except (EOFError, OSError):
                self._on_exit()
                return
            if isinstance(message, _FrameReady):
                self._ready = message
                self._session_frames = True
                self._frames.inc()
                self._last_frame = self._last_received = time.monotonic()
                if self.state is not CameraState.ONLINE:
                    self._set_state(CameraState.ONLINE, None)
            elif isinstance(message, _Opening):
                self._started, self._opening = time.monotonic(), True
            elif isinstance(message, _Opened):
                logger.info(
                    "stream opened: %dx%d at %.1f fps, decoded on the %s",
                    message.width,
                    message.height,
                    message.fps,
                    "GPU (nvdec)" if message.decoder == "nvdec" else "CPU",
                    extra={"camera": self.name},
                )
                if message.fallback and not self._fallback_logged:
                    self._fallback_logged = True  # once per camera, not per reconnect
                    log = logger.warning if self.settings.decoder == "nvdec" else logger.info
                    log("%s: decoding on the CPU", message.fallback, extra={"camera": self.name})
            elif isinstance(message, _Failed):
                self._failure = message.reason
                self._failure_state = CameraState.STALLED if message.stalled else CameraState.OFFLINE

    def has_new_frame(self) -> bool:
        """True when a frame the detector has not taken is waiting."""
        return self._ready is not None and self._ready.seq > self._taken_seq

    def waiting_since(self) -> float:
        """Capture time of the waiting frame (for oldest-first scheduling)."""
        return self._ready.capture_time if self._ready is not None else float("inf")

    def take(self, not_before: float | None = None) -> Frame | None:
        """Copy the newest frame out of shared memory, or None if there is no new one.

        Args:
            not_before: A frame captured earlier than this (wall clock) is too old to
                be worth detecting: it is dropped (and counted) instead.
        """
        ready = self._ready
        if ready is None or ready.seq <= self._taken_seq or self._shm is None:
            return None
        if not_before is not None and ready.capture_time < not_before:
            self._dropped.inc(ready.seq - max(self._taken_seq, -1))  # it and the ones it replaced
            self._taken_seq = ready.seq
            return None
        assert self._latest_seq is not None
        offset = ready.slot * self._slot_bytes
        view = np.ndarray((ready.height, ready.width, 3), np.uint8, self._shm.buf, offset)
        image = view.copy()
        if self._latest_seq.value > ready.seq + SLOTS - 2:
            return None  # the child lapped us while we copied; a newer frame is coming
        if self._taken_seq >= 0:
            self._dropped.inc(ready.seq - self._taken_seq - 1)
        self._taken_seq = ready.seq
        del view
        return Frame(self.name, ready.seq, ready.capture_time, image)

    def check(self, now: float) -> None:
        """Watchdog: restart a decoder that died, stalled or never opened."""
        if not self.settings.enabled:
            return
        if self._proc is None:
            if self._restart_at is not None and now >= self._restart_at:
                self.reconnects += 1
                self._reconnects.inc()
                if self._spawn():
                    self._set_state(CameraState.STARTING, self.reason)
            return
        if not self._proc.is_alive():
            self._on_exit()
        elif self.state is CameraState.ONLINE and now - self._last_frame > self.settings.stall_timeout:
            self._restart(CameraState.STALLED, stall_reason(self.settings))
        elif self.state is CameraState.STARTING and now - self._started > (
            self.settings.open_timeout + KILL_GRACE if self._opening else SPAWN_TIMEOUT
        ):
            self._restart(CameraState.OFFLINE, "timeout" if self._opening else "decoder did not start")

    def _on_exit(self) -> None:
        if self._proc is None:
            return
        self._proc.join(KILL_GRACE)
        code = self._proc.exitcode
        reason = self._failure or f"decoder exited (code {code})"
        self._restart(self._failure_state, reason)

    def _restart(self, state: CameraState, reason: str) -> None:
        self._stop_child()
        self._ready = None  # its slot belongs to the next decoder now
        if self._session_frames:
            # The stream worked: this is a session ending (an RTSP session timeout, a
            # flaky link), not a camera that keeps failing. Waiting longer each time
            # would starve a camera whose sessions end after seconds of good frames.
            self._backoff = BACKOFF_FIRST
        delay = min(self._backoff, self.settings.backoff_max) * (
            1 + random.uniform(-BACKOFF_JITTER, BACKOFF_JITTER)
        )
        self._backoff = min(self._backoff * 2, self.settings.backoff_max)
        self._restart_at = time.monotonic() + delay
        logger.warning(
            "%s: %s; reconnecting in %.1f s", state.value, reason, delay, extra={"camera": self.name}
        )
        self._set_state(state, reason)

    def _set_state(self, state: CameraState, reason: str | None) -> None:
        self.state, self.reason, self.since = state, reason, time.time()
        self._up.set(1 if state is CameraState.ONLINE else 0)
        if self._on_status is not None:
            self._on_status(self.status())

    def status(self) -> CameraStatus:
        """The current state."""
        return CameraStatus(self.name, self.state, self.since, self.reason, self.reconnects)

    def last_frame_age(self, now: float) -> float:
        """Seconds since the last frame arrived, across reconnects (since creation when none has)."""
        return now - (self._last_received if self._last_received is not None else self._created)


# -- the child process ------------------------------------------------------------
def _decoder_main(
    settings: CameraSettings,
    fps: float,
    shm_name: str,
    slot_bytes: int,
    latest_seq: Any,
    conn: mpc.Connection,
    decoder: Decoder = "cpu",
) -> None:
    """Entry point of a decoder child. Exits non-zero with a ``_Failed`` message."""
    # Ctrl-C reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # FFmpeg's messages say why a stream failed, but can carry the URL with its
    # credentials: they go to a pipe that only ``_StderrReasons`` reads.
    reasons = _StderrReasons()
    os.environ["OPENCV_FFMPEG_DEBUG"] = "1"
    os.environ["OPENCV_LOG_LEVEL"] = "WARNING"
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = FFMPEG_OPTIONS
    import cv2  # imported here: the parent's import of this module stays light

    url = settings.url.get_secret_value()
    shm = SharedMemory(name=shm_name)
    try:
        code = _decode_loop(cv2, settings, url, fps, shm, slot_bytes, latest_seq, conn, reasons, decoder)
    except Exception as exc:  # report, never print a traceback with the URL
        conn.send(_Failed(redact(f"decoder error: {exc}")))
        code = 70
    finally:
        shm.close()
    os._exit(code)


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
            for pattern, reason in _REASONS:
                if pattern.search(text):
                    with self._caught_up:
                        self._reason = reason
                    break

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


class _NvdecCapture:
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


def _open_with(
    cv2: Any, settings: CameraSettings, url: str, decoder: Decoder
) -> tuple[Any, Decoder, str | None]:
    """Open the stream with ``decoder``; NVDEC that fails falls back to the CPU.

    Returns:
        The capture, the decoder it uses, and why NVDEC is not used (else None).
    """
    if decoder == "nvdec":
        try:
            return _NvdecCapture(cv2, url), "nvdec", None
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


def _target_size(settings: CameraSettings, width: int, height: int) -> tuple[int, int]:
    if settings.detect.width and settings.detect.height:
        return settings.detect.width, settings.detect.height
    scale = min(1.0, (MAX_NATIVE[0] * MAX_NATIVE[1] / (width * height)) ** 0.5)
    return max(1, int(width * scale)), max(1, int(height * scale))


def _decode_loop(
    cv2: Any,
    settings: CameraSettings,
    url: str,
    fps: float,
    shm: SharedMemory,
    slot_bytes: int,
    latest_seq: Any,
    conn: mpc.Connection,
    reasons: _StderrReasons,
    decoder: Decoder = "cpu",
) -> int:
    if settings.is_file and not os.path.isfile(url):
        conn.send(_Failed("not found"))
        return 2
    conn.send(_Opening())
    cap, decoder, fallback = _open_with(cv2, settings, url, decoder)
    if not cap.isOpened():
        fallback = "no video stream" if settings.is_file else "cannot open stream"
        conn.send(_Failed(reasons.latest(fallback)))
        return 2
    native_fps = cap.get(cv2.CAP_PROP_FPS)
    native_fps = native_fps if 0 < native_fps < 1000 else 25.0
    period = 1.0 / fps
    next_due = 0.0
    seq = 0
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
            conn.send(_Failed(stall_reason(settings), stalled=True))
            return 5
        if not grabbed:
            if settings.is_file and seq > 0:
                cap.release()
                cap, decoder, _ = _open_with(cv2, settings, url, decoder)
                played, play_start = 0, time.monotonic()
                continue
            conn.send(_Failed(reasons.latest("end of stream" if opened else "no video stream")))
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
            conn.send(_Failed("undecodable frame"))
            return 4
        height, width = image.shape[:2]
        if not opened:
            conn.send(_Opened(width, height, native_fps, decoder, fallback))
            opened = True
        out_w, out_h = _target_size(settings, width, height)
        if (out_w, out_h) != (width, height):
            image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
        slot = seq % SLOTS
        dest = np.ndarray((out_h, out_w, 3), np.uint8, shm.buf, slot * slot_bytes)
        np.copyto(dest, image)
        del dest
        capture_time = time.time()
        latest_seq.value = seq
        conn.send(_FrameReady(seq, slot, capture_time, out_h, out_w))
        seq += 1
        next_due = max(next_due + period, now)
