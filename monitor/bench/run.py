"""``run_bench``: the daemon's stages under a fixed load, measured in a window after a warm-up."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from monitor.bench.load import (
    ARCHITECTURE_SUFFIXES,
    DEFAULT_CLIP,
    SYNTHETIC_SIZE,
    bench_settings,
    clip_frames,
    clip_size,
    decoded_size,
    random_init_weights,
)
from monitor.bench.loop import STAGES, BenchLoop, Recorder, sample_gpu
from monitor.bench.machine import check_shared_memory, cpu_usage, loadavg, machine_info, process_tree_cpu
from monitor.bench.naive import compare_naive
from monitor.bench.options import BenchOptions
from monitor.bench.replayed import ReplayedDetector, record_detections
from monitor.bench.report import (
    BatchStats,
    BenchConfig,
    BenchReport,
    CpuUsage,
    GpuUsage,
    Machine,
    Percentiles,
    PipelineResult,
    Ratios,
    StreamResult,
)
from monitor.classifier import Classifier, load_classifier
from monitor.decoder import RecordTarget
from monitor.detector import Detector
from monitor.errors import ConfigError
from monitor.loop import settled_heap
from monitor.metrics import Metrics
from monitor.recorder import Recorder as ClipRecorder
from monitor.settings import Settings
from monitor.sources import Source
from monitor.synthetic import SyntheticFeed, synthetic_frames
from monitor.workers import TrackingWorkers

logger = logging.getLogger(__name__)

#: Most seconds every stream gets to deliver its first frame before the warm-up starts.
STREAM_START_TIMEOUT = 120.0
#: Seconds between two reads of the GPU's utilisation (NVML averages over its own window).
GPU_SAMPLE_INTERVAL = 1.0
#: Seconds between two refreshes of the progress bar's numbers.
PROGRESS_INTERVAL = 0.5
#: The window starts once a pass over every pipe takes under this many seconds (``_catch_up``)...
CATCH_UP_PASS = 0.01
#: ... or after this many passes.
CATCH_UP_PASSES = 20
#: A drop rate at or above this (percent) means the detector was behind: the pipeline was saturated.
#: (A few frames are lost to timing jitter even when it keeps up.)
SATURATED_DROP_PCT = 5.0
EVENT_TYPES = ("new", "update", "end")


def run_bench(base: Settings, options: BenchOptions) -> BenchReport:
    """Run the load through the pipeline, then (optionally) the naive comparison.

    Args:
        base: Settings for the model, ``detect`` and ``objects``; its cameras are replaced.
        options: The load.

    Raises:
        ConfigError: Invalid options.
        SourceError: The clip cannot be read, or shared memory is too small.
        DetectorError: The model cannot be built or loaded.
    """
    machine = machine_info()
    # Ultralytics' select_device (run by an export, or by YOLO.predict) sets torch's thread
    # count process-wide to min(8, cores - 1); every stage here runs with the starting count.
    threads = torch.get_num_threads()
    clip: Path | None = None
    if options.synthetic:
        size: tuple[int, int] | None = (
            (options.width, options.height)
            if options.width is not None and options.height is not None
            else SYNTHETIC_SIZE
        )
    else:
        clip = options.clip or DEFAULT_CLIP
        if not clip.is_file():
            what = "--clip" if options.clip else f"no --clip given and the test clip {DEFAULT_CLIP}"
            raise ConfigError([f"{what}: {clip} is not a file"])
        size = (options.width, options.height) if options.width and options.height else None
    settings = bench_settings(base, options, "synthetic" if clip is None else str(clip), size)
    check_shared_memory(settings)
    if size is None and clip is not None:
        size = decoded_size(*clip_size(clip))
    frame_size = size if size is not None else SYNTHETIC_SIZE
    model_path = base.model.path
    random_init = model_path.suffix.lower() in ARCHITECTURE_SUFFIXES

    with ExitStack() as stack:
        if random_init:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monitor-bench-")))
            weights = random_init_weights(str(model_path), directory)
            settings = settings.model_copy(
                update={"model": settings.model.model_copy(update={"path": weights})}
            )
        detector = Detector(settings.model, settings.detect.max_batch)
        torch.set_num_threads(threads)
        detector.warmup(frame_size[1], frame_size[0])
        classifier = load_classifier(settings)
        torch.set_num_threads(threads)
        if detector.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(detector.device)
        replayed: ReplayedDetector | None = None
        if options.runtime == "null":
            assert options.replay_detections is not None  # BenchOptions checks it
            fps = max(options.fps)
            recorded = record_detections(detector, options.replay_detections, fps, settings.detect.max_batch)
            replayed = ReplayedDetector(recorded)
        pool = synthetic_frames(*frame_size) if options.synthetic else []
        metrics = Metrics()
        recorder = Recorder()
        clips: ClipRecorder | None = None
        if options.record:  # segments into a folder of their own, deleted afterwards (the ring)
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="monitor-bench-rec-")))
            record = settings.record.model_copy(update={"path": folder})
            settings = settings.model_copy(update={"record": record})
            clips = stack.enter_context(ClipRecorder(folder, metrics))

        def record_of(name: str) -> RecordTarget | None:
            record = settings.record_for(name)
            return clips.add_camera(name, record) if clips is not None and record is not None else None

        with ExitStack() as streams:
            workers = None
            if settings.detect.workers:  # before the streams: their frames would wait meanwhile
                restarts = metrics.tracker_restarts.inc
                workers = streams.enter_context(TrackingWorkers(settings.detect.workers, restarts))
            # Synthetic streams: stand-in children write pre-made frames into the same
            # shared-memory slots on the same clock, so the hand-off is the cameras' own.
            # Each slot keeps its frame: a stand-in that rewrote frames would take CPU from
            # the main process it is there to measure.
            feeds = {
                name: SyntheticFeed(
                    *frame_size, phase=i / options.streams / settings.camera_fps(name), keep_slots=True
                )
                for i, name in enumerate(settings.cameras)
            }
            sources = [
                streams.enter_context(
                    Source(
                        name,
                        camera,
                        settings.camera_fps(name),
                        metrics,
                        feed=feeds[name] if options.synthetic else None,
                        record=record_of(name),
                        on_recording=clips.on_recording if clips is not None else None,
                        net=detector.net_input,
                    )
                )
                for name, camera in settings.cameras.items()
            ]
            window, cpu = _run_window(
                settings, options, sources, detector, metrics, recorder, classifier, replayed, workers
            )
            states = {s.name: s.state.value for s in sources}
        pipeline = _pipeline_result(settings, metrics, recorder, window, cpu, states, detector)
        naive = None
        if options.compare_naive:
            if clip is not None:
                frames = clip_frames(clip, options.naive_frames, size)
            else:
                frames = [pool[i % len(pool)] for i in range(options.naive_frames)]
            naive = compare_naive(detector, frames, settings.detect.max_batch)
    machine = _with_loadavg_end(machine)
    config = BenchConfig(
        mode="synthetic" if options.synthetic else "file",
        clip=str(clip) if clip is not None else None,
        streams=options.streams,
        fps=list(options.fps),
        width=frame_size[0],
        height=frame_size[1],
        model=str(model_path),
        random_init=random_init,
        model_id=detector.label,
        imgsz=settings.model.imgsz,
        device=str(detector.device),
        runtime=detector.runtime if replayed is None else "null",
        replayed_from=str(options.replay_detections) if replayed is not None else None,
        torch_threads=threads,
        half=detector.half,
        max_batch=settings.detect.max_batch,
        workers=settings.detect.workers,
        conf=settings.model.conf,
        decoder="synthetic" if options.synthetic else options.decoder + (" + record" * options.record),
        duration_s=options.duration,
        warmup_s=options.warmup,
        naive_frames=options.naive_frames if options.compare_naive else None,
        classifier=classifier.label if classifier is not None else None,
        classifier_imgsz=classifier.imgsz if classifier is not None else None,
    )
    ratios = None
    if naive is not None:
        ratios = Ratios(
            detector_vs_ultralytics_per_frame=naive.detector_fps / naive.ultralytics_per_frame_fps,
            detector_vs_ultralytics_batched=naive.detector_fps / naive.ultralytics_batched_fps,
            pipeline_vs_ultralytics_per_frame=pipeline.processed_fps / naive.ultralytics_per_frame_fps,
            pipeline_vs_ultralytics_batched=pipeline.processed_fps / naive.ultralytics_batched_fps,
            pipeline_saturated=pipeline.saturated,
            detector_vs_openvino_per_frame=(
                naive.detector_fps / naive.openvino_per_frame_fps if naive.openvino_per_frame_fps else None
            ),
        )
    return BenchReport(
        machine=machine,
        config=config,
        pipeline=pipeline,
        stages={  # classify only where a classifier ran
            s: Percentiles.of(recorder.stages[s]) for s in STAGES if s != "classify" or classifier is not None
        },
        latency={
            "capture_to_detections": Percentiles.of(recorder.to_detections),
            "capture_to_alerts": Percentiles.of(recorder.to_alerts),
        },
        naive=naive,
        ratios=ratios,
    )


def _with_loadavg_end(machine: Machine) -> Machine:
    return Machine(**{**asdict(machine), "loadavg_end": loadavg()})


_COUNTERS = (
    "monitor_camera_frames_total",
    "monitor_camera_frames_processed_total",
    "monitor_camera_frames_dropped_total",
    "monitor_camera_reconnects_total",
)


def _snapshot(metrics: Metrics, cameras: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each camera's counters, in one pass over the registry.

    One pass: ``get_sample_value`` collects every series per call, which for 64
    cameras takes seconds, while the children's messages pile up in the pipes.
    """
    counts = {name: dict.fromkeys(_COUNTERS, 0.0) for name in cameras}
    for family in metrics.registry.collect():
        for sample in family.samples:
            camera = sample.labels.get("camera")
            if sample.name in _COUNTERS and camera in counts:
                counts[camera][sample.name] = sample.value
    return counts


