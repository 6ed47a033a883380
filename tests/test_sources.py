"""Decoder children: real files and a real RTSP server; newest frame wins; dead decoders restart."""

from __future__ import annotations

import ctypes
import errno
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import time
import types

import cv2
import numpy as np
import pytest

from monitor.decoder import _STDERR_SYNC_TIMEOUT, _open_with
from monitor.frames import CameraState, CameraStatus
from monitor.metrics import Metrics
from monitor.settings import CameraSettings
from monitor.sources import Source
from tests.conftest import CLIP, free_port, start_rtsp_server


def pump(source: Source, until, timeout: float, what: str):
    """Run the daemon loop's part for one source until ``until()`` is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = source.connection
        mpc.wait([conn] if conn is not None else [], timeout=0.1)
        source.drain()
        source.check(time.monotonic())
        result = until()
        if result:
            return result
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sample(metrics: Metrics, name: str, camera: str) -> float:
    value = metrics.registry.get_sample_value(name, {"camera": camera})
    return value or 0.0


def test_file_camera_delivers_scaled_frames_at_detect_fps():
    metrics = Metrics()
    settings = CameraSettings(url=str(CLIP), detect={"width": 384, "height": 288})
    with Source("file", settings, fps=5, metrics=metrics) as source:
        first = pump(source, source.take, 20, "a first frame")
        assert first.image.shape == (288, 384, 3)
        assert first.capture_time <= time.time()
        start, seqs = time.monotonic(), []
        while time.monotonic() - start < 2.0:
            frame = pump(source, source.take, 5, "a frame")
            seqs.append(frame.seq)
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        # 5 fps for 2 s (the clip itself is 10 fps): about 10 frames, never 20.
        assert 7 <= len(seqs) <= 12, seqs
        assert source.state is CameraState.ONLINE


def test_newest_frame_wins_and_skipped_frames_are_counted():
    metrics = Metrics()
    with Source("file", CameraSettings(url=str(CLIP)), fps=10, metrics=metrics) as source:
        first = pump(source, source.take, 20, "a first frame")
        pump(
            source,
            lambda: sample(metrics, "monitor_camera_frames_total", "file") >= first.seq + 6,
            10,
            "six more decoded frames",
        )
        newest = source.take()
        assert newest is not None
        assert newest.seq >= first.seq + 5
        assert sample(metrics, "monitor_camera_frames_dropped_total", "file") == newest.seq - first.seq - 1
        assert source.take() is None  # nothing new since


def test_missing_file_is_offline_with_reason_and_retried():
    statuses: list[CameraStatus] = []
    metrics = Metrics()
    settings = CameraSettings(url="/nonexistent/clip.mp4")
    with Source("ghost", settings, fps=5, metrics=metrics, on_status=statuses.append) as source:
        pump(source, lambda: source.state is CameraState.OFFLINE, 15, "offline")
        assert source.reason == "not found"
        pump(source, lambda: source.reconnects >= 1, 5, "a retry")
    assert metrics.registry.get_sample_value("monitor_camera_up", {"camera": "ghost"}) == 0
    assert [s.state for s in statuses][:2] == [CameraState.STARTING, CameraState.OFFLINE]


def test_killed_decoder_is_restarted():
    metrics = Metrics()
    with Source("file", CameraSettings(url=str(CLIP)), fps=5, metrics=metrics) as source:
        pump(source, source.take, 20, "a first frame")
        source._proc.kill()
        pump(source, lambda: source.state is CameraState.OFFLINE, 5, "the death to be noticed")
        assert source.reason.startswith("decoder exited (code")
        pump(source, source.take, 20, "frames after the restart")
        assert source.reconnects == 1
        assert sample(metrics, "monitor_camera_reconnects_total", "file") == 1


@pytest.mark.integration
def test_rtsp_camera_delivers_frames_and_survives_server_restart():
    server = start_rtsp_server({"cam": CLIP})
    metrics = Metrics()
    settings = CameraSettings(url=server.url("cam"), stall_timeout=3, open_timeout=3)
    try:
        with Source("rtsp", settings, fps=5, metrics=metrics) as source:
            frame = pump(source, source.take, 20, "a first RTSP frame")
            assert frame.image.shape == (576, 768, 3)
            server.stop()
            pump(source, lambda: source.state in (CameraState.OFFLINE, CameraState.STALLED), 5, "the outage")
            server = start_rtsp_server({"cam": CLIP}, port=server.port)
            pump(source, source.take, 20, "frames after the server came back")
            assert source.state is CameraState.ONLINE
    finally:
        server.stop()


def test_frame_too_old_for_its_turn_is_dropped_and_counted():
    metrics = Metrics()
    with Source("file", CameraSettings(url=str(CLIP)), fps=5, metrics=metrics) as source:
        pump(source, source.has_new_frame, 20, "a frame")
        assert source.take(not_before=time.time() + 1.0) is None  # older than allowed
        assert sample(metrics, "monitor_camera_frames_dropped_total", "file") >= 1
        assert not source.has_new_frame()
        fresh = pump(source, source.take, 5, "the next frame")
        assert fresh.capture_time > time.time() - 1.0


def test_frame_age_keeps_growing_across_reconnects_of_a_dead_camera():
    metrics = Metrics()
    # Nothing listens on the port: every attempt is refused at once; the small backoff
    # makes the decoder restart several times in a few seconds.
    settings = CameraSettings(url=f"rtsp://127.0.0.1:{free_port()}/live", open_timeout=3, backoff_max=0.2)
    created = time.monotonic()
    with Source("dead", settings, fps=5, metrics=metrics) as source:
        ages = []
        for count in range(1, 5):
            pump(source, lambda count=count: source.reconnects >= count, 20, f"reconnect {count}")
            ages.append(sample(metrics, "monitor_camera_last_frame_age_seconds", "dead"))
            # The metric counts from the Source's creation, not from the newest decoder.
            assert ages[-1] >= time.monotonic() - created - 0.5, (count, ages)
        assert source.state in (CameraState.STARTING, CameraState.OFFLINE)
        assert ages == sorted(ages), ages


def _report_a_buffered_ffmpeg_error(conn: mpc.Connection) -> None:
    """In a fresh child: FFmpeg's error sits in C's stdout buffer when the failure is reported."""
    from monitor.decoder import _StderrReasons

    reasons = _StderrReasons()
    # OpenCV prints FFmpeg's log with printf: on a pipe, C stdio holds it in a 4 KiB buffer.
    ctypes.CDLL(None).printf(b"[OPENCV:FFMPEG:16] Connection to tcp://cam:554 failed: Connection refused\n")
    started = time.monotonic()
    first = reasons.latest("cannot open stream")
    elapsed = time.monotonic() - started
    conn.send((first, elapsed, reasons.latest("cannot open stream")))


def test_failure_reason_includes_ffmpeg_output_still_buffered_when_the_stream_fails(monkeypatch):
    # As under systemd: without PYTHONUNBUFFERED, C's stdout on a pipe is fully buffered.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    reader, writer = mp.get_context("spawn").Pipe(duplex=False)
    child = mp.get_context("spawn").Process(target=_report_a_buffered_ffmpeg_error, args=(writer,))
    child.start()
    writer.close()
    try:
        assert reader.poll(30), "the child reported nothing"
        first, elapsed, second = reader.recv()
    finally:
        child.join(10)
    assert first == "connection refused"
    assert elapsed < _STDERR_SYNC_TIMEOUT  # the reader acknowledged; not the fallback deadline
    assert second == "cannot open stream"  # a reason is reported once


@pytest.mark.integration
def test_frozen_rtsp_server_makes_the_camera_stalled_then_online_again():
    stall = 2.0
    server = start_rtsp_server({"cam": CLIP})
    statuses: list[CameraStatus] = []
    # Detect fps = the clip's 10 fps: the decoder converts every frame it reads.
    settings = CameraSettings(url=server.url("cam"), stall_timeout=stall, open_timeout=3)
    try:
        with Source("frozen", settings, fps=10, metrics=Metrics(), on_status=statuses.append) as source:
            pump(source, source.take, 20, "a first RTSP frame")
            # SIGSTOP: the server's TCP connection stays open, but nothing is sent on it.
            os.kill(server.proc.pid, signal.SIGSTOP)
            frozen_at = time.time()
            pump(source, lambda: source.state is CameraState.STALLED, stall + 5, "the stall")
            assert source.reason == f"no frame for {stall:g} s"
            assert source.since - frozen_at <= stall + 2
            after_freeze = [s.state for s in statuses if s.since >= frozen_at]
            assert after_freeze[0] is CameraState.STALLED, after_freeze  # not offline, not online
            os.kill(server.proc.pid, signal.SIGCONT)
            thawed_at = time.time()
            pump(
                source,
                lambda: source.state is CameraState.ONLINE and source.take() is not None,
                20,
                "frames after the server resumed",
            )
            assert source.since >= thawed_at
            assert source.reconnects >= 1
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def restart_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays the watchdog announced ("...; reconnecting in 1.2 s"), in order."""
    return [
        float(r.getMessage().rsplit("reconnecting in ", 1)[1].split()[0])
        for r in caplog.records
        if "reconnecting in" in r.getMessage()
    ]


