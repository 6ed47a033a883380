"""Recording: the child's segment ring (``monitor.recording``) and the daemon's clips (``monitor.clips``).

Real footage (``vtest.mp4``: 10 fps, 30 s, a keyframe every second) is fed
packet by packet with a synthetic wall clock (``T0`` + the packet's pts), so
no test sleeps. Results are checked with ffprobe as well as PyAV. Full disks
are real small file systems (conftest's ``small_disk``: tests run as root
here, so a read-only chmod would not stop them).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from monitor.clips import ClipError, cut_clip, enforce_retention, list_segments, prune_segments, repair
from monitor.recording import Segment, SegmentWriter
from tests.conftest import CLIP, ROOT

T0 = 1_700_000_000.0  # wall clock of the clip's first packet
DAY = 86400.0


def record(
    directory: Path, seconds: float, *, passes=1, on_closed=None, tick=None, **kwargs
) -> dict[str, Any]:
    """Feed every packet of the clip to one writer (``passes`` times: a file looping); what it reported."""
    closed: list[Segment] = []
    failed: list[tuple[str, float]] = []
    frames = 0
    now = T0
    with av.open(str(CLIP)) as container:
        stream = container.streams.video[0]
        report = on_closed or closed.append
        writer = SegmentWriter(
            directory, stream, seconds, report, lambda r: failed.append((r, now - T0)), **kwargs
        )
        for n in range(passes):
            container.seek(0)  # the timestamps start again at 0
            for packet in container.demux(stream):
                if packet.pts is None:
                    continue
                now = T0 + 30 * n + float(packet.pts * packet.time_base)
                if tick is not None:
                    tick(now)
                writer.write(packet, now)
                frames += len(packet.decode())  # after muxing: write() gives the packet back intact
        writer.close(now)
    return {"closed": closed, "failed": failed, "frames": frames, "dropped": writer.dropped}


def probe(path: Path) -> tuple[str, int, str]:
    """(codec, frames decoded, ffprobe's error output) of ``path``, independently of PyAV."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
         "stream=codec_name,nb_read_frames:format=duration", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    info = json.loads(result.stdout)
    stream = info["streams"][0]
    return stream["codec_name"], int(stream["nb_read_frames"]), result.stderr


def top_level_boxes(path: Path) -> list[str]:
    """The MP4 top-level box types in file order (``moov`` before ``mdat`` = faststart)."""
    boxes, data, at = [], path.read_bytes(), 0
    while at + 8 <= len(data):
        size, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8].decode()
        if size == 1:
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        boxes.append(kind)
        at += size if size else len(data)
    return boxes


def source_frames(indexes: set[int]) -> dict[int, np.ndarray]:
    with av.open(str(CLIP)) as container:
        decoded = enumerate(container.decode(video=0))
        return {i: frame.to_ndarray(format="rgb24") for i, frame in decoded if i in indexes}


@pytest.fixture
def ring(tmp_path: Path) -> tuple[Path, list[Segment]]:
    """The whole clip recorded in 4 s segments."""
    directory = tmp_path / "cam" / "segments"
    return directory, record(directory, 4.0)["closed"]


@pytest.mark.parametrize(("seconds", "length"), [(4.0, 4.0), (2.5, 3.0)])
def test_segments_roll_at_the_next_keyframe_and_play_as_h264(tmp_path, seconds, length):
    got = record(tmp_path, seconds)
    segments = got["closed"]
    assert got["frames"] == 300  # decoding the same packets after writing them still works
    assert segments == list_segments(tmp_path)  # the names alone say what the files cover
    assert segments[0].path.name == f"{int(T0 * 1000)}-{int((T0 + length) * 1000)}.ts"
    assert all(s.end - s.start == pytest.approx(length) for s in segments[:-1])
    assert all(a.end == b.start for a, b in itertools.pairwise(segments))  # no gap, no overlap
    assert segments[-1].end == T0 + 30
    total = 0
    for s in segments:
        codec, frames, errors = probe(s.path)
        assert (codec, errors) == ("h264", "")  # stream copy: the camera's codec, no re-encode
        assert frames == round((s.end - s.start) * 10)
        assert s.bytes == s.path.stat().st_size
        total += frames
    assert total == 300


def test_a_restarting_stream_starts_a_new_segment_at_its_first_keyframe(tmp_path):
    segments = record(tmp_path, 4.0, passes=2)["closed"]  # dts goes back to 0 at 30 s
    assert [s.start - T0 for s in segments] == pytest.approx(
        [0, 4, 8, 12, 16, 20, 24, 28, 30, 34, 38, 42, 46, 50, 54, 58]
    )
    assert all(probe(s.path)[1] == round((s.end - s.start) * 10) for s in segments)