def _catch_up(sources: Sequence[Source]) -> float:
    """Read every pipe until a pass over them is quick; the time that pass ended: the window's start.

    What the children send during a pass is counted in the window, though offered
    before it. After a stalled warm-up (a garbage collection, a starved main process)
    the first pass parses seconds of backlog, so it is repeated until one takes under
    ``CATCH_UP_PASS`` seconds.
    """
    for _ in range(CATCH_UP_PASSES):
        began = time.monotonic()
        for source in sources:
            source.drain()
        ended = time.monotonic()
        if ended - began < CATCH_UP_PASS:
            break
    return ended


@dataclass(frozen=True, slots=True)
class _Window:
    seconds: float
    start: dict[str, dict[str, float]]
    end: dict[str, dict[str, float]]


def _run_window(
    settings: Settings,
    options: BenchOptions,
    sources: list[Source],
    detector: Detector,
    metrics: Metrics,
    recorder: Recorder,
    classifier: Classifier | None,
    replayed: ReplayedDetector | None = None,
    workers: TrackingWorkers | None = None,
) -> tuple[_Window, CpuUsage]:
    """Wait for every stream's first frame, warm up, then measure for ``options.duration``.

    The loop runs with the startup objects frozen, as the daemon's does (``settled_heap``).
    """
    from tqdm import tqdm

    with settled_heap():
        loop = BenchLoop(settings, sources, detector, metrics, recorder, classifier, replayed, workers)
        names = [s.name for s in sources]
        deadline = time.monotonic() + STREAM_START_TIMEOUT
        # Asked of the sources, not of the registry: a slow loop here would let a backlog of
        # frame messages pile up in the pipes and spill into the measured window.
        while time.monotonic() < deadline:
            if all(s.delivered for s in sources):
                break
            loop.step()
        else:
            silent = [s.name for s in sources if not s.delivered]
            logger.warning(
                "%d stream(s) delivered no frame in %.0f s: %s", len(silent), STREAM_START_TIMEOUT, silent
            )
        warm_until = time.monotonic() + options.warmup
        while time.monotonic() < warm_until:
            loop.step()

        # The processes' CPU first: psutil walks every process, which on a busy machine takes
        # long enough for frame messages to pile up in the pipes. Those, and any left from the
        # warm-up, were offered before the window: they are read before it starts.
        cpu_start = process_tree_cpu()
        started = _catch_up(sources)
        start_counts = _snapshot(metrics, names)  # the counters as the last pass left them
        recorder.on = True
        ends = started + options.duration
        next_gpu = started
        next_progress = started
        disable = None if options.progress is None else not options.progress
        with tqdm(
            total=round(options.duration),
            unit="s",
            desc="bench",
            disable=disable,
            file=sys.stderr,
            leave=False,
        ) as bar:
            while (now := time.monotonic()) < ends:
                loop.step()
                if detector.device.type == "cuda" and recorder.gpu_error is None and now >= next_gpu:
                    next_gpu = now + GPU_SAMPLE_INTERVAL
                    sample_gpu(detector.device, recorder)
                if now >= next_progress:
                    next_progress = now + PROGRESS_INTERVAL
                    # The recorder's own count: reading the registry collects every series, which
                    # with many cameras would cost the main process more than the frames do.
                    processed = len(recorder.to_detections)
                    bar.n = min(round(now - started), bar.total)
                    bar.set_postfix(fps=f"{processed / max(now - started, 1e-9):.1f}")
        seconds = time.monotonic() - started
        recorder.on = False
        end_counts = _snapshot(metrics, names)
        cpu = cpu_usage(cpu_start, process_tree_cpu(), seconds, workers.pids() if workers is not None else ())
        return _Window(seconds, start_counts, end_counts), cpu