def test_reconnects_back_off_doubling_up_to_the_cap_with_jitter(monkeypatch, caplog):
    # Jitter at its top (+20 %): 1 s -> 1.2, 2 s -> 2.4, then the cap (2 s) -> 2.4 again.
    monkeypatch.setattr("monitor.sources.random.uniform", lambda low, high: high)
    caplog.set_level("WARNING", logger="monitor.sources")
    statuses: list[CameraStatus] = []
    settings = CameraSettings(url=f"rtsp://127.0.0.1:{free_port()}/cam", backoff_max=2)
    with Source("refused", settings, fps=5, metrics=Metrics(), on_status=statuses.append) as source:
        pump(source, lambda: source.reconnects >= 3 and source.state is CameraState.OFFLINE, 30, "3 retries")
    assert restart_delays(caplog)[:4] == [1.2, 2.4, 2.4, 2.4]
    # The waits really happened: each retry (STARTING) came at least that long after its failure.
    offline = [s.since for s in statuses if s.state is CameraState.OFFLINE]
    retries = [s.since for s in statuses if s.state is CameraState.STARTING][1:]
    gaps = [retry - failed for failed, retry in zip(offline, retries, strict=False)]
    assert len(gaps) >= 3
    assert all(gap >= delay - 0.05 for gap, delay in zip(gaps, [1.2, 2.4, 2.4], strict=False)), gaps


