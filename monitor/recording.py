"""The decoder child's half of recording: a ring of stream-copied MPEG-TS segments.

A recording camera is demuxed once (``monitor.decoder_av``); every video
packet is decoded for detection and also handed to ``SegmentWriter``, which
copies it, never re-encoded, into short MPEG-TS files. The daemon cuts event
clips out of them (``monitor.clips``).

Everything a restarted daemon needs is in the files themselves, so a
``kill -9`` loses at most the frame being written:

* the open segment is ``<start_ms>.ts``, flushed after every packet
  (``flush_packets=1``) so what is on disk is always readable;
* a closed segment is renamed ``<start_ms>-<end_ms>.ts`` (wall clock, Unix
  milliseconds), so listing the folder is enough to know what it covers.

MPEG-TS rather than MP4 because a TS file needs no trailer: a truncated one
still plays, and a reader can follow it while it grows.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import av
import av.error
from av.container import OutputContainer
from av.packet import Packet
from av.video.stream import VideoStream

logger = logging.getLogger(__name__)

#: A dts step larger than this (seconds) is a new timeline (a new RTSP session, a file restarting).
MAX_DTS_STEP = 10.0

#: Each packet is written through, so a reader or a kill -9 finds whole packets on disk.
_FLUSH = {"flush_packets": "1"}

#: Errors of a segment that cannot be written: the disk's, FFmpeg's, PyAV's (a codec MPEG-TS cannot hold).
_WRITE_ERRORS = (OSError, ValueError, av.error.FFmpegError)

#: errno values and the phrase reported for them (a path may hold credentials: never reported).
_ERRNO_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk full",
    errno.EFBIG: "disk full",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "recording folder missing",
    errno.ENOTDIR: "recording folder missing",
}


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment file of the ring and the wall-clock span it covers.

    Attributes:
        path: The ``.ts`` file.
        start: Wall clock (Unix seconds, millisecond precision) of its first packet, a keyframe.
        end: Wall clock of its last packet plus that packet's duration.
        bytes: Size of the file.
    """

    path: Path
    start: float
    end: float
    bytes: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"segment {self.path.name}: end {self.end} is before start {self.start}")

    @property
    def is_open(self) -> bool:
        """True for a ``<start_ms>.ts`` file: still written, or left by a killed child."""
        return "-" not in self.path.stem


def segments_dir(root: Path, camera: str) -> Path:
    """The folder of a camera's segment ring."""
    return root / camera / "segments"


def clips_dir(root: Path, camera: str) -> Path:
    """The folder of a camera's event clips."""
    return root / camera / "clips"


