"""``monitor bench``: a well-formed report from real decoders and the real model; no camera starves.

Speed is never asserted here (see docs/benchmarks.md for measured numbers).
"""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from monitor.bench import STAGES
from monitor.cli import main
from monitor.frames import CameraState
from monitor.metrics import Metrics
from monitor.settings import CameraSettings
from monitor.sources import Source
from monitor.synthetic import SyntheticFeed, synthetic_frames
from tests.conftest import CLIP, TEST_LABELS, wait_until

IMGSZ = 320
#: Thresholds for the test weights, which score people on this clip at 0.3-0.6.
PEOPLE = {
    "track": ["person"],
    "filters": {"person": {"min_score": 0.3, "threshold": 0.35}},
    "tracker": {"high_threshold": 0.35, "activation_threshold": 0.35},
}
REPORT_KEYS = {"machine", "config", "pipeline", "stages", "latency", "naive", "ratios", "units"}
PERCENTILE_KEYS = {"count", "mean", "p50", "p95", "p99", "max"}


def run_bench(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code = main(["bench", *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report: dict = json.loads(out)
    return report


@pytest.fixture(scope="module")
def fast_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test clip re-encoded at 30 fps, so a stream can ask for more than the original 10."""
    path = tmp_path_factory.mktemp("clip") / "walkway-30fps.mp4"
    source = cv2.VideoCapture(str(CLIP))
    writer = None
    try:
        while True:
            ok, image = source.read()
            if not ok:
                break
            if writer is None:
                height, width = image.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (width, height))
                assert writer.isOpened(), "OpenCV cannot write mp4v"
            writer.write(image)
    finally:
        source.release()
        if writer is not None:
            writer.release()
    return path


def test_bench_reports_pipeline_stages_and_naive_baseline(weights, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(weights), "imgsz": IMGSZ, "device": "cpu", "labels": TEST_LABELS},
                "detect": {"max_batch": 8},
                "objects": PEOPLE,
            }
        )
    )
    report = run_bench(
        capsys,
        "--config", str(config),
        "--streams", "2",
        "--fps", "5",
        "--duration", "10",
        "--warmup", "2",
        "--compare-naive",
        "--naive-frames", "16",
    )  # fmt: skip

    assert set(report) == REPORT_KEYS
    machine, config_, pipeline = report["machine"], report["config"], report["pipeline"]
    assert machine["cpu_cores"] >= 1
    assert machine["torch"]
    assert machine["ultralytics"]
    assert machine["gpu"] is None
    assert config_["mode"] == "file"
    assert config_["clip"] == str(CLIP)
    assert (config_["streams"], config_["imgsz"], config_["device"], config_["max_batch"]) == (
        2,
        IMGSZ,
        "cpu",
        8,
    )
    assert (config_["width"], config_["height"]) == (768, 576)
    assert config_["decoder"] == "auto"

    assert [s["name"] for s in pipeline["streams"]] == ["stream-000", "stream-001"]
    for stream in pipeline["streams"]:
        assert stream["processed"] > 0, stream
        assert stream["delivered"] > 0, stream
        assert stream["state"] == "online"
    assert pipeline["processed"] == sum(s["processed"] for s in pipeline["streams"])
    assert pipeline["processed_fps"] > 0
    assert pipeline["offered_fps"] > 0
    assert pipeline["requested_fps"] == 10
    assert 0 <= pipeline["drop_pct"] <= 100
    assert pipeline["batch_size"]["count"] > 0
    assert 1 <= pipeline["batch_size"]["mean"] <= 8
    assert set(pipeline["events"]) == {"new", "update", "end", "suppressed"}
    assert pipeline["cpu"]["cores_used"] > 0
    assert pipeline["cpu"]["processes"] >= 3  # this process, the forkserver, two decoders
    assert pipeline["gpu"] == {
        "utilization_pct": None,
        "utilization_error": None,
        "max_memory_allocated_mib": None,
    }

    assert set(report["stages"]) == set(STAGES) - {"classify"}  # no classifier here
    for name, stats in report["stages"].items():
        assert set(stats) == PERCENTILE_KEYS
        assert stats["count"] > 0, name
        assert 0 <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"], name
    assert set(report["latency"]) == {"capture_to_detections", "capture_to_alerts"}
    detect = report["latency"]["capture_to_detections"]
    assert detect["count"] == pipeline["processed"]
    assert 0 < detect["p50"] <= detect["p99"] <= report["latency"]["capture_to_alerts"]["max"]

    naive = report["naive"]
    assert (naive["frames"], naive["batch"]) == (16, 8)
    # On the CPU the OpenVINO per-frame loop is the second baseline (the target).
    for key in (
        "ultralytics_per_frame_fps",
        "ultralytics_batched_fps",
        "detector_fps",
        "openvino_per_frame_fps",
    ):
        assert naive[key] > 0, key
    ratios = report["ratios"]
    for key in (
        "detector_vs_ultralytics_per_frame",
        "detector_vs_ultralytics_batched",
        "pipeline_vs_ultralytics_per_frame",
        "pipeline_vs_ultralytics_batched",
        "detector_vs_openvino_per_frame",
    ):
        assert ratios[key] > 0, key
    assert ratios["pipeline_saturated"] == pipeline["saturated"]


def test_slow_camera_gets_its_frames_next_to_a_camera_ten_times_faster_under_overload(
    weights, fast_clip, capsys
):
    report = run_bench(
        capsys,
        "--model", str(weights),
        "--label", "Normal=person",
        "--label", "Fall=person",
        "--imgsz", str(IMGSZ),  # torch at 320 on 2 cores: ~20 frames/s, below the 33 offered
        "--device", "cpu",
        "--backend", "torch",
        "--clip", str(fast_clip),
        "--streams", "2",
        "--fps", "30", "3",
        "--max-batch", "1",
        "--duration", "8",
        "--warmup", "1",
    )  # fmt: skip

    fast, slow = report["pipeline"]["streams"]
    assert (fast["fps"], slow["fps"]) == (30, 3)
    assert fast["dropped"] > 0, "the test needs an overloaded detector"
    assert slow["delivered"] >= 10, slow
    assert slow["processed"] >= 0.8 * slow["delivered"], (slow, fast)


def test_the_bench_stand_in_keeps_one_frame_per_slot_whatever_the_loop_holds():
    # The bench's stand-ins choose a frame by slot, so each slot keeps its pre-made frame and
    # none is written after the first round, even when the loop's holds shift which slot comes
    # next. Chosen by sequence number, a frame would be written again after each such shift.
    settings = CameraSettings(url="synthetic", detect={"width": 64, "height": 48})
    expected = synthetic_frames(64, 48, seed=11)
    feed = SyntheticFeed(64, 48, seed=11, keep_slots=True)
    checked = shifted = 0
    with Source("kept", settings, fps=200, metrics=Metrics(), feed=feed) as source:
        deadline = time.monotonic() + 30
        while checked < 40:
            assert time.monotonic() < deadline, f"only {checked} frames taken"
            if source.connection is not None:
                mpc.wait([source.connection], timeout=0.1)
            source.drain()
            ready = source._ready
            frame = source.take()
            if frame is None or ready is None:
                continue
            assert frame.seq == ready.seq
            assert np.array_equal(frame.image, expected[ready.slot % len(expected)])
            shifted += not np.array_equal(frame.image, expected[frame.seq % len(expected)])
            if checked % 3 == 0:  # a long hold: the child goes round and passes over this slot
                newest, later = source._slots.latest_seq, frame.seq + 6
                wait_until(lambda: newest.value >= later, 5, "the child going on", 0.005)  # noqa: B023
            frame.release()
            checked += 1
    assert shifted > 0, "the holds never shifted the slots' rotation: the test proved nothing"


def test_the_window_starts_once_a_pass_over_the_pipes_is_quick(monkeypatch):
    # After a stalled warm-up the first pass parses seconds of backlog; what the children send
    # meanwhile was offered before the window, so the window starts after a quick pass.
    from monitor.bench import run as bench_run

    class Clock:  # the bench's clock, moved on by the work the drains do
        now = 100.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(bench_run, "time", clock)

    class Backlogged:
        def __init__(self, slow_passes: int) -> None:
            self.slow_passes, self.drained = slow_passes, []

        def drain(self) -> None:
            if self.slow_passes:  # parsing a backlog
                self.slow_passes -= 1
                clock.now += 2 * bench_run.CATCH_UP_PASS
            clock.now += bench_run.CATCH_UP_PASS / 10
            self.drained.append(clock.now)

    sources = [Backlogged(2), Backlogged(0)]
    started = bench_run._catch_up(sources)  # type: ignore[arg-type]
    assert len(sources[0].drained) == len(sources[1].drained) == 3  # two slow passes, then a quick one
    assert started == max(t for s in sources for t in s.drained)


def test_synthetic_stream_hands_frames_over_through_shared_memory_and_counts_replaced_ones():
    # A stand-in decoder child writes pre-made frames into the camera's slots on a clock:
    # what the loop takes is exactly the frame of that sequence number, read from the slot.
    metrics = Metrics()
    settings = CameraSettings(url="synthetic", detect={"width": 64, "height": 48})
    expected = synthetic_frames(64, 48, seed=7)

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"camera": "synth"}) or 0.0

    feed = SyntheticFeed(64, 48, seed=7)
    with Source("synth", settings, fps=50, metrics=metrics, feed=feed) as source:

        def new_frame() -> bool:
            source.drain()
            return source.has_new_frame()

        wait_until(new_frame, 30, "the first frame from the stand-in child", interval=0.01)
        assert source.state is CameraState.ONLINE
        first = source.take()
        assert first is not None
        assert np.array_equal(first.image, expected[first.seq % len(expected)])
        assert source.take() is None  # taken: nothing new until the child sends the next
        # Two more frames since the one taken: the first of them is replaced by the second.
        wait_until(lambda: new_frame() and source._ready.seq >= first.seq + 2, 5, "two more frames", 0.01)
        second = source.take()
        assert second is not None
        assert second.seq > first.seq + 1  # several arrived: the newest wins
        assert np.array_equal(second.image, expected[second.seq % len(expected)])
        delivered = sample("monitor_camera_frames_total")

    assert delivered >= second.seq + 1
    assert sample("monitor_camera_frames_dropped_total") == second.seq - first.seq - 1


def test_synthetic_bench_goes_through_stand_in_decoders_and_reports_per_process_cpu(weights, capsys):
    report = run_bench(
        capsys,
        "--model", str(weights),
        "--imgsz", "32",
        "--device", "cpu",
        "--backend", "torch",
        "--synthetic",
        "--width", "320", "--height", "240",
        "--streams", "3",
        "--fps", "10",
        "--duration", "2",
        "--warmup", "1",
    )  # fmt: skip
    assert report["config"]["mode"] == "synthetic"
    assert report["config"]["decoder"] == "synthetic"
    pipeline = report["pipeline"]
    # The frames came from child processes through shared memory: the main process, the
    # forkserver and one stand-in child per stream are measured, the children apart. (Their
    # CPU may read 0: a stand-in rewrites no slot that holds its frame already, and the
    # kernel counts CPU in 10 ms ticks per process.)
    cpu = pipeline["cpu"]
    assert cpu["processes"] >= 1 + 1 + 3, cpu
    assert cpu["decoders_cores_used"] >= 0, cpu
    assert cpu["main_cores_used"] > 0, cpu
    assert pipeline["delivered"] > 0
    assert 0 < pipeline["processed"] <= pipeline["delivered"]
    assert [s["delivered"] > 0 for s in pipeline["streams"]] == [True, True, True]


def test_null_runtime_replays_the_models_detections_through_the_real_hand_off(weights, tmp_path, capsys):
    """``--runtime null``: recorded detections of real people drive tracking and the rules, no inference."""
    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(weights), "imgsz": IMGSZ, "device": "cpu", "labels": TEST_LABELS},
                "detect": {"max_batch": 16},
                "objects": {**PEOPLE, "max_disappeared": 0.5},
            }
        )
    )
    report = run_bench(
        capsys,
        "--config", str(config),
        "--runtime", "null",
        "--replay-detections", str(CLIP),
        "--synthetic",
        "--width", "640", "--height", "360",
        "--streams", "3",
        "--fps", "10",
        "--duration", "6",
        "--warmup", "1",
        "--workers", "1",
    )  # fmt: skip
    config_, pipeline, stages = report["config"], report["pipeline"], report["stages"]
    assert (config_["runtime"], config_["replayed_from"], config_["mode"]) == ("null", str(CLIP), "synthetic")
    assert config_["workers"] == 1
    # No inference ran in the window; the frames' letterboxes (made by the stand-in children)
    # were packed into a batch, as the detector does before the network.
    assert stages["inference"]["max"] == 0
    assert stages["preprocess"]["max"] > 0
    # ...and they are people walking: tracks were confirmed and ended by the real rules.
    assert pipeline["events"]["new"] > 0
    assert stages["tracking"]["count"] == pipeline["processed"]
    # Through shared memory: the main process, the forkserver, one stand-in per stream and the
    # tracking worker, with CPU per processed frame reported for the main process, the
    # children and the worker apart.
    cpu = pipeline["cpu"]
    assert cpu["processes"] >= 1 + 1 + 3 + 1, cpu
    assert cpu["main_ms_per_frame"] > 0, cpu
    assert cpu["decoders_ms_per_frame"] >= 0, cpu  # stand-ins cost next to nothing (see above)
    assert cpu["workers_ms_per_frame"] > 0, cpu  # the worker tracked (the main process did not)
    window_frames = pipeline["processed"]
    assert cpu["main_ms_per_frame"] == pytest.approx(
        1000 * cpu["main_cores_used"] * pipeline["window_s"] / window_frames
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--runtime", "null"], "the null runtime needs a video file"),
        (["--replay-detections", str(CLIP)], "replay_detections: only with runtime null"),
    ],
)
def test_null_runtime_options_are_checked(weights, capsys, args, problem):
    code = main(["bench", "--model", str(weights), *args, "--json"])
    assert code == 2
    assert problem in capsys.readouterr().err
