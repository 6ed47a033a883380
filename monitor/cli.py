"""The ``monitor`` command: run, check-config.

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
