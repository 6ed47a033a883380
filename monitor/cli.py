"""The ``monitor`` command: run, serve, check-config, predict, and the model workflow (train, val, export).

The only module that reads the process environment, installs signal
handlers or exits. Exit codes: 0 clean stop, 2 invalid configuration,
3 start-up failure (model, port, spool), 1 anything else (a failure after
start-up included).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from monitor import __version__, cluster
from monitor.configfile import load_settings
from monitor.errors import ConfigError, MonitorError
from monitor.logs import configure_logging
from monitor.settings import LogSettings, Settings

logger = logging.getLogger("monitor.cli")

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def _offline_ultralytics() -> None:
    """Ultralytics must never reach the network or install packages from the daemon."""
    os.environ.setdefault("YOLO_OFFLINE", "True")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", "False")


def _load(path: Path) -> Settings:
    secrets = os.environ.get("CREDENTIALS_DIRECTORY")
    return load_settings(path, secrets_dir=Path(secrets) if secrets else None)


@contextlib.contextmanager
def capture_signals(stop: threading.Event, reload: threading.Event | None = None) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``; a second one exits at once; SIGHUP sets ``reload``.

    The handlers only set flags (the loop acts on them); the old handlers are restored on exit.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    def handle_reload(signum: int, frame: FrameType | None) -> None:
        if reload is not None:
            reload.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, handle_reload)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _load_or_report(path: Path) -> Settings | None:
    """The settings, or None after printing every problem with its key path to stderr."""
    try:
        return _load(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    cameras = ", ".join(settings.cameras) or "none"
    print(f"{args.config}: valid ({len(settings.cameras)} camera(s): {cameras})")
    return 0


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    Every camera holds a decoder process's pipes and shared memory, every HTTP client a
    socket: the usual soft limit of 1024 runs out long before the hard one. Under systemd
    ``LimitNOFILE=`` sets both; without it this still gets what the system allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


def cmd_run(args: argparse.Namespace) -> int:
    """``run`` and ``serve``: a clean stop (0) on SIGTERM at any moment, start-up included."""
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    # Handlers first: importing torch and loading the model take seconds, and a SIGTERM then
    # must be a clean stop (exit 0, logged), not the default action (exit 143, no word).
    configure_logging(LogSettings(), journald=journald)
    stop, reload = threading.Event(), threading.Event()
    with capture_signals(stop, reload):
        return _run(args, stop, reload, journald)


def _run(args: argparse.Namespace, stop: threading.Event, reload: threading.Event, journald: bool) -> int:
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    configure_logging(settings.log, journald=journald)
    open_files = raise_open_files_limit()
    logger.info("monitor %s starting (pid %d, open files limit %d)", __version__, os.getpid(), open_files)
    if stop.is_set():
        return _stopped_early()
    _offline_ultralytics()
    from monitor.daemon import Daemon, watchdog_interval  # torch loads here, after the config is known good

    try:
        shard = cluster.resolve(settings.cluster, socket.gethostname())
    except ValueError as exc:
        logger.error("cluster: %s", exc)
        return EXIT_CONFIG
    daemon = Daemon(
        settings,
        shard=shard,
        notify_socket=os.environ.get("NOTIFY_SOCKET"),
        watchdog_interval=watchdog_interval(os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")),
        serve_only=args.command == "serve",
    )
    if stop.is_set():
        return _stopped_early()
    try:
        daemon.run(stop, reload, load=lambda: _load(args.config))
    except MonitorError as exc:
        if daemon.running:  # start-up was over: the daemon ran, then failed
            logger.error("failed while running: %s", exc)
            return 1
        logger.error("start-up failed: %s", exc)
        return EXIT_STARTUP
    logger.info("stopped")
    return 0


def _stopped_early() -> int:
    logger.info("stopped before start-up finished")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """The camera pipeline on a video file: event timeline and summary."""
    settings = _load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    _offline_ultralytics()
    from monitor.replay import run_replay  # torch loads here

    result = run_replay(args.video, settings, camera=args.camera)
    print(result.to_json() if args.json else result.timeline())
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    """Print which shard runs each camera (rendezvous hashing), and the count per shard."""
    settings = _load_or_report(args.config)
    if settings is None:
        return EXIT_CONFIG
    count = args.count if args.count is not None else settings.cluster.shard_count
    try:
        shards = cluster.assign(sorted(settings.cameras), count)
    except ValueError as exc:
        print(f"error: --count: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    placed = {camera: index for index, names in shards.items() for camera in names}
    width = max([len("camera"), *(len(name) for name in settings.cameras)])
    print(f"{'camera':<{width}}  shard")
    for name in sorted(settings.cameras):
        disabled = "" if settings.cameras[name].enabled else "  (disabled)"
        print(f"{name:<{width}}  {placed[name]}{disabled}")
    for index, names in shards.items():
        print(f"shard {index}: {len(names)} camera(s)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """JSON lines like /predict for images, folders and videos; annotated copies with --save."""
    _offline_ultralytics()
    import json

    from pydantic import ValidationError
    from tqdm import tqdm

    from monitor.detector import Detector
    from monitor.predict import annotated_name, count_inputs, iter_pictures, to_response
    from monitor.settings import ModelSettings
    from monitor.snapshots import Annotator, encode_jpeg, labels_of

    base = _load(args.config).model.model_dump() if args.config is not None else {"path": args.model}
    if args.label:
        base["labels"] = {**base.get("labels", {}), **dict(args.label)}
    updates = {k: v for k, v in (("imgsz", args.imgsz), ("device", args.device)) if v is not None}
    try:
        # Validated like the config file (model_copy would not): --imgsz 100 is refused, not run.
        model = ModelSettings.model_validate({**base, **updates})
    except ValidationError as exc:
        for error in exc.errors():
            print(f"error: {_flag_of(error['loc'])}: {error['msg']}", file=sys.stderr)
        return EXIT_CONFIG
    total = count_inputs(args.paths, vid_stride=args.vid_stride)  # bad paths fail before the model loads
    detector = Detector(model, max_batch=1)  # one picture per call
    annotator = Annotator()
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    saved: set[str] = set()
    pictures = iter_pictures(args.paths, vid_stride=args.vid_stride)
    for picture in tqdm(pictures, total=total, unit="img", disable=None, file=sys.stderr):
        (found,) = detector.detect([picture.image], conf=args.conf)
        line = {"path": str(picture.path), **to_response(found).model_dump()}
        if picture.frame is not None:
            line["frame"] = picture.frame
        print(json.dumps(line), flush=True)
        if args.save is not None:
            out = args.save / annotated_name(picture, saved)
            out.write_bytes(encode_jpeg(annotator.draw(picture.image, found, labels_of(found))))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The pipeline under a fixed load: throughput, drops, stage latencies, and a naive baseline."""
    _offline_ultralytics()
    if not logging.getLogger().handlers:  # decoder restarts are worth seeing; keep a caller's handlers
        configure_logging(LogSettings(level="WARNING"))
    from pydantic import ValidationError

    from monitor import bench  # torch loads here
    from monitor.settings import ModelSettings

    try:
        if args.config is not None:
            settings = _load(args.config)
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
        options = bench.BenchOptions(
            streams=args.streams,
            fps=tuple(args.fps),
            clip=args.clip,
            synthetic=args.synthetic,
            width=args.width,
            height=args.height,
            max_batch=args.max_batch,
            decoder=args.decoder,
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


def _flag_of(loc: tuple[int | str, ...]) -> str:
    """The command-line flag (``--imgsz``) or else the model.* key that a ModelSettings error is about."""
    key = ".".join(map(str, loc))
    flags = {"imgsz": "--imgsz", "device": "--device", "labels": "--label", "path": "--model"}
    return flags.get(key, f"model.{key}")


def _label_map(text: str) -> tuple[str, str]:
    model_name, sep, new_name = text.partition("=")
    if not sep or not model_name or not new_name:
        raise argparse.ArgumentTypeError(f"expected MODEL_NAME=NEW_NAME, got {text!r}")
    return model_name, new_name


def cmd_train(args: argparse.Namespace) -> int:
    _offline_ultralytics()
    from monitor import training  # torch loads here

    best = training.train(
        args.data,
        model=args.model,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        project=args.project,
        name=args.name,
    )
    print(best)
    print(training.model_card_path(best))
    return 0


def cmd_val(args: argparse.Namespace) -> int:
    _offline_ultralytics()
    from monitor import training  # torch loads here

    report = training.validate(args.data, args.model, imgsz=args.imgsz, batch=args.batch, device=args.device)
    print(report.to_json() if args.json else training.format_table(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _offline_ultralytics()
    from monitor import training  # torch loads here

    out = training.export(
        args.model, args.format, imgsz=args.imgsz, dynamic=args.dynamic, half=args.half, batch=args.batch
    )
    print(out)
    return 0


def _add_model_workflow(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The train, val and export subcommands (Ultralytics, offline: nothing is downloaded)."""
    offline = (
        "Nothing is downloaded: pretrained .pt weights must be a local path. "
        "Set YOLO_VERBOSE=True to see Ultralytics' progress."
    )
    train = sub.add_parser(
        "train",
        help="train a detection model; prints best.pt and its model_card.json",
        description="Train a YOLO detection model, write model_card.json next to best.pt, "
        f"and print both paths. {offline}",
    )
    train.add_argument("--data", type=Path, required=True, help="Ultralytics data set YAML")
    train.add_argument(
        "--model",
        default="yolov8s.pt",
        help="local pretrained .pt weights to fine-tune (no download), or an architecture "
        "such as yolov8s.yaml for random initial weights (default: %(default)s)",
    )
    train.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    train.add_argument("--imgsz", type=int, default=416, help="multiple of 32 (default: %(default)s)")
    train.add_argument("--batch", type=int, default=16, help="default: %(default)s")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    train.add_argument(
        "--project", type=Path, default=Path("runs/train"), help="runs directory (default: %(default)s)"
    )
    train.add_argument("--name", default="exp", help="run name, numbered when taken (default: %(default)s)")
    train.set_defaults(func=cmd_train)

    val = sub.add_parser(
        "val",
        help="validate a model; prints the per-class table",
        description="Validate weights on a data set's val split and print Ultralytics' per-class table. "
        + offline,
    )
    val.add_argument("--data", type=Path, required=True, help="Ultralytics data set YAML")
    val.add_argument("--model", type=Path, required=True, help="local weights (.pt or an export)")
    val.add_argument("--imgsz", type=int, default=416, help="multiple of 32 (default: %(default)s)")
    val.add_argument("--batch", type=int, default=16, help="default: %(default)s")
    val.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    val.add_argument("--json", action="store_true", help="print JSON instead of the table")
    val.set_defaults(func=cmd_val)

    export = sub.add_parser(
        "export",
        help="export a model for the daemon; prints the exported path",
        description=f"Export .pt weights next to themselves and print the exported path. {offline}",
    )
    export.add_argument("--model", type=Path, required=True, help="local .pt weights")
    export.add_argument("--format", required=True, choices=["onnx", "openvino", "engine"])
    export.add_argument("--imgsz", type=int, default=416, help="multiple of 32 (default: %(default)s)")
    export.add_argument(
        "--batch",
        type=int,
        default=16,
        help="largest batch of a dynamic TensorRT engine, the daemon's detect.max_batch "
        "(default: %(default)s)",
    )
    export.add_argument(
        "--no-dynamic",
        dest="dynamic",
        action="store_false",
        help="fixed batch and size (the daemon's model.imgsz must then equal --imgsz)",
    )
    export.add_argument("--half", action="store_true", help="fp16 weights (onnx and engine need CUDA)")
    export.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor", description="Field-camera monitoring daemon.")
    parser.add_argument("--version", action="version", version=f"monitor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "run the daemon"),
        ("serve", cmd_run, "serve only the HTTP API (/predict) on the configured model: no cameras, no MQTT"),
        ("check-config", cmd_check_config, "validate a configuration file and exit"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", "-c", type=Path, required=True, help="YAML configuration file")
        command.set_defaults(func=func)
    replay = sub.add_parser(
        "replay",
        help="run the camera pipeline on a video file; print the events and a summary",
        description="Run detection, tracking and the alert rules of a camera on a video file as fast as "
        "possible (no broker) and print a timeline of events and a summary, to tune thresholds, zones "
        "and cooldowns on recorded footage.",
    )
    replay.add_argument("video", type=Path, help="a video file")
    replay.add_argument("--config", "-c", type=Path, required=True, help="YAML configuration file")
    replay.add_argument(
        "--camera", help="whose zones, masks and overrides to use (default: the first camera)"
    )
    replay.add_argument("--json", action="store_true", help="print JSON instead of the timeline")
    replay.set_defaults(func=cmd_replay)
    shards = sub.add_parser(
        "shards",
        help="print which shard runs each camera",
        description="Print each camera's shard (rendezvous hashing over --count shards) "
        "and the count per shard.",
    )
    shards.add_argument("--config", "-c", type=Path, required=True, help="YAML configuration file")
    shards.add_argument(
        "--count", "-n", type=int, default=None, help="number of shards (default: cluster.shard_count)"
    )
    shards.set_defaults(func=cmd_shards)
    predict = sub.add_parser(
        "predict",
        help="detect objects in images, folders and videos; prints JSON lines like /predict",
        description="Detect objects in pictures and print one JSON line per picture (or video frame) "
        'in the /predict format, plus "path" (and "frame" for videos). Nothing is downloaded.',
    )
    predict.add_argument("paths", type=Path, nargs="+", help="images, folders (searched recursively), videos")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config", "-c", type=Path, help="take model.* (path, imgsz, labels...) from this file"
    )
    source.add_argument("--model", type=Path, help="weights (.pt or an export)")
    predict.add_argument("--label", type=_label_map, action="append", help="rename a class: Normal=person")
    predict.add_argument("--imgsz", type=int, help="inference size (default: the config's, else 640)")
    predict.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    predict.add_argument("--conf", type=float, default=0.25, help="lowest confidence (default: %(default)s)")
    predict.add_argument("--vid-stride", type=int, default=1, help="every Nth video frame (default: 1)")
    predict.add_argument("--save", type=Path, help="write annotated JPEG copies into this folder")
    predict.set_defaults(func=cmd_predict)
    bench = sub.add_parser(
        "bench",
        help="measure the pipeline under N streams; optionally against Ultralytics' predict loop",
        description="Run N streams (a clip looped in real time by the real decoder processes, or "
        "in-process random frames with --synthetic) through the daemon's stages (scheduler, batched "
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
    bench.add_argument("--label", type=_label_map, action="append", help="rename a class: Normal=person")
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
        help="random frames made in-process: no decoders (default 1280x720)",
    )
    bench.add_argument("--width", type=int, help="scale frames to this width (with --height)")
    bench.add_argument("--height", type=int, help="scale frames to this height (with --width)")
    bench.add_argument(
        "--max-batch", type=int, help="frames per forward pass (default: the config's, else 16)"
    )
    bench.add_argument(
        "--decoder",
        choices=["auto", "cpu", "nvdec"],
        default="auto",
        help="file streams' decoder: nvdec needs PyNvVideoCodec and a GPU (default: %(default)s)",
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
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    bench.set_defaults(func=cmd_bench)
    _add_model_workflow(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A command's MonitorError becomes ``error: ...`` and exit 3 (2 for config)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MonitorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP


if __name__ == "__main__":
    sys.exit(main())
