"""The ``monitor`` command: run, check-config, and the model workflow (train, val, export).

The only module that reads the process environment, installs signal
handlers or exits. Exit codes: 0 clean stop, 2 invalid configuration,
3 start-up failure (model, port, spool), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from monitor import __version__
from monitor.errors import ConfigError, MonitorError
from monitor.logs import configure_logging
from monitor.settings import LogSettings, Settings, load_settings

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
def capture_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``; a second one exits at once. Restores the old handlers."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        logger.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    cameras = ", ".join(settings.cameras) or "none"
    print(f"{args.config}: valid ({len(settings.cameras)} camera(s): {cameras})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        configure_logging(LogSettings())
        logger.error("%s", exc)
        return EXIT_CONFIG
    configure_logging(settings.log, journald=bool(os.environ.get("JOURNAL_STREAM")))
    _offline_ultralytics()
    from monitor.daemon import Daemon, watchdog_interval  # torch loads here, after the config is known good

    daemon = Daemon(
        settings,
        notify_socket=os.environ.get("NOTIFY_SOCKET"),
        watchdog_interval=watchdog_interval(os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")),
    )
    stop = threading.Event()
    logger.info("monitor %s starting", __version__)
    with capture_signals(stop):
        try:
            daemon.run(stop)
        except MonitorError as exc:
            logger.error("start-up failed: %s", exc)
            return EXIT_STARTUP
    logger.info("stopped")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _offline_ultralytics()
    from monitor import training  # torch loads here

    try:
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
    except MonitorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    print(best)
    print(training.model_card_path(best))
    return 0


def cmd_val(args: argparse.Namespace) -> int:
    _offline_ultralytics()
    from monitor import training  # torch loads here

    try:
        report = training.validate(
            args.data, args.model, imgsz=args.imgsz, batch=args.batch, device=args.device
        )
    except MonitorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    print(report.to_json() if args.json else training.format_table(report))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _offline_ultralytics()
    from monitor import training  # torch loads here

    try:
        out = training.export(
            args.model, args.format, imgsz=args.imgsz, dynamic=args.dynamic, half=args.half, batch=args.batch
        )
    except MonitorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
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
        ("check-config", cmd_check_config, "validate a configuration file and exit"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", "-c", type=Path, required=True, help="YAML configuration file")
        command.set_defaults(func=func)
    _add_model_workflow(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
