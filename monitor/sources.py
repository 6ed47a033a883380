"""Camera sources, the parent side: one decoder child process per camera, newest frame wins.

``Source`` starts a camera's decoder child (``decoder.py``) from a
forkserver, watches it (a stream that never opens, stalls or dies is killed
and restarted with backoff) and hands the newest frame to the loop.

The parent keeps only the newest ``FrameReady`` per camera; frames replaced
before the detector took them are counted as dropped, never queued. A frame
taken is not copied: ``take`` holds its slot (``Handoff.lease``), which the
child then leaves alone, and the frame reads its pixels and its letterbox in
place until its pipeline step releases it (``Frame.release``). The child's
side is ``decoder.Slots``. No lock: a child killed while holding one would
freeze the daemon.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import random
import select
import time
from collections.abc import Callable
from typing import Any

from monitor.decoder import (
    Decoder,
    Failed,
    Opened,
    Opening,
    RecordingFailed,
    RecordTarget,
    SegmentClosed,
    decoder_main,
    frame_bytes,
    stall_reason,
)
from monitor.decoder_av import record_main
from monitor.frames import CameraState, CameraStatus, Frame
from monitor.letterbox import NetInput
from monitor.metrics import Metrics
from monitor.pipe_reader import PipeReader
from monitor.settings import CameraSettings
from monitor.slots import FrameReady, Handoff, SlotReader
from monitor.synthetic import SyntheticFeed, synthetic_main

logger = logging.getLogger(__name__)

#: Restart backoff: first delay, cap, and the +/- fraction of jitter.
BACKOFF_FIRST = 1.0
BACKOFF_JITTER = 0.2
#: Seconds a new decoder process may take to start (imports) before opening the stream;
#: generous because many cameras start at once on small machines.
SPAWN_TIMEOUT = 60.0
#: Seconds a decoder gets to exit after SIGTERM before SIGKILL.
KILL_GRACE = 1.0

# Decoders are forked from a forkserver: a clean process (no CUDA, no threads)
# that has already imported OpenCV and numpy, so a restart costs milliseconds
# of CPU instead of a fresh interpreter's imports. That keeps a flapping camera
# with a short backoff from eating the CPU of the healthy ones.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["monitor.decoder", "monitor.decoder_av", "cv2", "numpy"])

_pipe_changes = 0


def pipe_changes() -> int:
    """A number that changes whenever any camera's pipe is opened or closed.

    The loop waits on every camera's pipe thousands of times a second: it rebuilds
    its set of pipes only when this number moved, not by asking each camera each time.
    """
    return _pipe_changes


def _pipes_changed() -> None:
    global _pipe_changes
    _pipe_changes += 1


def choose_decoder(camera: str, choice: str) -> Decoder:
    """The decoder a camera's child starts with: ``nvdec`` needs PyNvVideoCodec installed.

    ``nvdec`` asked for but not installed is logged (a warning: the user asked);
    ``auto`` without it is simply the CPU. Whether NVDEC then works for the stream
    (a GPU, a codec it decodes) is found out by the child, which falls back to the
    CPU and says why in its ``Opened`` message.
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