def test_a_session_that_delivered_frames_restarts_the_backoff_from_the_first_step(monkeypatch, caplog):
    # A camera whose sessions end after a few seconds of good frames (RTSP session
    # timeouts, a flaky link) must not wait longer and longer between sessions: each
    # session that delivered frames starts the backoff again at the first step.
    monkeypatch.setattr("monitor.sources.random.uniform", lambda low, high: low)  # -20 %
    caplog.set_level("WARNING", logger="monitor.sources")
    with Source("file", CameraSettings(url=str(CLIP)), fps=5, metrics=Metrics()) as source:
        for _ in range(3):
            pump(source, source.take, 20, "frames")
            source._proc.kill()
            pump(source, lambda: source.state is CameraState.OFFLINE, 5, "the death to be noticed")
    assert restart_delays(caplog) == [0.8, 0.8, 0.8]


def test_a_camera_starts_when_file_descriptors_run_out_and_comes_online_once_they_are_back(caplog):
    import resource

    caplog.set_level("WARNING", logger="monitor.sources")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 512), hard))
    try:
        with pytest.raises(OSError, match="Too many open files") as exhausted:  # noqa: PT012
            while len(filler) < 1024:  # bounded: the soft limit is 512
                filler.append(os.open(os.devnull, os.O_RDONLY))
        assert exhausted.value.errno == errno.EMFILE
        source = Source("cam", CameraSettings(url=str(CLIP), backoff_max=0.5), fps=5, metrics=Metrics())
        source.__enter__()  # must not raise: the camera is offline and retries
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert source.state is CameraState.OFFLINE
        assert source.reason is not None
        assert "Too many open files" in source.reason
        pump(source, source.take, 30, "frames once descriptors are free again")
        assert source.state is CameraState.ONLINE
    finally:
        source.close()


