"""``monitor bench``: the daemon's pipeline under a fixed load, measured, and a naive baseline.

The load is N streams at a fixed rate each, for ``duration`` seconds after a
warm-up:

* file streams: a clip played in real time and looped by the real ``Source``
  decoder children (one process each, shared memory, newest frame wins), so
  the numbers include decoding and the copy out of shared memory;
* ``synthetic`` streams: random frames made in-process on a fixed clock, no
  decoders, for the detector and the loop alone (on a GPU box with few cores).

Frames then go through the daemon's own stages: ``Scheduler.pick`` (oldest
first, at most ``detect.max_batch``), one ``Detector.detect`` per batch, and
``CameraPipeline.process`` per frame (ByteTrack and the alert rules). Events
are counted, not published: there is no broker, spool or HTTP server here.

``compare_naive`` then runs, on the same frames (decoded once in-process,
scaled like the streams), Ultralytics' own loop: ``YOLO.predict`` per frame,
``YOLO.predict`` on lists of ``max_batch`` frames, and ``Detector.detect`` on
the same lists. Those are detector-only rates; the pipeline's rate is end to
end and is bounded by the offered rate unless frames were dropped.

A model given as an architecture (``yolov8s.yaml``) gets random weights, saved
once to a temporary ``.pt`` that both the detector and Ultralytics load: the
compute per frame is that of the real model, but few boxes survive NMS, so
tracking and alerts cost less than on trained weights.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing.connection as mpc
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from monitor.alerts import Alert
from monitor.camera import CameraPipeline
from monitor.decoder import MAX_NATIVE, SLOTS, frame_bytes
from monitor.detector import Detector
from monitor.errors import ConfigError, DetectorError, SourceError
from monitor.frames import CameraState, Frame
from monitor.metrics import Metrics
from monitor.runtime import exported_model
from monitor.scheduler import Scheduler
from monitor.settings import CameraDetectSettings, CameraSettings, DetectSettings, Settings
from monitor.sources import Source

logger = logging.getLogger(__name__)

#: The test clip, used when no --clip is given (a source checkout).
DEFAULT_CLIP = Path(__file__).resolve().parent.parent / "tests" / "data" / "vtest.mp4"
#: Frame size of synthetic streams when none is given.
SYNTHETIC_SIZE = (1280, 720)
#: Distinct random frames per synthetic size (making one per delivery would cost more than detecting it).
SYNTHETIC_POOL = 8
#: Longest the loop sleeps without a frame, as the daemon's ``LOOP_TICK``.
LOOP_TICK = 0.2
#: Most seconds every stream gets to deliver its first frame before the warm-up starts.
STREAM_START_TIMEOUT = 120.0
#: Seconds between two reads of the GPU's utilisation (NVML averages over its own window).
GPU_SAMPLE_INTERVAL = 1.0
#: Seconds between two refreshes of the progress bar's numbers.
PROGRESS_INTERVAL = 0.5
#: A drop rate at or above this (percent) means the detector was behind: the pipeline was saturated.
#: (A few frames are lost to timing jitter even when it keeps up.)
SATURATED_DROP_PCT = 5.0
#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")
#: Prefix of the (never published) snapshot topics.
BENCH_PREFIX = "bench"
STAGES = ("preprocess", "inference", "postprocess", "tracking", "alerts")
EVENT_TYPES = ("new", "update", "end")
ARCHITECTURE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """What load to run.

    Attributes:
        streams: Number of cameras.
        fps: Detect fps per stream; a list is cycled over the streams (``(20, 2)``: 20, 2, 20...).
        clip: Video played by every file stream (default ``DEFAULT_CLIP``).
        synthetic: Random frames made in-process instead of decoder children.
        width: Frames are scaled to this width (with ``height``); default: the clip's size.
        height: See ``width``.
        max_batch: ``detect.max_batch`` (default: the settings').
        decoder: Every file stream's ``decoder`` (``auto``, ``cpu``, ``nvdec``).
        duration: Seconds measured.
        warmup: Seconds run before measuring (after every stream delivered a frame).
        compare_naive: Also time Ultralytics' own predict loop on the same frames.
        naive_frames: Frames in that comparison.
        progress: Show a progress bar on stderr; None: only when stderr is a terminal.
    """

    streams: int = 4
    fps: tuple[float, ...] = (15.0,)
    clip: Path | None = None
    synthetic: bool = False
    width: int | None = None
    height: int | None = None
    max_batch: int | None = None
    decoder: str = "auto"
    duration: float = 30.0
    warmup: float = 5.0
    compare_naive: bool = False
    naive_frames: int = 200
    progress: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.streams < 1:
            problems.append(f"streams: must be >= 1, got {self.streams}")
        if not self.fps or any(not 0 < f <= 120 for f in self.fps):
            problems.append(f"fps: each must be in (0, 120], got {list(self.fps)}")
        if (self.width is None) != (self.height is None):
            problems.append(f"width/height: give both or neither, got {self.width}x{self.height}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value is not None and value < 16:
                problems.append(f"{name}: must be >= 16, got {value}")
        if self.decoder not in ("auto", "cpu", "nvdec"):
            problems.append(f"decoder: must be auto, cpu or nvdec, got {self.decoder!r}")
        if self.max_batch is not None and self.max_batch < 1:
            problems.append(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.duration <= 0:
            problems.append(f"duration: must be > 0 seconds, got {self.duration}")
        if self.warmup < 0:
            problems.append(f"warmup: must be >= 0 seconds, got {self.warmup}")
        if self.naive_frames < 1:
            problems.append(f"naive_frames: must be >= 1, got {self.naive_frames}")
        if problems:
            raise ConfigError(problems)

    def fps_of(self, index: int) -> float:
        """The detect fps of stream ``index``."""
        return self.fps[index % len(self.fps)]


# -- the report ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Percentiles:
    """A distribution of durations, in milliseconds (None when nothing was measured)."""

    count: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        """Summarise durations given in seconds."""
        if not seconds:
            return cls(0, None, None, None, None, None)
        ms = np.asarray(seconds, dtype=np.float64) * 1000
        p50, p95, p99 = (float(v) for v in np.percentile(ms, [50, 95, 99]))
        return cls(len(ms), float(ms.mean()), p50, p95, p99, float(ms.max()))


@dataclass(frozen=True, slots=True)
class Machine:
    """Where the numbers were measured."""

    cpu_model: str
    cpu_cores: int
    memory_gib: float | None
    gpu: str | None
    gpu_memory_gib: float | None
    cuda: str | None
    python: str
    torch: str
    ultralytics: str
    opencv: str
    platform: str
    loadavg_start: list[float] | None
    loadavg_end: list[float] | None = None


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """The load and the model, as run."""

    mode: str
    clip: str | None
    streams: int
    fps: list[float]
    width: int
    height: int
    model: str
    random_init: bool
    model_id: str
    imgsz: int
    device: str
    runtime: str
    torch_threads: int
    half: bool
    max_batch: int
    conf: float
    decoder: str
    duration_s: float
    warmup_s: float
    naive_frames: int | None


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One stream over the measured window."""

    name: str
    fps: float
    delivered: int
    processed: int
    dropped: int
    drop_pct: float
    processed_fps: float
    reconnects: int
    state: str


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Frames per forward pass."""

    count: int
    mean: float | None
    p95: float | None
    max: int | None


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU time of this process and every descendant (decoders, the forkserver) over the window.

    ``cores_used`` is CPU seconds per wall second (2.0: two cores busy).
    """

    cores_used: float | None
    percent_of_machine: float | None
    main_cores_used: float | None
    decoders_cores_used: float | None
    processes: int


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """The GPU over the window (all None on the CPU)."""

    utilization_pct: float | None
    utilization_error: str | None
    max_memory_allocated_mib: float | None


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """End to end: decoders (or synthetic frames) -> scheduler -> detector -> tracking -> alerts."""

    window_s: float
    requested_fps: float
    offered_fps: float
    processed_fps: float
    processed_fps_per_stream: float
    delivered: int
    processed: int
    dropped: int
    drop_pct: float
    saturated: bool
    batch_size: BatchStats
    events: dict[str, int]
    cpu: CpuUsage
    gpu: GpuUsage
    streams: list[StreamResult]


@dataclass(frozen=True, slots=True)
class NaiveResult:
    """Detector-only rates on the same in-memory frames (no decoding, tracking or alerts)."""

    frames: int
    batch: int
    ultralytics_per_frame_fps: float
    ultralytics_batched_fps: float
    detector_fps: float
    #: On the CPU: Ultralytics predict per frame on the OpenVINO export (what a careful user writes).
    openvino_per_frame_fps: float | None = None


@dataclass(frozen=True, slots=True)
class Ratios:
    """Our rates divided by Ultralytics' (above 1: we are faster).

    ``detector_*``: ``Detector.detect`` against ``YOLO.predict`` on the same frames, the
    same batches. ``pipeline_*``: the end-to-end processed fps against the same naive
    rates; it is a capacity comparison only when the pipeline was saturated.
    """

    detector_vs_ultralytics_per_frame: float
    detector_vs_ultralytics_batched: float
    pipeline_vs_ultralytics_per_frame: float
    pipeline_vs_ultralytics_batched: float
    pipeline_saturated: bool
    detector_vs_openvino_per_frame: float | None = None


@dataclass(frozen=True, slots=True)
class BenchReport:
    """Everything ``monitor bench`` measured. Durations are milliseconds, rates frames per second."""

    machine: Machine
    config: BenchConfig
    pipeline: PipelineResult
    stages: dict[str, Percentiles]
    latency: dict[str, Percentiles]
    naive: NaiveResult | None
    ratios: Ratios | None
    units: dict[str, str] = field(
        default_factory=lambda: {"durations": "ms", "rates": "frames/s", "cpu": "cores"}
    )

    def to_json(self) -> str:
        """One JSON object with stable keys."""
        return json.dumps(asdict(self), indent=2)

    def text(self) -> str:
        """A human-readable summary."""
        m, c, p = self.machine, self.config, self.pipeline
        gpu = f"{m.gpu} ({m.gpu_memory_gib:.0f} GiB, CUDA {m.cuda})" if m.gpu else "no GPU"
        memory = f"{m.memory_gib:.0f} GiB" if m.memory_gib else "? GiB"
        load = " ".join(f"{v:.2f}" for v in m.loadavg_start or [])
        source = f"file streams ({c.clip})" if c.mode == "file" else "synthetic streams"
        fps = "/".join(f"{f:g}" for f in c.fps)
        lines = [
            f"machine: {m.cpu_model}, {m.cpu_cores} cores, {memory}, {gpu}; load average at start {load}",
            f"  python {m.python}, torch {m.torch}, ultralytics {m.ultralytics}, opencv {m.opencv}",
            f"config: {c.streams} {source}, {c.width}x{c.height} at {fps} fps each"
            + (f", decoder {c.decoder}" if c.mode == "file" else ""),
            f"  model {c.model}{' (random weights)' if c.random_init else ''} = {c.model_id}",
            f"  imgsz {c.imgsz}, {c.device}, {c.runtime}, {'fp16' if c.half else 'fp32'}, "
            f"{c.torch_threads} torch threads, max_batch {c.max_batch}",
            f"  {c.duration_s:g} s measured after {c.warmup_s:g} s of warm-up",
            "",
            "pipeline, end to end (decoders -> scheduler -> detector -> ByteTrack -> alert rules):",
            f"  offered   {p.offered_fps:8.1f} frames/s (requested {p.requested_fps:.1f})",
            f"  processed {p.processed_fps:8.1f} frames/s ({p.processed_fps_per_stream:.2f} per stream)",
            f"  dropped   {p.drop_pct:8.1f} % ({p.dropped} of {p.delivered} delivered)"
            + ("  -> saturated: processed fps is the capacity" if p.saturated else "  -> kept up"),
            f"  batch size mean {_fmt(p.batch_size.mean, '.2f')}, p95 {_fmt(p.batch_size.p95, '.0f')}, "
            f"max {p.batch_size.max} over {p.batch_size.count} batches",
            "  events " + ", ".join(f"{k} {v}" for k, v in p.events.items()),
            f"  CPU {_fmt(p.cpu.cores_used, '.2f')} cores ({_fmt(p.cpu.percent_of_machine, '.0f')} % of the "
            f"machine): main process {_fmt(p.cpu.main_cores_used, '.2f')}, decoders "
            f"{_fmt(p.cpu.decoders_cores_used, '.2f')} ({p.cpu.processes} processes)",
        ]
        if m.gpu:
            lines.append(
                f"  GPU utilisation {_fmt(p.gpu.utilization_pct, '.0f')} %"
                + (f" ({p.gpu.utilization_error})" if p.gpu.utilization_error else "")
                + f", peak memory allocated {_fmt(p.gpu.max_memory_allocated_mib, '.0f')} MiB"
            )
        lines += ["", f"{'ms':<28}{'p50':>9}{'p95':>9}{'p99':>9}{'count':>9}"]
        rows = [(f"stage {name}", stats) for name, stats in self.stages.items()]
        rows += [(name.replace("_", " "), stats) for name, stats in self.latency.items()]
        for name, stats in rows:
            lines.append(
                f"{name:<28}{_fmt(stats.p50, '9.1f')}{_fmt(stats.p95, '9.1f')}"
                f"{_fmt(stats.p99, '9.1f')}{stats.count:>9}"
            )
        if self.naive is not None and self.ratios is not None:
            n, r = self.naive, self.ratios
            lines += [
                "",
                f"detector only, {n.frames} frames in memory (no decoding, tracking or alerts):",
                *(
                    f"  {what:<48}{fps:8.1f} frames/s"
                    for what, fps in (
                        ("Ultralytics YOLO.predict, 1 frame per call", n.ultralytics_per_frame_fps),
                        (f"Ultralytics YOLO.predict, {n.batch} frames per call", n.ultralytics_batched_fps),
                        (f"monitor Detector.detect, {n.batch} frames per call", n.detector_fps),
                        *(
                            [("Ultralytics predict on OpenVINO, 1 frame per call", n.openvino_per_frame_fps)]
                            if n.openvino_per_frame_fps
                            else []
                        ),
                    )
                ),
                "ratios (ours / Ultralytics):",
                f"  detector only: {r.detector_vs_ultralytics_per_frame:.2f}x per-frame predict, "
                f"{r.detector_vs_ultralytics_batched:.2f}x batched predict"
                + (
                    f", {r.detector_vs_openvino_per_frame:.2f}x per-frame OpenVINO predict"
                    if r.detector_vs_openvino_per_frame
                    else ""
                ),
                f"  end-to-end pipeline fps: {r.pipeline_vs_ultralytics_per_frame:.2f}x per-frame predict, "
                f"{r.pipeline_vs_ultralytics_batched:.2f}x batched predict"
                + (
                    ""
                    if r.pipeline_saturated
                    else f" (not saturated: bounded by the offered {p.offered_fps:.1f} frames/s)"
                ),
            ]
        return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return f"{'n/a':>{width or 0}}"
    return format(value, spec)


# -- synthetic streams -------------------------------------------------------------------
class SyntheticSource(Source):
    """A camera whose frames are made in-process on a fixed clock: no decoder, no shared memory.

    Frames are due every ``1 / fps`` seconds from ``__enter__`` plus ``phase``; one
    not taken before the next is due is dropped, as with a decoder.

    Args:
        name: Camera name.
        settings: The camera's settings (the URL is not opened).
        fps: Frames per second.
        metrics: Receives the delivered and dropped counts.
        images: Frames handed out in turn (copied on ``take``, as from shared memory).
        phase: Seconds after the start of the first frame (spreads the streams' arrivals).
    """

    def __init__(
        self,
        name: str,
        settings: CameraSettings,
        fps: float,
        metrics: Metrics,
        images: list[np.ndarray],
        phase: float,
    ) -> None:
        super().__init__(name, settings, fps, metrics)
        self._images = images
        self._period = 1.0 / fps
        self._phase = phase
        self._start_mono = 0.0
        self._start_wall = 0.0
        self._due_seq = -1
        self._took_seq = -1
        self._delivered_counter = metrics.frames.labels(name)
        self._dropped_counter = metrics.frames_dropped.labels(name)

    def __enter__(self) -> SyntheticSource:
        self._start_mono, self._start_wall = time.monotonic(), time.time()
        self.state = CameraState.ONLINE
        return self

    def close(self) -> None:
        """Nothing to stop."""

    @property
    def connection(self) -> mpc.Connection | None:
        """None: nothing to wait on."""
        return None

    def drain(self) -> None:
        """Deliver the frames due by now (all but the newest are lost unless taken)."""
        seq = int((time.monotonic() - self._start_mono - self._phase) // self._period)
        if seq > self._due_seq:
            self._delivered_counter.inc(seq - self._due_seq)
            self._due_seq = seq

    def check(self, now: float) -> None:
        """Nothing to watch."""

    def next_arrival(self) -> float:
        """Monotonic time the next frame is due."""
        return self._start_mono + self._phase + (self._due_seq + 1) * self._period

    def has_new_frame(self) -> bool:
        """True when a due frame has not been taken."""
        return self._due_seq > self._took_seq

    def waiting_since(self) -> float:
        """Capture time of the waiting frame."""
        return self._capture_time(self._due_seq) if self.has_new_frame() else float("inf")

    def take(self, not_before: float | None = None) -> Frame | None:
        """A copy of the newest due frame, or None (dropped and counted when older than ``not_before``)."""
        if not self.has_new_frame():
            return None
        seq = self._due_seq
        if not_before is not None and self._capture_time(seq) < not_before:
            self._dropped_counter.inc(seq - self._took_seq)
            self._took_seq = seq
            return None
        if self._took_seq >= 0:
            self._dropped_counter.inc(seq - self._took_seq - 1)
        self._took_seq = seq
        image = self._images[seq % len(self._images)].copy()
        return Frame(self.name, seq, self._capture_time(seq), image)

    def _capture_time(self, seq: int) -> float:
        return self._start_wall + self._phase + seq * self._period


def synthetic_frames(width: int, height: int, count: int = SYNTHETIC_POOL, seed: int = 0) -> list[np.ndarray]:
    """``count`` random HxWx3 uint8 frames (fixed seed)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


# -- measurements ------------------------------------------------------------------------
@dataclass
class _Recorder:
    """Samples of the measured window (nothing is kept while ``on`` is False)."""

    on: bool = False
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    to_detections: list[float] = field(default_factory=list)
    to_alerts: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    gpu_samples: list[float] = field(default_factory=list)
    gpu_error: str | None = None


def process_tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and each live descendant, by pid.

    Read from ``/proc`` because decoders are children of the forkserver, not of
    this process, and ``getrusage(RUSAGE_CHILDREN)`` only counts reaped ones.
    Empty where there is no ``/proc``.
    """
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return {}
    for name in entries:
        try:
            text = Path("/proc", name, "stat").read_text()
        except OSError:
            continue  # exited while we looked
        fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
        pid = int(name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in cpu and pid not in tree:
            tree[pid] = cpu[pid]
            todo.extend(children.get(pid, []))
    return tree


def _cpu_usage(start: dict[int, float], end: dict[int, float], seconds: float) -> CpuUsage:
    if not end:
        return CpuUsage(None, None, None, None, 0)
    me = os.getpid()
    spent = {pid: cpu - start.get(pid, 0.0) for pid, cpu in end.items()}
    total = sum(spent.values()) / seconds
    cores = os.cpu_count() or 1
    main = spent.get(me, 0.0) / seconds
    return CpuUsage(total, 100 * total / cores, main, total - main, len(end))


def machine_info() -> Machine:
    """CPU, memory, GPU and library versions of this machine."""
    import cv2
    import ultralytics

    cpu_model = platform.processor() or platform.machine()
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass  # not Linux: keep platform's answer
    gpu = gpu_memory = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        gpu_memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return Machine(
        cpu_model=cpu_model,
        cpu_cores=os.cpu_count() or 1,
        memory_gib=memory,
        gpu=gpu,
        gpu_memory_gib=gpu_memory,
        cuda=torch.version.cuda if gpu else None,
        python=platform.python_version(),
        torch=torch.__version__,
        ultralytics=ultralytics.__version__,
        opencv=cv2.__version__,
        platform=platform.platform(),
        loadavg_start=_loadavg(),
    )


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# -- set-up --------------------------------------------------------------------------------
def bench_settings(base: Settings, options: BenchOptions, url: str, size: tuple[int, int] | None) -> Settings:
    """``base`` with its cameras replaced by the bench's streams (``stream-000``...).

    Raises:
        ConfigError: The options make an invalid camera.
    """
    width, height = size if size is not None else (None, None)
    try:
        cameras = {
            f"stream-{i:03d}": CameraSettings(
                url=url,
                detect=CameraDetectSettings(fps=options.fps_of(i), width=width, height=height),
                decoder=options.decoder,
            )
            for i in range(options.streams)
        }
        detect = base.detect
        if options.max_batch is not None:
            detect = DetectSettings.model_validate({**detect.model_dump(), "max_batch": options.max_batch})
    except ValidationError as exc:
        raise ConfigError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from exc
    return base.model_copy(update={"cameras": cameras, "detect": detect})


def clip_size(clip: Path) -> tuple[int, int]:
    """Width and height of a video's first frame.

    Raises:
        SourceError: It cannot be read as a video.
    """
    import cv2

    cap = cv2.VideoCapture(str(clip))
    try:
        ok, image = cap.read()
    finally:
        cap.release()
    if not ok or image is None:
        raise SourceError(f"{clip}: cannot read a frame (expected a video file OpenCV can decode)")
    return int(image.shape[1]), int(image.shape[0])


def decoded_size(width: int, height: int) -> tuple[int, int]:
    """The size a decoder hands out native frames at: capped at ``MAX_NATIVE`` pixels, aspect kept."""
    scale = min(1.0, (MAX_NATIVE[0] * MAX_NATIVE[1] / (width * height)) ** 0.5)
    return max(1, int(width * scale)), max(1, int(height * scale))


def clip_frames(clip: Path, count: int, size: tuple[int, int] | None) -> list[np.ndarray]:
    """The first ``count`` frames of ``clip`` (looped if shorter), scaled to ``size`` as the decoders do."""
    import cv2

    frames: list[np.ndarray] = []
    cap = cv2.VideoCapture(str(clip))
    try:
        while len(frames) < count:
            ok, image = cap.read()
            if not ok:
                if not frames:
                    raise SourceError(f"{clip}: no frame could be decoded")
                cap.release()
                cap = cv2.VideoCapture(str(clip))
                continue
            if size is not None and (image.shape[1], image.shape[0]) != size:
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            frames.append(np.ascontiguousarray(image))
    finally:
        cap.release()
    return frames


def random_init_weights(architecture: str, directory: Path) -> Path:
    """Build ``architecture`` (``yolov8s.yaml``) with random weights and save it as a ``.pt``.

    Both the detector and Ultralytics' ``YOLO`` then load the same file, with the
    real model's compute per frame.

    Raises:
        DetectorError: Ultralytics does not know the architecture.
    """
    from ultralytics import YOLO  # type: ignore[attr-defined]

    torch.manual_seed(0)
    out = directory / f"{Path(architecture).stem}-random.pt"
    try:
        YOLO(architecture, task="detect").save(out)
    except Exception as exc:  # Ultralytics raises many kinds for an unknown or bad YAML
        raise DetectorError(
            f"model {architecture!r} could not be built as a YOLO architecture: {type(exc).__name__}: {exc}"
        ) from exc
    return out


def _check_shared_memory(settings: Settings) -> None:
    """Fail early when /dev/shm cannot hold every stream's slots (a decoder would die of SIGBUS)."""
    if not SHM_DIR.is_dir():
        return
    need = sum(SLOTS * frame_bytes(camera) for camera in settings.cameras.values())
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        raise SourceError(
            f"{len(settings.cameras)} streams need {need / 2**20:.0f} MiB of {SHM_DIR}, "
            f"{free / 2**20:.0f} MiB are free: use smaller --width/--height, fewer --streams, "
            "or a larger /dev/shm (docker run --shm-size)"
        )


# -- the run -------------------------------------------------------------------------------
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
    if not options.synthetic:
        _check_shared_memory(settings)
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
        if detector.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(detector.device)
        pool = synthetic_frames(*frame_size) if options.synthetic else []
        metrics = Metrics()
        recorder = _Recorder()
        with ExitStack() as streams:
            if options.synthetic:
                sources: list[Source] = [
                    streams.enter_context(
                        SyntheticSource(
                            name,
                            camera,
                            settings.camera_fps(name),
                            metrics,
                            pool,
                            phase=i / options.streams / settings.camera_fps(name),
                        )
                    )
                    for i, (name, camera) in enumerate(settings.cameras.items())
                ]
            else:
                sources = [
                    streams.enter_context(Source(name, camera, settings.camera_fps(name), metrics))
                    for name, camera in settings.cameras.items()
                ]
            window, cpu = _run_window(settings, options, sources, detector, metrics, recorder)
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
        runtime=detector.runtime,
        torch_threads=threads,
        half=detector.half,
        max_batch=settings.detect.max_batch,
        conf=settings.model.conf,
        decoder="none" if options.synthetic else options.decoder,
        duration_s=options.duration,
        warmup_s=options.warmup,
        naive_frames=options.naive_frames if options.compare_naive else None,
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
        stages={s: Percentiles.of(recorder.stages[s]) for s in STAGES},
        latency={
            "capture_to_detections": Percentiles.of(recorder.to_detections),
            "capture_to_alerts": Percentiles.of(recorder.to_alerts),
        },
        naive=naive,
        ratios=ratios,
    )


def _with_loadavg_end(machine: Machine) -> Machine:
    return Machine(**{**asdict(machine), "loadavg_end": _loadavg()})


def _counter(metrics: Metrics, name: str, camera: str) -> float:
    return metrics.registry.get_sample_value(name, {"camera": camera}) or 0.0


_COUNTERS = (
    "monitor_camera_frames_total",
    "monitor_camera_frames_processed_total",
    "monitor_camera_frames_dropped_total",
    "monitor_camera_reconnects_total",
)


def _snapshot(metrics: Metrics, cameras: Sequence[str]) -> dict[str, dict[str, float]]:
    return {name: {c: _counter(metrics, c, name) for c in _COUNTERS} for name in cameras}


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
    recorder: _Recorder,
) -> tuple[_Window, CpuUsage]:
    """Wait for every stream's first frame, warm up, then measure for ``options.duration``."""
    from tqdm import tqdm

    loop = _Loop(settings, sources, detector, metrics, recorder)
    names = [s.name for s in sources]
    deadline = time.monotonic() + STREAM_START_TIMEOUT
    while time.monotonic() < deadline:
        counts = _snapshot(metrics, names)
        if all(c["monitor_camera_frames_total"] > 0 for c in counts.values()):
            break
        loop.step()
    else:
        silent = [n for n, c in _snapshot(metrics, names).items() if c["monitor_camera_frames_total"] == 0]
        logger.warning(
            "%d stream(s) delivered no frame in %.0f s: %s", len(silent), STREAM_START_TIMEOUT, silent
        )
    warm_until = time.monotonic() + options.warmup
    while time.monotonic() < warm_until:
        loop.step()

    start_counts = _snapshot(metrics, names)
    cpu_start = process_tree_cpu()
    recorder.on = True
    started = time.monotonic()
    ends = started + options.duration
    next_gpu = started
    next_progress = started
    disable = None if options.progress is None else not options.progress
    with tqdm(
        total=round(options.duration), unit="s", desc="bench", disable=disable, file=sys.stderr, leave=False
    ) as bar:
        while (now := time.monotonic()) < ends:
            loop.step()
            if detector.device.type == "cuda" and recorder.gpu_error is None and now >= next_gpu:
                next_gpu = now + GPU_SAMPLE_INTERVAL
                _sample_gpu(detector.device, recorder)
            if now >= next_progress:
                next_progress = now + PROGRESS_INTERVAL
                processed = sum(
                    _counter(metrics, "monitor_camera_frames_processed_total", n)
                    - start_counts[n]["monitor_camera_frames_processed_total"]
                    for n in names
                )
                bar.n = min(round(now - started), bar.total)
                bar.set_postfix(fps=f"{processed / max(now - started, 1e-9):.1f}")
    seconds = time.monotonic() - started
    recorder.on = False
    cpu = _cpu_usage(cpu_start, process_tree_cpu(), seconds)
    return _Window(seconds, start_counts, _snapshot(metrics, names)), cpu


def _sample_gpu(device: torch.device, recorder: _Recorder) -> None:
    try:
        recorder.gpu_samples.append(float(torch.cuda.utilization(device)))
    except Exception as exc:  # pynvml missing or NVML unusable: report why, stop asking
        recorder.gpu_error = f"{type(exc).__name__}: {exc}"


class _Loop:
    """The daemon's loop body (``Daemon._loop`` and ``_process``) without uploads or publishing."""

    def __init__(
        self,
        settings: Settings,
        sources: list[Source],
        detector: Detector,
        metrics: Metrics,
        recorder: _Recorder,
    ) -> None:
        self.sources = sources
        self.detector = detector
        self.metrics = metrics
        self.recorder = recorder
        max_age = settings.detect.max_age_ms
        self.scheduler = Scheduler(settings.detect.max_batch, max_age / 1000 if max_age else None)
        self.cameras = {
            name: CameraPipeline(name, settings, detector.label, BENCH_PREFIX, None)
            for name in settings.cameras
        }
        self.synthetic = [s for s in sources if isinstance(s, SyntheticSource)]

    def step(self) -> None:
        """Wait for frames, take the oldest ready ones, detect, track, judge."""
        waitables: list[Any] = [s.connection for s in self.sources if s.connection is not None]
        if waitables:
            mpc.wait(waitables, timeout=LOOP_TICK)
        elif self.synthetic:  # like waiting on the decoders' pipes: until the next frame is due
            delay = min(s.next_arrival() for s in self.synthetic) - time.monotonic()
            if delay > 0:
                time.sleep(min(delay, LOOP_TICK))
        now = time.monotonic()
        for source in self.sources:
            source.drain()
            source.check(now)
        frames = self.scheduler.pick(self.sources)
        if frames:
            self._process(frames)
        wall = time.time()
        seen = {f.camera for f in frames}
        for name, camera in self.cameras.items():
            if name not in seen:
                self._count(camera.rules.expire(wall))
        self.metrics.loop_iterations.inc()

    def _process(self, frames: list[Frame]) -> None:
        timings: dict[str, float] = {}
        detections = self.detector.detect([f.image for f in frames], timings)
        done = time.time()
        rec = self.recorder
        stage = self.metrics.stage_duration
        for name, seconds in timings.items():
            stage.labels(name).observe(seconds)
            if rec.on:
                rec.stages[name].append(seconds)
        self.metrics.batch_size.observe(len(frames))
        if rec.on:
            rec.batches.append(len(frames))
        for frame, found in zip(frames, detections, strict=True):
            self.metrics.frames_processed.labels(frame.camera).inc()
            self.metrics.detect_latency.observe(max(0.0, done - frame.capture_time))
            steps: dict[str, float] = {}
            alerts = self.cameras[frame.camera].process(found, frame, steps)
            for name, seconds in steps.items():
                stage.labels(name).observe(seconds)
            self._count(alerts)
            if rec.on:
                for name, seconds in steps.items():
                    rec.stages[name].append(seconds)
                rec.to_detections.append(max(0.0, done - frame.capture_time))
                rec.to_alerts.append(max(0.0, time.time() - frame.capture_time))

    def _count(self, alerts: list[Alert]) -> None:
        if not self.recorder.on:
            return
        for alert in alerts:
            self.recorder.events["suppressed" if alert.suppressed else alert.event.type] += 1


def _pipeline_result(
    settings: Settings,
    metrics: Metrics,
    recorder: _Recorder,
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
        cpu=cpu,
        gpu=gpu,
        streams=streams,
    )


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


# -- the naive baseline ----------------------------------------------------------------------
def compare_naive(detector: Detector, frames: list[np.ndarray], batch: int) -> NaiveResult:
    """Detector-only rates on ``frames``: Ultralytics per frame, Ultralytics batched, ours batched.

    Ultralytics gets the detector's weights file, imgsz, device, fp16 choice, conf,
    IoU and max_det, and the same number of torch threads; every result is brought
    to the CPU (as ours are) before the clock stops. Each way runs once untimed
    first. Ultralytics runs the ``.pt`` with torch; the detector runs its own
    runtime (``Detector.runtime``: OpenVINO on the CPU when installed).
    """
    from ultralytics import YOLO  # type: ignore[attr-defined]

    model_settings = detector.settings
    model = YOLO(str(model_settings.path), task="detect")
    device = detector.device
    options: dict[str, Any] = {
        "imgsz": model_settings.imgsz,
        "device": "cpu" if device.type == "cpu" else device.index or 0,
        "half": detector.half,
        "conf": model_settings.conf,
        "iou": model_settings.iou,
        "max_det": model_settings.max_det,
        "verbose": False,
    }
    batches = [frames[i : i + batch] for i in range(0, len(frames), batch)]

    def per_frame() -> None:
        for frame in frames:
            _to_cpu(model.predict(frame, **options))

    def batched() -> None:
        for chunk in batches:
            _to_cpu(model.predict(chunk, **options))

    def ours() -> None:
        for chunk in batches:
            detector.detect(chunk)

    threads = torch.get_num_threads()
    _to_cpu(model.predict(frames[0], **options))
    torch.set_num_threads(threads)  # select_device changed it: both sides get the same count
    _to_cpu(model.predict(batches[0], **options))
    detector.detect(batches[0])
    openvino_fps = None
    if device.type == "cpu" and importlib.util.find_spec("openvino") is not None:
        # The same .pt exported the way the daemon does it (cached), run per frame by Ultralytics.
        weights = model_settings.path
        if weights.suffix == ".pt":
            exported = exported_model(weights, "openvino", model_settings.imgsz, detector.sha256)
            openvino = YOLO(str(exported), task="detect")
            torch.set_num_threads(threads)

            def openvino_per_frame() -> None:
                for frame in frames:
                    _to_cpu(openvino.predict(frame, **options))

            _to_cpu(openvino.predict(frames[0], **options))
            torch.set_num_threads(threads)
            openvino_fps = len(frames) / _timed(openvino_per_frame, device)
    return NaiveResult(
        frames=len(frames),
        batch=batch,
        ultralytics_per_frame_fps=len(frames) / _timed(per_frame, device),
        ultralytics_batched_fps=len(frames) / _timed(batched, device),
        detector_fps=len(frames) / _timed(ours, device),
        openvino_per_frame_fps=openvino_fps,
    )


def _to_cpu(results: Any) -> None:
    for result in results:
        result.boxes.data.cpu()


def _timed(run: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
