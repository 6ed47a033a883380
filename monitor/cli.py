"""The ``monitor`` command line: run, serve, check-config, replay and shards here, the model commands
(predict, bench, train, val, export) in ``monitor.cli_model``.

This is the entry point (``monitor.cli:main``) and, apart from the settings
sources (``monitor.settings_sources``), the only module that reads the process
environment; the only one that installs signal handlers or exits. Exit codes:
0 success or a clean stop, 2 invalid configuration or flags, 3 start-up failure
(model file, HTTP port) or a one-shot command's failure (a model, data set or
input that cannot be used), 1 anything else (a failure after start-up
included, and a second SIGTERM or SIGINT).
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

from monitor import __version__, cli_model, cluster
from monitor.cli_model import EXIT_CONFIG, EXIT_STARTUP
from monitor.configfile import load_settings
from monitor.errors import ConfigError, MonitorError
from monitor.logs import configure_logging
from monitor.settings import LogSettings, Settings

logger = logging.getLogger("monitor.cli")

__all__ = ["EXIT_CONFIG", "EXIT_STARTUP", "build_parser", "capture_signals", "main", "raise_open_files_limit"]


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
    cli_model.add_model_commands(sub, load=_load, offline=_offline_ultralytics)
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
