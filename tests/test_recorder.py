"""The recorder on real segments of the test clip: an end waits for its clip, a crash's journal is ended."""

from __future__ import annotations

import time
from pathlib import Path

import av
import pytest

from monitor.decoder import SegmentClosed
from monitor.events import Alert, Event
from monitor.metrics import Metrics
from monitor.recorder import Recorder
from monitor.recording import Segment, SegmentWriter, segments_dir
from monitor.settings import RecordSettings
from monitor.visits import Visits
from tests.conftest import CLIP, wait_until

CAMERA = "gate"


def record_settings(root: Path) -> RecordSettings:
    return RecordSettings(enabled=True, path=root, pre_capture=2, post_capture=2, segment=2)


def record(recorder: Recorder, root: Path, t0: float, seconds: float) -> None:
    """Write the clip's first ``seconds`` as segments, as a decoder child would, received from ``t0`` on."""
    closed: list[Segment] = []
    with av.open(str(CLIP)) as source:
        stream = source.streams.video[0]
        writer = SegmentWriter(segments_dir(root, CAMERA), stream, 2.0, closed.append, pytest.fail)
        for packet in source.demux(stream):
            if packet.pts is None:
                continue
            t = float(packet.pts * packet.time_base)
            if t > seconds:
                break
            writer.write(packet, t0 + t)
        writer.close(t0 + seconds)
    for segment in closed:
        recorder.on_recording(
            CAMERA, SegmentClosed(str(segment.path), segment.start, segment.end, segment.bytes)
        )


def event(kind: str, start: float, end: float | None, frame: float) -> Event:
    return Event(
        type=kind,
        event_id=f"{start:.6f}-abcdef",
        camera=CAMERA,
        label="person",
        category="person",
        score=0.8,
        top_score=0.8,
        box=[1, 2, 3, 4],
        track_id=1,
        start_time=start,
        end_time=end,
        frame_time=frame,
        model="m.pt@abc",
        snapshot=None,
    )


def test_an_end_waits_for_its_clip_and_a_new_event_goes_out_at_once(tmp_path):
    metrics = Metrics()
    t0 = time.time() - 20  # the recording reaches now: the end's deadline has not passed
    with Recorder(tmp_path, metrics) as recorder:
        recorder.add_camera(CAMERA, record_settings(tmp_path))
        new = Alert(event("new", t0 + 8, None, t0 + 8), None, t0 + 8)
        assert recorder.hold([new]) == [new]  # a new event is never held
        end = Alert(event("end", t0 + 8, t0 + 12, t0 + 13), None, t0 + 13)
        assert recorder.hold([end]) == []  # the end waits for the recording of end + post_capture
        record(recorder, tmp_path, t0, 20)
        done = wait_until(recorder.done, 10, "the clip")
    ((item, ids),) = done
    assert isinstance(item, Alert)
    assert item.event.clip == f"/api/events/{end.event.event_id}/clip.mp4"
    assert item.event.clip_error is None
    assert ids == [end.event.event_id]
    path = recorder.clip(end.event.event_id)
    assert path is not None
    with av.open(str(path)) as clip:
        # 8 - 2 (pre) to 12 + 2 (post): 8 s, from the keyframe at or before the start
        assert 7.9 <= float(clip.duration or 0) / 1e6 <= 9.1
    assert metrics.registry.get_sample_value("monitor_clips_total", {"camera": CAMERA}) == 1
    assert recorder.clip("../../etc/passwd") is None


def test_an_end_without_recording_says_why_in_clip_error(tmp_path):
    metrics = Metrics()
    t0 = time.time() - 600
    with Recorder(tmp_path, metrics) as recorder:
        recorder.add_camera(CAMERA, record_settings(tmp_path))
        recorder.hold([Alert(event("end", t0, t0 + 4, t0 + 5), None, t0 + 5)])  # its deadline passed
        ((item, _),) = wait_until(recorder.done, 10, "the failed clip")
    assert isinstance(item, Alert)
    assert item.event.clip is None
    assert item.event.clip_error == "no recording for the event's time"
    labels = {"camera": CAMERA, "reason": "no recording for the event's time"}
    assert metrics.registry.get_sample_value("monitor_clip_failures_total", labels) == 1


def test_after_a_crash_the_journal_ends_the_open_event_and_visit_with_clips(tmp_path):
    t0 = time.time() - 120
    start = t0 + 6
    new = event("new", start, None, start)
    update = event("update", start, None, t0 + 10)
    visits = Visits(CAMERA, [], gap=30)
    (visit,) = visits.add(new)
    with Recorder(tmp_path, Metrics()) as crashed:
        crashed.add_camera(CAMERA, record_settings(tmp_path))
        crashed.hold([Alert(new, None, start), Alert(update, None, t0 + 10)])
        crashed.hold_review(visits.open)  # as the dispatcher journals it
        record(crashed, tmp_path, t0, 20)
    # ... killed here: nothing was ended. The next start finds the journal.
    with Recorder(tmp_path, Metrics()) as restarted:
        restarted.add_camera(CAMERA, record_settings(tmp_path))
        done: list = []
        wait_until(lambda: done.extend(restarted.done()) or len(done) == 2, 10, "both ends")
        event_end = next(i for i, _ in done if isinstance(i, Alert)).event
        visit_end = next(i for i, _ in done if not isinstance(i, Alert))
        assert (event_end.type, event_end.event_id, event_end.end_time) == ("end", new.event_id, t0 + 10)
        assert event_end.clip is not None
        assert (visit_end.type, visit_end.visit_id, visit_end.event_ids) == (
            "end",
            visit.visit_id,
            [new.event_id],
        )
        assert visit_end.clip == f"/api/reviews/{visit.visit_id}/clip.mp4"
        restarted.published([i for _, ids in done for i in ids])
    assert list((tmp_path / CAMERA / "open").iterdir()) == []  # in the spool now: forgotten
    with Recorder(tmp_path, Metrics()) as again:
        again.add_camera(CAMERA, record_settings(tmp_path))
        assert again.finish() == []  # nothing ended twice


def test_an_unusable_recording_folder_costs_the_clips_not_the_camera(tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the recordings should go")
    with Recorder(blocked, Metrics()) as recorder:
        target = recorder.add_camera(CAMERA, record_settings(blocked))  # no exception: the camera starts
        assert target.directory == str(segments_dir(blocked, CAMERA))
        t0 = time.time() - 600
        recorder.hold([Alert(event("end", t0, t0 + 4, t0 + 5), None, t0 + 5)])
        ((item, _),) = wait_until(recorder.done, 10, "the failed clip")
    assert "recording folder" in caplog.text
    assert isinstance(item, Alert)
    assert item.event.clip is None
    assert item.event.clip_error == "recording folder missing"
    assert "Traceback" not in caplog.text
