"""The decoder child of a recording camera: one demux for the segments and the frames.

Field links are slow and many cameras allow only a few RTSP sessions, so a
camera that records is read once. PyAV (FFmpeg's libraries) demuxes the
stream; every video packet is first decoded (frames due at the detect fps go
into the shared-memory slots, exactly as ``decoder.py`` hands them over),
then stream-copied into the segment ring (``monitor.recording``), never
re-encoded. The protocol, the slots and the failure phrases are
``monitor.decoder``'s; FFmpeg's own messages, which may hold the URL's
credentials, still go only to the child's captured stdout and stderr.

A disk that refuses segments (full, read-only) is reported to the parent with
``RecordingFailed`` and retried later by the writer; frames keep flowing.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import time
from pathlib import Path
from typing import Any

from monitor.decoder import (
    Failed,
    Opened,
    Opening,
    RecordingFailed,
    RecordTarget,
    SegmentClosed,
    _StderrReasons,
    classify,
    run_child,
    stall_reason,
    target_size,
)
from monitor.settings import CameraSettings
from monitor.slots import Handoff, Slots

#: Decoder threads per camera (see ``_video``).
DECODE_THREADS = 2
#: PyAV exception class names and the phrase they report (else their strerror is classified).
_ERRORS = {
    "HTTPUnauthorizedError": "unauthorized",
    "HTTPForbiddenError": "forbidden",
    "HTTPNotFoundError": "not found",
    "FileNotFoundError": "not found",
    "ConnectionRefusedError": "connection refused",
    "TimeoutError": "timeout",
    "ExitError": "timeout",  # FFmpeg's interrupt callback: PyAV's timeout fired
    "InvalidDataError": "no video stream",
}


def _reason(exc: BaseException, reasons: _StderrReasons, fallback: str) -> str:
    """A fixed phrase for ``exc``: its str() names the URL, so it is never used as is."""
    known = _ERRORS.get(type(exc).__name__)
    if known is not None:
        return known
    return classify(getattr(exc, "strerror", None) or "") or reasons.latest(fallback)


def _open(av: Any, settings: CameraSettings, url: str) -> Any:
    options = {} if settings.is_file else {"rtsp_transport": "tcp"}
    options["analyzeduration"] = "1000000"
    return av.open(url, options=options, timeout=(settings.open_timeout, settings.stall_timeout))


def _video(container: Any) -> Any:
    """The first video stream, decoded by two threads.

    Frame threading delays each frame by one per extra thread: two keep a camera's
    frames within one frame period of OpenCV's, where FFmpeg's default (one thread
    per core) would hold back a second of a 15 fps camera on a 16-core machine.
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = DECODE_THREADS
    return stream


def record_main(
    settings: CameraSettings, fps: float, handoff: Handoff, conn: mpc.Connection, record: RecordTarget
) -> None:
    """Entry point of a recording camera's decoder child."""

    def body(url: str, slots: Slots, reasons: _StderrReasons) -> int:
        return record_loop(settings, url, fps, slots, conn, reasons, record)

    run_child(settings, handoff, conn, body)


def record_loop(
    settings: CameraSettings,
    url: str,
    fps: float,
    slots: Slots,
    conn: mpc.Connection,
    reasons: _StderrReasons,
    record: RecordTarget,
) -> int:
    """Demux, decode due frames into the slots and record every packet; the exit code on failure."""
    import av

    from monitor.recording import Segment, SegmentWriter

    if settings.is_file and not os.path.isfile(url):
        conn.send(Failed("not found"))
        return 2
    conn.send(Opening())
    try:
        container = _open(av, settings, url)
    except Exception as exc:
        conn.send(
            Failed(_reason(exc, reasons, "no video stream" if settings.is_file else "cannot open stream"))
        )
        return 2
    if not container.streams.video:
        conn.send(Failed("no video stream"))
        return 2
    stream = _video(container)

    def closed(segment: Segment) -> None:
        conn.send(SegmentClosed(str(segment.path), segment.start, segment.end, segment.bytes))

    def failed(reason: str) -> None:
        conn.send(RecordingFailed(reason))

    directory = Path(record.directory)
    writer = SegmentWriter(directory, stream, record.segment, closed, failed)
    native_fps = float(stream.average_rate or stream.guessed_rate or 25.0)
    native_fps = native_fps if 0 < native_fps < 1000 else 25.0
    period = 1.0 / fps
    next_due = 0.0
    opened = False
    first_pts: int | None = None  # pacing of a file: its pts against the clock
    play_start = time.monotonic()
    last_packet = time.monotonic()
    packets = container.demux(stream)
    try:
        while True:
            try:
                packet = next(packets, None)
            except Exception as exc:
                if opened and time.monotonic() - last_packet >= 0.9 * settings.stall_timeout:
                    conn.send(Failed(stall_reason(settings), stalled=True))
                    return 5
                conn.send(Failed(_reason(exc, reasons, "end of stream" if opened else "no video stream")))
                return 3
            if packet is None or (packet.size == 0 and packet.dts is None):  # the end (PyAV's flush packet)
                if settings.is_file and slots.seq > 0:
                    writer.close(time.time())  # the replay starts its timestamps again
                    container.close()
                    container = _open(av, settings, url)
                    stream = _video(container)
                    packets = container.demux(stream)
                    writer = SegmentWriter(directory, stream, record.segment, closed, failed)
                    first_pts, play_start = None, time.monotonic()
                    continue
                conn.send(Failed(reasons.latest("end of stream" if opened else "no video stream")))
                return 3
            last_packet = time.monotonic()
            if settings.is_file and packet.pts is not None and packet.time_base is not None:
                if first_pts is None:
                    first_pts = packet.pts
                delay = play_start + float((packet.pts - first_pts) * packet.time_base) - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            try:  # before muxing: muxing moves the packet to the output stream
                frames = packet.decode()
            except (
                av.error.FFmpegError
            ):  # one corrupt packet: the next keyframe recovers; it is still recorded
                frames = []
            writer.write(packet, time.time())
            for frame in frames:
                now = time.monotonic()
                if opened and now < next_due - 0.25 * period:
                    continue  # decoded (keeps the H.264 state) but not converted
                width, height = frame.width, frame.height
                if not opened:
                    conn.send(Opened(width, height, native_fps, "cpu", None))
                    opened = True
                out_w, out_h = target_size(settings, width, height)
                slots.publish(frame.to_ndarray(format="bgr24", width=out_w, height=out_h))
                next_due = max(next_due + period, now)
    finally:
        writer.close(time.time())
        container.close()