def test_nvdec_without_pynvvideocodec_decodes_on_the_cpu_and_says_so(caplog):
    caplog.set_level("INFO", logger="monitor.sources")
    settings = CameraSettings(url=str(CLIP), decoder="nvdec")
    with Source("gpu-cam", settings, fps=5, metrics=Metrics()) as source:
        frame = pump(source, source.take, 20, "a frame decoded on the CPU")
    assert frame.image.shape == (576, 768, 3)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "PyNvVideoCodec" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].camera == "gpu-cam"
    assert "decoding on the CPU" in warnings[0].getMessage()
    assert any("decoded on the CPU" in r.getMessage() for r in caplog.records)


def test_auto_decoder_without_pynvvideocodec_is_the_cpu_without_a_warning(caplog):
    caplog.set_level("INFO", logger="monitor.sources")
    with Source("cam", CameraSettings(url=str(CLIP)), fps=5, metrics=Metrics()) as source:
        pump(source, source.take, 20, "a frame")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


class _FakeNvc(types.ModuleType):
    """PyNvVideoCodec's decode API (CreateDemuxer, CreateDecoder, Decode, host NV12 frames).

    Only for the adapter's own logic (packets to frames, NV12 to BGR); the real
    library needs an NVIDIA GPU, which the CI machine does not have.
    """

    def __init__(self, images: list[np.ndarray], fail: str | None = None) -> None:
        super().__init__("PyNvVideoCodec")
        self.images, self.fail = images, fail

    def CreateDemuxer(self, filename: str):
        if self.fail:
            raise RuntimeError(self.fail)
        images = self.images

        class Demuxer:
            def GetNvCodecId(self):
                return 4

            def FrameRate(self):
                return 10.0

            def __iter__(self):
                # Two frames come out of the second packet (decoder latency), none of the first.
                return iter([[], images[:2], images[2:]])

        return Demuxer()

    def CreateDecoder(self, gpuid: int, codec: int, usedevicememory: bool):
        assert (gpuid, codec, usedevicememory) == (0, 4, False)
        height, width = self.images[0].shape[:2]
        kept: list[np.ndarray] = []

        class Frame:
            def __init__(self, image: np.ndarray) -> None:
                i420 = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
                y, u, v = i420[:height], i420[height:].reshape(2, -1)[0], i420[height:].reshape(2, -1)[1]
                uv = np.empty(u.size * 2, np.uint8)
                uv[0::2], uv[1::2] = u, v
                self.buffer = np.concatenate([y.ravel(), uv])
                kept.append(self.buffer)

            def framesize(self):
                return self.buffer.size

            def GetPtrToPlane(self, plane):
                return self.buffer.ctypes.data

        class Decoder:
            def Decode(self, packet):
                return [Frame(image) for image in packet]

            def GetWidth(self):
                return width

            def GetHeight(self):
                return height

        return Decoder()


def test_nvdec_adapter_turns_decoded_nv12_frames_into_bgr(monkeypatch):
    images = [np.full((48, 64, 3), (40 * i, 100, 200 - 40 * i), np.uint8) for i in range(3)]
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", _FakeNvc(images))
    cap, decoder, fallback = _open_with(
        cv2, CameraSettings(url="rtsp://cam/live"), "rtsp://cam/live", "nvdec"
    )
    assert (decoder, fallback) == ("nvdec", None)
    assert cap.get(cv2.CAP_PROP_FPS) == 10.0
    decoded = []
    while cap.grab():
        ok, image = cap.retrieve()
        assert ok
        decoded.append(image)
    assert len(decoded) == 3
    for got, want in zip(decoded, images, strict=True):
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 4  # YUV 4:2:0 round trip


def test_nvdec_that_cannot_open_falls_back_to_the_cpu_with_a_redacted_reason(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "PyNvVideoCodec", _FakeNvc([], fail="no CUDA device for rtsp://admin:pw@cam/live")
    )
    cap, decoder, fallback = _open_with(cv2, CameraSettings(url=str(CLIP)), str(CLIP), "nvdec")
    try:
        assert decoder == "cpu"
        assert cap.isOpened()
        assert cap.grab()  # OpenCV's FFmpeg decodes it instead
        assert (
            fallback
            == "nvdec cannot decode this stream (RuntimeError: no CUDA device for rtsp://***@cam/live)"
        )
    finally:
        cap.release()