def test_a_segment_killed_mid_write_is_readable_and_repaired(tmp_path):
    """A real ``kill -9`` of a child that wrote 2.5 s of a segment; a file cut mid-packet; empty ones."""
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path), str(CLIP), str(T0)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as child:  # fmt: skip
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
        child.send_signal(signal.SIGKILL)
    left = tmp_path / f"{int(T0 * 1000)}.ts"
    assert probe(left)[:2] == ("h264", 25)  # no trailer needed: every packet is on disk
    (listed,) = list_segments(tmp_path)  # open: the end is read from its packets
    assert (listed.path, listed.start) == (left, T0)
    assert listed.end == pytest.approx(T0 + 2.5)
    cut = tmp_path / f"{int(T0 * 1000) + 60_000}.ts"
    data = left.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 77])  # a kill in the middle of a packet
    (tmp_path / f"{int(T0 * 1000) + 90_000}.ts").write_bytes(b"")
    (tmp_path / f"{int(T0 * 1000) + 99_000}.ts").write_bytes(b"\x47 not a stream" * 50)
    repaired = repair(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.path.name for s in repaired)
    assert len(repaired) == 2
    for s in repaired:
        codec, frames, errors = probe(s.path)
        assert (codec, errors) == ("h264", "")  # the possibly torn last packet is gone
        assert frames == round((s.end - s.start) * 10)
    assert repaired[0].path.name == f"{int(T0 * 1000)}-{int(T0 * 1000) + 2400}.ts"
    assert list_segments(tmp_path) == repaired


KILLED_CHILD = """
import sys, av
from pathlib import Path
from monitor.recording import SegmentWriter
with av.open(sys.argv[2]) as c:
    s = c.streams.video[0]
    w = SegmentWriter(Path(sys.argv[1]), s, 60.0, print, print)
    for i, p in zip(range(25), c.demux(s)):
        w.write(p, float(sys.argv[3]) + float(p.pts * p.time_base))
    print("written", flush=True)
    sys.stdin.read()
"""


def test_a_clip_across_three_segments_is_one_faststart_mp4_from_the_keyframe_before_start(ring, tmp_path):
    directory, _ = ring
    out = tmp_path / "cam" / "clips" / "event.mp4"
    out.parent.mkdir()
    start, end = T0 + 5.5, T0 + 15.2  # segments 4-8, 8-12 and 12-16
    first = cut_clip(list_segments(directory), start, end, out)
    assert first == pytest.approx(T0 + 5.0)  # the keyframe at or before start
    codec, frames, errors = probe(out)
    assert (codec, errors, frames) == ("h264", "", 103)  # 5.0 .. 15.2 s
    boxes = top_level_boxes(out)
    assert boxes.index("moov") < boxes.index("mdat")
    with av.open(str(out)) as container:
        duration = float(container.duration or 0) / av.time_base
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert end - start <= duration <= end - start + 1.0
    assert duration == pytest.approx(10.3)
    want = source_frames({50, 102, 152})
    assert np.array_equal(decoded[0], want[50])  # bit-exact: the packets were copied, not re-encoded
    assert np.array_equal(decoded[52], want[102])  # across the boundary at 8 s and 12 s, in order
    assert np.array_equal(decoded[-1], want[152])
    assert sorted(p.name for p in out.parent.iterdir()) == ["event.mp4"]  # no temporary file left


def test_a_clip_may_end_in_the_segment_still_being_written(tmp_path):
    directory = tmp_path / "segments"
    with av.open(str(CLIP)) as container:
        stream = container.streams.video[0]
        writer = SegmentWriter(directory, stream, 10.0, lambda s: None, lambda r: None)
        for packet in container.demux(stream):
            if packet.pts is not None and packet.pts * packet.time_base < 25:
                writer.write(packet, T0 + float(packet.pts * packet.time_base))
        segments = list_segments(directory)  # 0-10, 10-20, and 20- still open
        assert [s.is_open for s in segments] == [False, False, True]
        assert segments[-1].end == pytest.approx(T0 + 25)
        first = cut_clip(segments, T0 + 18.3, T0 + 30, tmp_path / "open.mp4")
        writer.close(T0 + 25)
    assert first == pytest.approx(T0 + 18.0)
    assert probe(tmp_path / "open.mp4")[1:] == (69, "")  # 18.0 .. 24.8: the last packet may be torn


def test_a_clip_with_no_recording_of_its_time_is_refused(ring, tmp_path):
    _, segments = ring
    for start, end in [(T0 - 20, T0 - 10), (T0 + 31, T0 + 40)]:
        with pytest.raises(ClipError, match="no recording") as caught:
            cut_clip(segments, start, end, tmp_path / "x.mp4")
        assert caught.value.reason == "no recording for the event's time"
    gone = [Segment(tmp_path / "123-456.ts", T0, T0 + 10, 1)]
    with pytest.raises(ClipError) as caught:
        cut_clip(gone, T0, T0 + 5, tmp_path / "x.mp4")
    assert caught.value.reason == "recording unreadable"
    assert not (tmp_path / "x.mp4").exists()


