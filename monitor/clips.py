"""The daemon's half of recording: list and repair the segment ring, cut clips, keep the disk bounded.

The decoder child writes segments (``monitor.recording``); this module only
reads their names and their packets, so after a ``kill -9`` of the child or
of the daemon everything is recovered from the files on disk alone.

A clip is every packet from the last keyframe at or before the event's start
to the last one at or before its end, stream-copied (no re-encode) into one
MP4 whose ``moov`` comes first (``+faststart``) so a browser plays it as it
downloads. Across segment boundaries timestamps are made continuous: a gap in
the recording (a dropped segment) is closed up, not shown as a frozen frame.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

import av
import av.error
from av.container import InputContainer, OutputContainer
from av.packet import Packet
from av.video.stream import VideoStream

from monitor.errors import MonitorError
from monitor.recording import Segment, failure_reason

logger = logging.getLogger(__name__)

_SEGMENT = re.compile(r"(\d+)(?:-(\d+))?\.ts")  # <start_ms>-<end_ms>.ts, or <start_ms>.ts while open
#: A temporary clip older than this (seconds) was left by a killed daemon: retention deletes it.
_STALE_TEMP = 3600.0


class ClipError(MonitorError):
    """A clip could not be cut.

    Attributes:
        reason: A short fixed phrase for the event's ``clip_error`` and metrics,
            e.g. "no recording for the event's time", "recording unreadable", "disk full".
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What ``enforce_retention`` left and removed.

    Attributes:
        bytes: Bytes of clips and segments of the camera after it ran.
        clips_deleted: Clips removed, by age or for space.
        segments_deleted: Segments removed for space (recording the ring could not keep).
    """

    bytes: int
    clips_deleted: int
    segments_deleted: int


@dataclass(frozen=True, slots=True)
class _Scan:
    """The packets of one segment file, as far as they could be read."""

    end: float  # wall clock past the last packet
    end_before_last: float  # the same without the last packet (which a kill may have cut short)
    last_pos: int | None  # byte offset of the last packet
    packets: int


def list_segments(directory: Path) -> list[Segment]:
    """Segments in ``directory``, sorted by start.

    A closed segment is known from its name alone. An open ``<start_ms>.ts`` (the
    one the child writes now, or one a killed child left) has its end read from
    its packets: about 9 ms for a 10 s segment of 600 kbit/s, mostly FFmpeg probing
    the stream when it opens the file (the demux itself is 0.4 ms). There is one
    such file per camera, so calling this every few seconds is fine; closed
    segments cost a directory entry each. Unreadable open files are left out.
    """
    segments = []
    for path, start_ms, end_ms, size in _names(directory):
        if end_ms is None:
            scan = _scan(path, start_ms / 1000)
            if scan is not None:
                segments.append(Segment(path, start_ms / 1000, scan.end, size))
                continue
            if (renamed := _closed_name(path)) is None:  # unreadable (repair() deletes it)
                continue
            path, end_ms, size = renamed, int(renamed.stem.split("-")[1]), renamed.stat().st_size
        segments.append(Segment(path, start_ms / 1000, end_ms / 1000, size))
    return sorted(segments, key=lambda s: s.start)


def repair(directory: Path) -> list[Segment]:
    """Close what a killed child left open; run it at daemon start, before any child writes. Returns all.

    A ``<start_ms>.ts`` is cut back to before its last packet (which the kill may
    have cut short; one frame is lost at most) and renamed to its closed name;
    one with fewer than two readable packets is deleted.
    """
    for path, start_ms, end_ms, size in _names(directory):
        if end_ms is not None:
            continue
        scan = _scan(path, start_ms / 1000) if size > 0 else None
        try:
            if scan is None or scan.packets < 2 or scan.last_pos is None:
                logger.info("deleting unreadable segment %s", path.name)
                path.unlink(missing_ok=True)
                continue
            os.truncate(path, scan.last_pos)
            closed_ms = max(start_ms, round(scan.end_before_last * 1000))
            os.replace(path, path.with_name(f"{start_ms}-{closed_ms}.ts"))
        except OSError as exc:  # one bad file must not stop the daemon's start
            logger.warning("cannot repair segment %s: %s", path.name, failure_reason(exc, "error"))
    return list_segments(directory)


def cut_clip(segments: Sequence[Segment], start: float, end: float, out: Path) -> float:
    """Stream-copy the recording of [start, end] into the MP4 ``out``, atomically.

    Args:
        segments: The camera's segments (``list_segments``); those overlapping the
            span are read in order. The open one may be among them: what is on disk is used.
        start: Wall clock of the span's start; the clip starts at the last keyframe at or before it.
        end: Wall clock of the span's end; the clip ends with the last packet at or before it.
        out: The clip; written to a temporary file in its folder, then renamed.

    Returns:
        The wall clock of the clip's first frame (at or before ``start`` when recorded).

    Raises:
        ClipError: Nothing recorded in the span, the segments cannot be read, or the
            clip cannot be written ("disk full" ...). No temporary file is left.
        ValueError: ``end`` is before ``start``.
    """
    if end < start:
        raise ValueError(f"clip end {end} is before its start {start}")
    chosen = sorted((s for s in segments if s.end > start and s.start <= end), key=lambda s: s.start)
    if not chosen:
        raise ClipError("no recording for the event's time")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise ClipError(failure_reason(exc, "cannot write clip")) from exc
    tmp = Path(name)
    try:
        first = _remux(chosen, start, end, tmp)
        os.replace(tmp, out)
    except ClipError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError, av.error.FFmpegError) as exc:  # ValueError: a codec MP4 cannot hold
        tmp.unlink(missing_ok=True)
        raise ClipError(failure_reason(exc, "cannot write clip")) from exc
    return first


def enforce_retention(camera_dir: Path, max_age: float, max_bytes: int, now: float) -> RetentionResult:
    """Keep one camera's recordings within ``max_age`` and ``max_bytes``.

    Clips (``clips/*.mp4``) older than ``max_age`` (by mtime) go first; then, while
    clips and segments together exceed ``max_bytes``, the oldest clips; then, if
    the segments alone still do, the oldest closed segments (the open one is the
    child's). Only regular files in ``camera_dir/clips`` and ``camera_dir/segments``
    are looked at; symlinks are neither followed nor deleted.
    """
    clips: list[tuple[float, int, Path]] = []
    temp_bytes = 0
    for entry in _entries(camera_dir / "clips"):
        info = entry.stat(follow_symlinks=False)
        mtime, size = info.st_mtime, info.st_size
        if entry.name.endswith(".mp4"):
            clips.append((mtime, size, Path(entry.path)))
        elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if now - mtime > _STALE_TEMP and _delete(Path(entry.path)):
                continue
            temp_bytes += size
    segments = _names(camera_dir / "segments")
    clips.sort()
    total = temp_bytes + sum(c[1] for c in clips) + sum(s[3] for s in segments)
    clips_deleted = segments_deleted = 0
    for mtime, size, path in clips:  # oldest first: by age, then for space
        if (now - mtime > max_age or total > max_bytes) and _delete(path):
            total -= size
            clips_deleted += 1
    for path, _start, end_ms, size in sorted(segments, key=lambda s: s[1]):
        if total <= max_bytes:
            break
        if end_ms is not None and _delete(path):
            total -= size
            segments_deleted += 1
    if total > max_bytes:
        logger.warning("recordings use %d bytes of %d", total, max_bytes, extra={"camera": camera_dir.name})
    return RetentionResult(total, clips_deleted, segments_deleted)


def prune_segments(directory: Path, keep_after: float) -> int:
    """Delete the closed segments that ended before ``keep_after`` (the ring); returns how many."""
    return sum(
        1
        for path, _start, end_ms, _size in _names(directory)
        if end_ms is not None and end_ms / 1000 < keep_after and _delete(path)
    )


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    """Regular files of ``directory`` (none if it is missing); symlinks are skipped."""
    try:
        with os.scandir(directory) as it:
            return [e for e in it if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _names(directory: Path) -> list[tuple[Path, int, int | None, int]]:
    """(path, start_ms, end_ms or None when open, bytes) of each segment file, from names only."""
    found = []
    for entry in _entries(directory):
        if (m := _SEGMENT.fullmatch(entry.name)) is None:
            continue
        start_ms, end_ms = int(m[1]), None if m[2] is None else int(m[2])
        if end_ms is not None and end_ms < start_ms:
            continue  # not ours: Segment refuses it
        with suppress(FileNotFoundError):  # pruned meanwhile
            found.append((Path(entry.path), start_ms, end_ms, entry.stat(follow_symlinks=False).st_size))
    return found


def _delete(path: Path) -> bool:
    """Unlink ``path``; False when it is gone already or cannot be removed (logged)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        logger.warning("cannot delete %s: %s", path.name, failure_reason(exc, "error"))
        return False
    return True


def _closed_name(path: Path) -> Path | None:
    """The closed name an open ``<start_ms>.ts`` was renamed to meanwhile, if any."""
    return next(iter(path.parent.glob(f"{path.stem}-*.ts")), None)


def _open(path: Path) -> tuple[InputContainer, VideoStream] | None:
    """The file and its video stream; an open segment closed meanwhile is found by its new name."""
    try:
        container = av.open(str(path), "r")
    except (OSError, av.error.FFmpegError):
        renamed = _closed_name(path) if "-" not in path.stem else None
        return _open(renamed) if renamed is not None else None
    if not container.streams.video:
        container.close()
        return None
    return container, container.streams.video[0]


def _packets(
    container: InputContainer, stream: VideoStream, drop_last: bool
) -> Iterator[Packet[VideoStream]]:
    """The timed packets of ``stream`` up to the first read error (a truncated file ends there)."""
    held: Packet[VideoStream] | None = None
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            if held is not None:
                yield held
            held = packet
    except (OSError, av.error.FFmpegError):
        pass
    if held is not None and not drop_last:
        yield held


def _frame_ticks(stream: VideoStream, time_base: Fraction) -> int:
    rate = stream.average_rate or stream.guessed_rate
    return round(1 / (rate * time_base)) if rate else 0


def _scan(path: Path, start: float) -> _Scan | None:
    opened = _open(path)
    if opened is None:
        return None
    container, stream = opened
    with container:
        assert stream.time_base is not None
        tb, frame = float(stream.time_base), _frame_ticks(stream, stream.time_base)
        first = end_pts = before_last = 0
        last_pos: int | None = None
        count = 0
        for packet in _packets(container, stream, drop_last=False):
            assert packet.pts is not None
            if count == 0:
                first = end_pts = packet.pts
            before_last, end_pts = end_pts, max(end_pts, packet.pts + (packet.duration or frame))
            last_pos, count = packet.pos, count + 1
    if count == 0:
        return None
    return _Scan(start + (end_pts - first) * tb, start + (before_last - first) * tb, last_pos, count)


class _Splicer:
    """Muxes the packets of successive segments into one stream whose timestamps start at 0 and never jump."""

    def __init__(self, output: OutputContainer, template: VideoStream) -> None:
        self._output = output
        self.stream = output.add_stream_from_template(template)
        self._source: VideoStream | None = None
        self._offset = 0
        self._next = Fraction(0)  # clip time (s) of the next packet when a new segment begins

    def mux(self, packet: Packet[VideoStream], frame_ticks: int) -> None:
        tb = packet.time_base
        assert packet.pts is not None
        dts = packet.dts if packet.dts is not None else packet.pts
        if self._source is None:  # the clip's first frame is shown at 0 (B-frames: its dts is < 0)
            self._source, self._offset = packet.stream, -packet.pts
        elif packet.stream is not self._source:  # a segment follows on: its dts continues the last one
            self._source, self._offset = packet.stream, round(self._next / tb) - dts
        duration = packet.duration or frame_ticks
        packet.pts, packet.dts, packet.duration = packet.pts + self._offset, dts + self._offset, duration
        packet.stream = self.stream
        self._output.mux_one(packet)
        self._next = (dts + self._offset + duration) * tb


def _timed(chosen: Sequence[Segment], end: float) -> Iterator[tuple[Packet[VideoStream], float, int]]:
    """(packet, wall clock, ticks of one frame) of the segments in order, up to ``end``.

    A read error ends that segment early (a truncated file); the next one follows on.
    Stops where the camera changed its stream: one MP4 track cannot hold both.
    """
    params: tuple[str, int, int] | None = None
    for segment in chosen:
        if (opened := _open(segment.path)) is None:
            continue
        container, stream = opened
        with container:
            if params not in (None, (stream.codec_context.name, stream.width, stream.height)):
                return
            params = (stream.codec_context.name, stream.width, stream.height)
            assert stream.time_base is not None
            tb, frame = stream.time_base, _frame_ticks(stream, stream.time_base)
            first_pts: int | None = None
            for packet in _packets(container, stream, drop_last=segment.is_open):
                assert packet.pts is not None
                first_pts = packet.pts if first_pts is None else first_pts
                t = segment.start + float((packet.pts - first_pts) * tb)
                if t > end:
                    return
                yield packet, t, frame


def _stamp(output: OutputContainer, first_time: float) -> float:
    """Name the clip's first frame's wall clock in its ``creation_time`` (before the header is written)."""
    stamp = datetime.fromtimestamp(first_time, timezone.utc)
    output.metadata["creation_time"] = stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return first_time


def _remux(chosen: Sequence[Segment], start: float, end: float, tmp: Path) -> float:
    """Write the clip into ``tmp``; returns its first frame's wall clock."""
    with av.open(str(tmp), "w", format="mp4", container_options={"movflags": "+faststart"}) as output:
        splicer: _Splicer | None = None
        pending: list[tuple[Packet[VideoStream], float, int]] = []  # from the keyframe before `start`
        first_time: float | None = None
        for packet, t, frame in _timed(chosen, end):
            splicer = splicer or _Splicer(output, packet.stream)  # while its input is open
            if first_time is not None:
                splicer.mux(packet, frame)
                continue
            if packet.is_keyframe and (t <= start or not pending):
                pending = [(packet, t, frame)]
            elif pending:
                pending.append((packet, t, frame))
            if t > start and pending:
                first_time = _stamp(output, pending[0][1])
                for p, _, f in pending:
                    splicer.mux(p, f)
                pending = []
        if splicer is None:
            raise ClipError("recording unreadable")
        if first_time is None and pending:  # the span ends in the recording's first GOP
            first_time = _stamp(output, pending[0][1])
            for p, _, f in pending:
                splicer.mux(p, f)
        if first_time is None:
            raise ClipError("no recording for the event's time")
    return first_time
