"""``monitor bench``'s report: typed results, their JSON, and the text table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


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
    #: The classification model (file@sha256 prefix) run on crops of tracks, if one was.
    classifier: str | None = None
    classifier_imgsz: int | None = None
    #: With the null runtime: the clip whose recorded detections were replayed.
    replayed_from: str | None = None
    #: ``detect.workers``: tracking worker processes (0: tracking in the main process).
    workers: int = 0


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
    #: CPU milliseconds per processed frame: the main process (the loop, tracking unless workers
    #: do it, alert rules and, unless the runtime is null, inference) and the decoder children
    #: (or stand-ins).
    main_ms_per_frame: float | None = None
    decoders_ms_per_frame: float | None = None
    #: The tracking workers (``--workers``; zero without), apart from the decoders.
    workers_cores_used: float | None = None
    workers_ms_per_frame: float | None = None


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """The GPU over the window (all None on the CPU)."""

    utilization_pct: float | None
    utilization_error: str | None
    max_memory_allocated_mib: float | None


@dataclass(frozen=True, slots=True)
class PipelineResult:
    """End to end: decoders (or stand-ins) -> shared memory -> scheduler -> detector -> tracking, alerts."""

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
    #: Crops the classifier named in the measured window.
    crops_classified: int = 0


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
        source = (
            f"file streams ({c.clip})"
            if c.mode == "file"
            else "synthetic streams (stand-in decoders, shared memory)"
        )
        fps = "/".join(f"{f:g}" for f in c.fps)
        lines = [
            f"machine: {m.cpu_model}, {m.cpu_cores} cores, {memory}, {gpu}; load average at start {load}",
            f"  python {m.python}, torch {m.torch}, ultralytics {m.ultralytics}, opencv {m.opencv}",
            f"config: {c.streams} {source}, {c.width}x{c.height} at {fps} fps each"
            + (f", decoder {c.decoder}" if c.mode == "file" else ""),
            f"  model {c.model}{' (random weights)' if c.random_init else ''} = {c.model_id}",
            f"  imgsz {c.imgsz}, {c.device}, "
            f"{c.runtime if c.replayed_from is None else f'null (replays {c.replayed_from})'}, "
            f"{'fp16' if c.half else 'fp32'}, "
            f"{c.torch_threads} torch threads, max_batch {c.max_batch}",
            *([f"  classifier {c.classifier} at imgsz {c.classifier_imgsz}"] if c.classifier else []),
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
            *([f"  crops classified {p.crops_classified}"] if c.classifier else []),
            f"  CPU {_fmt(p.cpu.cores_used, '.2f')} cores ({_fmt(p.cpu.percent_of_machine, '.0f')} % of the "
            f"machine): main process {_fmt(p.cpu.main_cores_used, '.2f')}, decoders "
            f"{_fmt(p.cpu.decoders_cores_used, '.2f')} ({p.cpu.processes} processes); per frame: main "
            f"{_fmt(p.cpu.main_ms_per_frame, '.3f')} ms, "
            f"decoders {_fmt(p.cpu.decoders_ms_per_frame, '.3f')} ms",
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