def test_a_held_frame_is_never_written_while_the_child_laps_it():
    """The hand-off with no copy, under a child faster than the step: intact frames, in order, once.

    The stand-in child writes a frame every 5 ms into 4 slots; every other frame
    taken is held for 25 ms (a slow pipeline step), so the child publishes about
    five frames meanwhile and would have written over the held slot without the
    lease. The frame's pixels and its letterbox, read in place after the hold,
    must still be exactly the frame of its sequence number.
    """
    from monitor.letterbox import NetInput, letterbox_into
    from monitor.synthetic import SyntheticFeed, synthetic_frames

    width, height = 320, 240
    net = NetInput(imgsz=64, stride=32, rect=True)
    # What the stand-in child writes, in turn: 7 frames, so no slot gets the same frame back.
    expected = synthetic_frames(width, height, 7, seed=3)
    p = net.place(height, width)
    boxes = []
    for image in expected:
        box = np.zeros((p.input_height, p.input_width, 3), np.uint8)
        letterbox_into(image, box, p)
        boxes.append(box)
    metrics = Metrics()
    settings = CameraSettings(url="synthetic", detect={"width": width, "height": height})
    taken, refused, lapped_holds = [], 0, 0
    with Source(
        "race",
        settings,
        fps=200,
        metrics=metrics,
        feed=SyntheticFeed(width, height, seed=3, count=7),
        net=net,
    ) as source:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline or not taken:
            source.drain()
            if not source.has_new_frame():
                mpc.wait([source.connection], timeout=0.1) if source.connection is not None else None
                continue
            frame = source.take()
            if frame is None:
                refused += 1  # newer frames were published since its message: not held
                continue
            if len(taken) % 2:
                before = source._slots.latest_seq.value
                time.sleep(0.025)  # the slow step; the child goes on meanwhile
                lapped_holds += source._slots.latest_seq.value - before >= 4  # it went round every slot
            want = frame.seq % len(expected)
            intact = np.array_equal(frame.image, expected[want]) and np.array_equal(
                frame.net.image, boxes[want]
            )
            taken.append((frame.seq, intact))
            frame.release()
            with pytest.raises(RuntimeError, match="released"):
                frame.image  # noqa: B018  (a released frame's pixels are gone, never stale)
    dropped = metrics.registry.get_sample_value("monitor_camera_frames_dropped_total", {"camera": "race"})
    torn = [seq for seq, intact in taken if not intact]
    assert not torn, f"frames written over while held: {torn}"
    assert lapped_holds > 0, "the child never went round the slots during a hold: the race was not exercised"
    seqs = [seq for seq, _ in taken]
    assert seqs == sorted(set(seqs)), "a frame was handed over twice or out of order"
    assert len(taken) >= 10
    # Every frame from the first taken to the last was either handed over or counted as dropped.
    assert len(taken) + dropped == taken[-1][0] - taken[0][0] + 1


def test_a_frame_still_in_use_is_copied_out_when_its_camera_hands_over_the_next():
    """Two frames of one camera in one batch: the first keeps its pixels though its slot is given back."""
    from monitor.synthetic import SyntheticFeed, synthetic_frames

    expected = synthetic_frames(64, 48, 7, seed=5)
    settings = CameraSettings(url="synthetic", detect={"width": 64, "height": 48})
    feed = SyntheticFeed(64, 48, seed=5, count=7)
    with Source("twice", settings, fps=100, metrics=Metrics(), feed=feed) as source:
        first = pump(source, source.take, 30, "a first frame")
        second = pump(source, source.take, 5, "a second frame")
        assert second.seq > first.seq
        assert first.pixels.in_slot is False  # copied out: its slot was given back
        assert second.pixels.in_slot is True
        kept = second.keep_image()  # a snapshot's pixels: one copy however many tracks keep the frame
        assert second.keep_image() is kept
        newest = source._slots.latest_seq
        pump(source, lambda: newest.value >= second.seq + 8, 5, "the child going round the slots")
        assert np.array_equal(first.image, expected[first.seq % len(expected)])
        assert np.array_equal(second.image, expected[second.seq % len(expected)])
        second.release()
        third = pump(source, source.take, 5, "a third frame")  # the child may now write second's slot
        pump(source, lambda: newest.value >= third.seq + 8, 5, "the child going round the slots again")
        assert np.array_equal(kept, expected[second.seq % len(expected)])