def failure_reason(exc: BaseException, default: str) -> str:
    """A short fixed phrase for a disk or FFmpeg error (``str(exc)`` names the path, so it is never used)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return _ERRNO_REASONS.get(abs(code), default)
    return default


class SegmentWriter:
    """Stream-copies the packets of one input video stream into MPEG-TS segments.

    Called from the child's decode loop, so ``write`` costs one mux per packet
    and nothing else: no stat, no listing. A disk that refuses segments is
    reported once through ``on_failed`` and retried ``retry_after`` seconds
    later; ``write`` never raises for it, so detection goes on.

    ``write`` restores the packet (stream, timestamps) after muxing it, so the
    caller may decode it before or after; decoding first costs nothing extra.

    Attributes:
        dropped: Segments that could not be written (each also went to ``on_failed``).
    """

    def __init__(
        self,
        directory: Path,
        stream: VideoStream,
        segment_seconds: float,
        on_closed: Callable[[Segment], None],
        on_failed: Callable[[str], None],
        retry_after: float = 30.0,
    ) -> None:
        """Prepare a writer; the first segment opens at the first keyframe.

        Args:
            directory: Folder of the segments, created if missing.
            stream: The input (demuxed) video stream whose packets ``write`` gets.
            segment_seconds: A segment is closed at the first keyframe this long after its start.
            on_closed: Called with each segment once it is complete on disk and renamed.
            on_failed: Called with a short phrase ("disk full") each time a segment cannot be written.
            retry_after: Seconds (of ``now``) without writing after a failure.
        """
        if not segment_seconds > 0:
            raise ValueError(f"segment_seconds must be > 0, got {segment_seconds}")
        if not retry_after >= 0:
            raise ValueError(f"retry_after must be >= 0, got {retry_after}")
        if stream.time_base is None:
            raise ValueError(f"stream #{stream.index} has no time_base: it is not a demuxed stream")
        self._directory = directory
        self._stream = stream
        self._segment_seconds = segment_seconds
        self._on_closed = on_closed
        self._on_failed = on_failed
        self._retry_after = retry_after
        self._tb = float(stream.time_base)
        rate = stream.average_rate or stream.guessed_rate
        # A packet without a duration lasts one frame (needed for the end of the last one).
        self._frame_ticks = round(1 / (float(rate) * self._tb)) if rate and rate > 0 else 0
        self.dropped = 0
        self._out: OutputContainer | None = None
        self._out_stream: VideoStream | None = None
        self._path: Path | None = None
        self._start_ms = 0
        self._first_pts = 0
        self._first_dts = 0
        self._end_pts = 0
        self._last_dts: int | None = None
        self._retry_at = -math.inf

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(time.time())

    def write(self, packet: Packet[VideoStream], now: float) -> None:
        """Copy one packet of the input stream into the open segment, opening or rolling it as due.

        Args:
            packet: A packet demuxed from ``stream``; packets of other streams, and packets
                without timestamps (PyAV's flush packet at the end of a file), are ignored.
            now: Wall clock (``time.time()``) at which the packet was received.
        """
        pts, dts = packet.pts, packet.dts
        if pts is None or packet.size == 0 or packet.stream_index != self._stream.index:
            return
        if dts is None:
            dts = pts
        last, self._last_dts = self._last_dts, dts
        if self._out is not None:
            broken = last is not None and (dts <= last or (dts - last) * self._tb > MAX_DTS_STEP)
            lasted = (pts - self._first_pts) * self._tb >= self._segment_seconds
            if broken or (packet.is_keyframe and lasted):
                self._close(now)
        if self._out is None and (
            not packet.is_keyframe or now < self._retry_at or not self._open(now, pts, dts)
        ):
            return
        self._mux(packet, pts, dts, now)

    def close(self, now: float) -> None:
        """Close the open segment (renamed to its closed name, then ``on_closed``), if any.

        Args:
            now: Wall clock; starts the retry delay if closing fails.
        """
        if self._out is not None:
            self._close(now)
        self._last_dts = None

    def _open(self, now: float, pts: int, dts: int) -> bool:
        self._start_ms = round(now * 1000)
        self._path = self._directory / f"{self._start_ms}.ts"
        self._first_pts, self._first_dts, self._end_pts = pts, dts, pts
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            # PyAV opens the file itself at the first mux: errors may come from there too.
            self._out = av.open(str(self._path), "w", format="mpegts", container_options=_FLUSH)
            self._out_stream = self._out.add_stream_from_template(self._stream)
        except _WRITE_ERRORS as exc:
            self._fail(exc, now)
            return False
        return True

    def _mux(self, packet: Packet[VideoStream], pts: int, dts: int, now: float) -> None:
        assert self._out is not None
        assert self._out_stream is not None
        stream, time_base, duration = packet.stream, packet.time_base, packet.duration
        try:
            # Each segment starts at dts 0: no 33-bit TS wrap however long the session runs.
            packet.stream = self._out_stream
            packet.pts, packet.dts = pts - self._first_dts, dts - self._first_dts
            self._out.mux_one(packet)
        except _WRITE_ERRORS as exc:
            self._fail(exc, now)
        finally:
            # mux moves the packet to the output stream and rescales it to 1/90000 in place.
            packet.stream, packet.time_base = stream, time_base
            packet.pts, packet.dts, packet.duration = pts, dts, duration
        self._end_pts = max(self._end_pts, pts + (duration or self._frame_ticks))

    def _close(self, now: float) -> None:
        out, path = self._out, self._path
        assert out is not None
        assert path is not None
        self._out = self._out_stream = None
        start = self._start_ms / 1000
        end_ms = max(self._start_ms, round((start + (self._end_pts - self._first_pts) * self._tb) * 1000))
        closed = path.with_name(f"{self._start_ms}-{end_ms}.ts")
        try:
            out.close()
            os.replace(path, closed)
            size = closed.stat().st_size
        except _WRITE_ERRORS as exc:
            self._fail(exc, now)
            return
        self._on_closed(Segment(closed, start, end_ms / 1000, size))

    def _fail(self, exc: BaseException, now: float) -> None:
        out, path = self._out, self._path
        self._out = self._out_stream = None
        if out is not None:
            with suppress(*_WRITE_ERRORS):
                out.close()
        if path is not None:
            with suppress(OSError):
                path.unlink(missing_ok=True)
        self.dropped += 1
        self._retry_at = now + self._retry_after
        reason = failure_reason(exc, "cannot write segment")
        logger.debug("segment %s dropped: %s", path.name if path else "?", reason)
        self._on_failed(reason)
