"""``monitor bench``: its arguments and the command (``monitor.cli_model`` registers it).

The load itself is ``monitor.bench``'s; see ``cli_model`` for how commands
reach the process (``load``, ``offline``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from monitor.logs import configure_logging
from monitor.settings import LogSettings, Settings

EXIT_CONFIG = 2

LoadSettings = Callable[[Path], Settings]
Offline = Callable[[], None]


def cmd_bench(args: argparse.Namespace, *, load: LoadSettings, offline: Offline) -> int:
    """The pipeline under a fixed load: throughput, drops, stage latencies, and a naive baseline."""
    offline()
    if not logging.getLogger().handlers:  # decoder restarts are worth seeing; keep a caller's handlers
        configure_logging(LogSettings(level="WARNING"))
    from pydantic import ValidationError

    from monitor import bench  # torch loads here
    from monitor.settings import ClassifierSettings, ModelSettings

    try:
        if args.config is not None:
            settings = load(args.config)
        else:
            settings = Settings(model=ModelSettings(path=args.model))
        updates: dict[str, object] = {
            k: v
            for k, v in (("imgsz", args.imgsz), ("device", args.device), ("backend", args.backend))
            if v is not None
        }
        if args.label:
            updates["labels"] = {**settings.model.labels, **dict(args.label)}
        model = ModelSettings.model_validate({**settings.model.model_dump(), **updates})
        if args.classifier is not None:  # every tracked label is classified
            section = {"path": args.classifier, "labels_from": settings.objects.track}
            if args.classifier_imgsz is not None:
                section["imgsz"] = args.classifier_imgsz
            settings = settings.model_copy(update={"classifier": ClassifierSettings.model_validate(section)})
        options = bench.BenchOptions(
            streams=args.streams,
            fps=tuple(args.fps),
            clip=args.clip,
            synthetic=args.synthetic,
            width=args.width,
            height=args.height,
            max_batch=args.max_batch,
            workers=args.workers,
            decoder=args.decoder,
            record=args.record,
            runtime=args.runtime,
            replay_detections=args.replay_detections,
            duration=args.duration,
            warmup=args.warmup,
            compare_naive=args.compare_naive,
            naive_frames=args.naive_frames,
        )
        report = bench.run_bench(settings.model_copy(update={"model": model}), options)
    except ValidationError as exc:
        for error in exc.errors():
            print(f"error: {'.'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        return EXIT_CONFIG
    print(report.to_json() if args.json else report.text())
    return 0


def label_map(text: str) -> tuple[str, str]:
    """``--label Normal=person``: a class and its new name."""
    model_name, sep, new_name = text.partition("=")
    if not sep or not model_name or not new_name:
        raise argparse.ArgumentTypeError(f"expected MODEL_NAME=NEW_NAME, got {text!r}")
    return model_name, new_name


def add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    bench = sub.add_parser(
        "bench",
        help="measure the pipeline under N streams; optionally against Ultralytics' predict loop",
        description="Run N streams (a clip looped in real time by the real decoder processes, or "
        "with --synthetic pre-made random frames that stand-in decoder processes write into the same "
        "shared memory, decoding nothing) through the daemon's stages (scheduler, batched "
        "detector, ByteTrack, alert rules; events are counted, not published) and print processed and "
        "offered fps, drops, per-stage and capture-to-detection latency percentiles, batch sizes, CPU "
        "and GPU use, and the machine. --compare-naive also times YOLO.predict per frame and batched, "
        "and Detector.detect, on the same frames. A model given as an architecture (yolov8s.yaml) gets "
        "random weights, saved to a temporary .pt both sides load. Nothing is downloaded.",
    )
    bench_model = bench.add_mutually_exclusive_group(required=True)
    bench_model.add_argument(
        "--config", "-c", type=Path, help="take model, detect and objects from this file (not its cameras)"
    )
    bench_model.add_argument(
        "--model", type=Path, help="weights (.pt or an export), or an architecture such as yolov8s.yaml"
    )
    bench.add_argument("--label", type=label_map, action="append", help="rename a class: Normal=person")
    bench.add_argument("--imgsz", type=int, help="inference size (default: the config's, else 640)")
    bench.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's, else auto)")
    bench.add_argument(
        "--backend",
        choices=["auto", "torch", "openvino", "onnx"],
        help="runtime of .pt weights (default: the config's, else auto: torch on CUDA, else OpenVINO)",
    )
    bench.add_argument("--streams", type=int, default=4, help="number of streams (default: %(default)s)")
    bench.add_argument(
        "--fps",
        type=float,
        nargs="+",
        default=[15.0],
        help="detect fps per stream; several values are cycled over the streams (default: 15); "
        "a file stream cannot go faster than its clip",
    )
    bench.add_argument("--clip", type=Path, help="video for file streams (default: tests/data/vtest.mp4)")
    bench.add_argument(
        "--synthetic",
        action="store_true",
        help="pre-made random frames written into shared memory by stand-in decoder processes, on "
        "the same clock, with no decoding (default 1280x720)",
    )
    bench.add_argument("--width", type=int, help="scale frames to this width (with --height)")
    bench.add_argument("--height", type=int, help="scale frames to this height (with --width)")
    bench.add_argument(
        "--max-batch", type=int, help="frames per forward pass (default: the config's, else 16)"
    )
    bench.add_argument(
        "--workers",
        type=int,
        help="tracking worker processes, detect.workers (default: the config's, else 0: in the main process)",
    )
    bench.add_argument(
        "--decoder",
        choices=["auto", "cpu", "nvdec"],
        default="auto",
        help="file streams' decoder: nvdec needs PyNvVideoCodec and a GPU (default: %(default)s)",
    )
    bench.add_argument(
        "--runtime",
        choices=["model", "null"],
        default="model",
        help="null: replay detections recorded from the model on --replay-detections, no inference "
        "(tracking and alert rules cost what they cost; the bench measures all but the network)",
    )
    bench.add_argument("--replay-detections", type=Path, metavar="CLIP", help="footage for --runtime null")
    bench.add_argument(
        "--record",
        action="store_true",
        help="file streams also record their segments (PyAV demuxes once for both), into a temporary folder",
    )
    bench.add_argument("--duration", type=float, default=30.0, help="seconds measured (default: %(default)s)")
    bench.add_argument(
        "--warmup", type=float, default=5.0, help="seconds run before measuring (default: %(default)s)"
    )
    bench.add_argument(
        "--compare-naive",
        action="store_true",
        help="also time Ultralytics' YOLO.predict (per frame, and batched) and Detector.detect "
        "on the same frames",
    )
    bench.add_argument(
        "--naive-frames", type=int, default=200, help="frames in that comparison (default: %(default)s)"
    )
    bench.add_argument(
        "--classifier",
        type=Path,
        help="also run this classification model on crops of every tracked label (the config's "
        "classifier section, when --config has one, is used without this flag)",
    )
    bench.add_argument("--classifier-imgsz", type=int, help="its input size (default: 224)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    return bench