class Source:
    """One camera: its decoder child, its watchdog and its newest frame.

    Not thread-safe: the daemon's loop calls every method.

    Args:
        name: Camera name.
        settings: The camera's settings.
        fps: Frames per second the child delivers (the camera's detect fps).
        metrics: Receives the camera's series.
        on_status: Called with each new state.
        feed: For ``monitor bench``: a stand-in child writes these pre-made frames into the
            same slots on the same clock instead of decoding ``settings.url``.
        record: Where the child also records the stream's segments (the camera records).
        on_recording: Called with the child's ``SegmentClosed`` and ``RecordingFailed``.
        net: The detector's input: the child letterboxes each frame into it (``Frame.net``).
    """

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        fps: float,
        metrics: Metrics,
        on_status: Callable[[CameraStatus], None] | None = None,
        feed: SyntheticFeed | None = None,
        record: RecordTarget | None = None,
        on_recording: Callable[[str, SegmentClosed | RecordingFailed], None] | None = None,
        net: NetInput | None = None,
    ) -> None:
        self.name = name
        self._record = record
        self._on_recording = on_recording
        self.settings = settings
        self.fps = fps
        self._feed = feed
        self._on_status = on_status
        self._slots = SlotReader(frame_bytes(settings), net, _CTX)
        self._proc: Any = None
        self._conn: mpc.Connection | None = None
        self._poller: select.poll | None = None
        self._polled: mpc.Connection | None = None  # the pipe ``_poller`` watches
        self._reader: PipeReader | None = None  # reads ``_conn``
        self._ready: FrameReady | None = None
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
        """Stop the decoder and free the shared memory (a frame still in use keeps a copy). Idempotent."""
        self._stop_child()
        self._slots.close()

    def _spawn(self) -> bool:
        """Start a decoder; False (camera offline, retried with backoff) when the system refuses.

        Shared memory, the pipe and the process each need file descriptors and
        memory; when those run out (``EMFILE``: a flood of HTTP clients, a full
        ``/dev/shm``) this camera waits and retries instead of taking the daemon down.
        """
        self._session_frames = False
        try:
            self._start_child(self._slots.handoff())
        except OSError as exc:
            self._restart(CameraState.OFFLINE, f"cannot start the decoder: {exc.strerror or exc}")
            return False
        return True

    def _start_child(self, handoff: Handoff) -> None:
        reader, writer = _CTX.Pipe(duplex=False)
        try:
            self._proc = self._new_process(handoff, writer)
            self._proc.start()
        except BaseException:
            self._proc = None
            reader.close()
            raise
        finally:
            writer.close()  # the child holds the only write end: EOF means it died
        self._conn = reader
        self._reader = PipeReader(reader.fileno())
        _pipes_changed()
        self._ready = None
        self._taken_seq = -1
        self._failure = None
        self._failure_state = CameraState.OFFLINE
        now = time.monotonic()
        self._started = now
        self._opening = False
        self._last_frame = now
        self._restart_at = None

    def _new_process(self, shared: Handoff, writer: mpc.Connection) -> Any:
        handoff = (shared, writer)
        if self._feed is not None:  # the bench's stand-in: pre-made frames, nothing decoded
            return _CTX.Process(
                target=synthetic_main,
                name=f"monitor-synthetic-{self.name}",
                args=(self._feed, self.fps, *handoff),
                daemon=True,
            )
        if self._record is not None:  # one demux for the segments and the frames
            return _CTX.Process(
                target=record_main,
                name=f"monitor-recorder-{self.name}",
                args=(self.settings, self.fps, *handoff, self._record),
                daemon=True,
            )
        return _CTX.Process(
            target=decoder_main,
            name=f"monitor-decoder-{self.name}",
            args=(self.settings, self.fps, *handoff, self._decoder),
            daemon=True,
        )

    def _stop_child(self) -> None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._reader = None
            self._poller = self._polled = None
            _pipes_changed()
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

    def _pending(self, conn: mpc.Connection) -> bool:
        """True when a message waits (one ``poll`` object per pipe: ``Connection.poll`` builds one a call)."""
        if self._poller is None or self._polled is not conn:
            self._poller, self._polled = select.poll(), conn
            self._poller.register(conn.fileno(), select.POLLIN)
        return bool(self._poller.poll(0))

    def drain(self, readable: bool = False) -> None:
        """Read every pending message from the decoder (many a system call: ``PipeReader``).

        Args:
            readable: The caller's ``poll`` just found the pipe readable (no need to ask again).
        """
        more = True
        while more:
            conn, reader = self._conn, self._reader
            if conn is None or reader is None or conn.closed:
                return
            try:
                if not readable and not self._pending(conn):
                    return
                messages, more = reader.read()
            except (EOFError, OSError):
                self._on_exit()
                return
            readable = False
            frames = replaced = 0
            for message in messages:
                if type(message) is FrameReady:
                    # A frame not taken yet is replaced by a newer one: dropped, counted now
                    # (from the first frame taken on: before it, the loop had not started on this camera).
                    waiting = self._ready
                    replaced += waiting is not None and waiting.seq > self._taken_seq >= 0
                    self._ready = message
                    frames += 1
                else:
                    self._handle(message)
            if frames:
                if replaced:
                    self._dropped.inc(replaced)
                self._session_frames = True
                self._frames.inc(frames)
                self._last_frame = self._last_received = time.monotonic()
                if self.state is not CameraState.ONLINE:
                    self._set_state(CameraState.ONLINE, None)

    def _handle(self, message: object) -> None:
        """A message of the decoder's other than a frame."""
        if isinstance(message, Opening):
            self._started, self._opening = time.monotonic(), True
        elif isinstance(message, Opened):
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
        elif isinstance(message, SegmentClosed | RecordingFailed):
            if self._on_recording is not None:
                self._on_recording(self.name, message)
        elif isinstance(message, Failed):
            self._failure = message.reason
            self._failure_state = CameraState.STALLED if message.stalled else CameraState.OFFLINE

    def has_new_frame(self) -> bool:
        """True when a frame the detector has not taken is waiting."""
        return self._ready is not None and self._ready.seq > self._taken_seq

    def waiting_since(self) -> float:
        """Capture time of the waiting frame: the scheduler's tie-break among cameras served as long ago."""
        return self._ready.capture_time if self._ready is not None else float("inf")

    def take(self, not_before: float | None = None) -> Frame | None:
        """Hold the newest frame's slot and hand the frame over, or None if there is no new one.

        The frame's pixels stay in the slot, unread, until its step reads what it needs
        (the letterbox to detect it; full-resolution pixels only for a snapshot or a
        crop) and releases it. The frame taken before, if still unreleased, is copied
        out first: its slot is given back.

        Args:
            not_before: A frame captured earlier than this (wall clock) is too old to
                be worth detecting: it is dropped (and counted) instead.
        """
        ready = self._ready
        if ready is None or ready.seq <= self._taken_seq or self._slots.shm is None:
            return None
        if not_before is not None and ready.capture_time < not_before:
            # It, and the ones it replaced before the first frame taken (those after, ``drain`` counted).
            self._dropped.inc(1 if self._taken_seq >= 0 else ready.seq + 1)
            self._taken_seq = ready.seq
            return None
        lease = self._slots.hold(ready)
        if lease is None:
            return None  # the child may have written the slot already; a newer frame is coming
        self._taken_seq = ready.seq
        return Frame(self.name, ready.seq, ready.capture_time, lease)

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

    @property
    def delivered(self) -> bool:
        """True once any decoder of this camera has delivered a frame."""
        return self._last_received is not None

    def last_frame_age(self, now: float) -> float:
        """Seconds since the last frame arrived, across reconnects (since creation when none has)."""
        return now - (self._last_received if self._last_received is not None else self._created)