def test_a_clip_bigger_than_the_free_space_fails_as_disk_full_and_leaves_nothing(ring, small_disk):
    _, segments = ring
    disk = small_disk(512)  # a 20 s clip is about 1.5 MB
    with pytest.raises(ClipError) as caught:
        cut_clip(segments, T0 + 5, T0 + 25, disk.path / "event.mp4")
    assert caught.value.reason == "disk full"
    assert list(disk.path.iterdir()) == []


def test_a_full_disk_drops_segments_reports_once_per_try_and_recording_resumes(small_disk):
    disk = small_disk(4096)
    disk.fill()
    got = record(
        disk.path / "segments",
        4.0,
        retry_after=5.0,
        tick=lambda now: now >= T0 + 7 and disk.filler.exists() and disk.free(),
    )
    # Tries at 0 s and at the first keyframe 5 s later fail; space is back at 7 s, the retry at 10 s works.
    assert got["failed"] == [("disk full", 0.0), ("disk full", 5.0)]
    assert got["dropped"] == 2
    assert got["frames"] == 300  # detection never noticed
    assert [s.start - T0 for s in got["closed"]] == pytest.approx([10, 14, 18, 22, 26])
    assert sorted(p.name for p in (disk.path / "segments").iterdir()) == [s.path.name for s in got["closed"]]
    assert all(probe(s.path)[2] == "" for s in got["closed"])


def test_the_ring_keeps_only_what_pre_capture_needs(tmp_path):
    on_disk: list[int] = []

    def closed(segment: Segment) -> None:
        prune_segments(tmp_path, segment.end - 5.0 - 4.0)  # now - pre_capture - one segment of margin
        on_disk.append(len(list_segments(tmp_path)))

    record(tmp_path, 4.0, on_closed=closed)
    assert max(on_disk) <= 3
    kept = list_segments(tmp_path)
    assert kept[0].start <= T0 + 30 - 9.0  # still covers the pre-roll of an event starting now
    assert prune_segments(tmp_path, T0 + 100) == len(kept)


@pytest.fixture
def camera_dir(tmp_path: Path) -> Path:
    """Clips a..d (10, 3, 2, 1 days old), three closed segments and the open one, 1000 bytes each."""
    now = T0
    for name, age in [("a", 10), ("b", 3), ("c", 2), ("d", 1)]:
        clip = tmp_path / "cam" / "clips" / f"{name}.mp4"
        clip.parent.mkdir(parents=True, exist_ok=True)
        clip.write_bytes(b"m" * 1000)
        os.utime(clip, (now - age * DAY, now - age * DAY))
    for name in ["1000-2000.ts", "2000-3000.ts", "3000-4000.ts", "4000.ts"]:
        (tmp_path / "cam" / "segments").mkdir(exist_ok=True)
        (tmp_path / "cam" / "segments" / name).write_bytes(b"s" * 1000)
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x" * 5000)
    os.utime(outside, (now - 30 * DAY, now - 30 * DAY))
    (tmp_path / "cam" / "clips" / "link.mp4").symlink_to(outside)
    return tmp_path / "cam"


@pytest.mark.parametrize(
    ("max_bytes", "clips_left", "segments_left", "deleted"),
    [
        (10**9, ["b", "c", "d"], 4, (1, 0)),  # by age only
        (5500, ["d"], 4, (3, 0)),  # then the oldest clips for space
        (2500, [], 2, (4, 2)),  # segments only when no clip is left; never the open one
        (10, [], 1, (4, 3)),
    ],
)
def test_retention_deletes_old_clips_then_oldest_clips_then_oldest_segments(
    camera_dir, max_bytes, clips_left, segments_left, deleted
):
    result = enforce_retention(camera_dir, 7 * DAY, max_bytes, T0)
    assert (result.clips_deleted, result.segments_deleted) == deleted
    assert result.bytes == 1000 * (len(clips_left) + segments_left)
    assert result.bytes <= max_bytes or segments_left == 1
    assert sorted(p.stem for p in (camera_dir / "clips").glob("*.mp4") if not p.is_symlink()) == clips_left
    assert len(list((camera_dir / "segments").iterdir())) == segments_left
    assert (camera_dir / "segments" / "4000.ts").exists()
    assert (camera_dir / "clips" / "link.mp4").is_symlink()  # nothing outside camera_dir is touched
    assert (camera_dir.parent / "elsewhere.mp4").stat().st_size == 5000


def test_writer_arguments_are_checked():
    with av.open(str(CLIP)) as container:
        stream = container.streams.video[0]
        with pytest.raises(ValueError, match="segment_seconds must be > 0, got 0"):
            SegmentWriter(Path("x"), stream, 0, print, print)