def _per_frame(cpu: CpuUsage, seconds: float, processed: int) -> CpuUsage:
    """``cpu`` with its main-process and decoder milliseconds per processed frame."""
    if not processed:
        return cpu

    def ms(cores: float | None) -> float | None:
        return None if cores is None else 1000 * cores * seconds / processed

    return replace(
        cpu,
        main_ms_per_frame=ms(cpu.main_cores_used),
        decoders_ms_per_frame=ms(cpu.decoders_cores_used),
        workers_ms_per_frame=ms(cpu.workers_cores_used),
    )


def _pipeline_result(
    settings: Settings,
    metrics: Metrics,
    recorder: Recorder,
    window: _Window,
    cpu: CpuUsage,
    states: dict[str, str],
    detector: Detector,
) -> PipelineResult:
    seconds = window.seconds
    streams = []
    for name in settings.cameras:
        start, end = window.start[name], window.end[name]
        delivered, processed, dropped, reconnects = (int(end[c] - start[c]) for c in _COUNTERS)
        streams.append(
            StreamResult(
                name=name,
                fps=settings.camera_fps(name),
                delivered=delivered,
                processed=processed,
                dropped=dropped,
                drop_pct=_pct(dropped, delivered),
                processed_fps=processed / seconds,
                reconnects=reconnects,
                state=states[name],
            )
        )
    delivered = sum(s.delivered for s in streams)
    processed = sum(s.processed for s in streams)
    dropped = sum(s.dropped for s in streams)
    batches = recorder.batches
    gpu = GpuUsage(None, None, None)
    if detector.device.type == "cuda":
        gpu = GpuUsage(
            utilization_pct=float(np.mean(recorder.gpu_samples)) if recorder.gpu_samples else None,
            utilization_error=recorder.gpu_error,
            max_memory_allocated_mib=torch.cuda.max_memory_allocated(detector.device) / 2**20,
        )
    return PipelineResult(
        window_s=seconds,
        requested_fps=sum(settings.camera_fps(n) for n in settings.cameras),
        offered_fps=delivered / seconds,
        processed_fps=processed / seconds,
        processed_fps_per_stream=processed / seconds / len(streams),
        delivered=delivered,
        processed=processed,
        dropped=dropped,
        drop_pct=_pct(dropped, delivered),
        saturated=_pct(dropped, delivered) >= SATURATED_DROP_PCT,
        batch_size=BatchStats(
            count=len(batches),
            mean=float(np.mean(batches)) if batches else None,
            p95=float(np.percentile(batches, 95)) if batches else None,
            max=max(batches) if batches else None,
        ),
        events={t: recorder.events[t] for t in (*EVENT_TYPES, "suppressed")},
        crops_classified=recorder.crops,
        cpu=_per_frame(cpu, seconds, processed),
        gpu=gpu,
        streams=streams,
    )


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0
