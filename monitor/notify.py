"""systemd's notify protocol: ``READY=1``, ``STOPPING=1`` and the pipeline's ``WATCHDOG=1``.

Under ``Type=notify`` with ``WatchdogSec=`` systemd restarts a daemon that
stops pinging. The ping comes from the pipeline loop, and is withheld while
online cameras' frames go unprocessed: a loop that spins around a wedged
detector is as dead as a frozen one. Outside systemd everything here does
nothing.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

#: Least seconds without a processed frame (with cameras online) before WATCHDOG=1 stops.
STALL_GRACE = 10.0


class SystemdNotifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET``; does nothing when not under systemd.

    Args:
        address: The socket path (``@`` for the abstract namespace), or None.
    """

    def __init__(self, address: str | None) -> None:
        self._target: str | None = None
        if address:
            self._target = "\0" + address[1:] if address.startswith("@") else address

    def notify(self, state: str) -> None:
        """Send one state line, e.g. ``READY=1``; failures are logged, never raised."""
        if self._target is None:
            return
        # A socket per message, as sd_notify(3) does: a few a minute, and nothing to close.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(state.encode(), self._target)
        except OSError as exc:
            logger.warning("sd_notify %s failed: %s", state.split("=")[0], exc)


class Watchdog:
    """``WATCHDOG=1`` every ``interval`` seconds while the pipeline works, with a ``STATUS=`` line.

    Args:
        notifier: Where pings go.
        interval: Seconds between pings (half of ``WatchdogSec``), or None: never ping.
        now: The monotonic clock at start (the pipeline counts as healthy from there).
    """

    def __init__(self, notifier: SystemdNotifier, interval: float | None, now: float) -> None:
        self._notifier = notifier
        self.interval = interval
        self.last_processed = now
        self._last_ping = 0.0
        self._processed = self._processed_at_ping = 0

    def processed(self, frames: int, now: float) -> None:
        """The loop ran ``frames`` camera frames through the detector at ``now``."""
        if frames:
            self.last_processed = now
            self._processed += frames

    def tick(self, now: float, online: int, cameras: int) -> None:
        """Ping if the interval has passed and the pipeline deserves it (see ``pipeline_healthy``)."""
        if self.interval is None or now - self._last_ping < self.interval:
            return
        if not pipeline_healthy(now, online, self.last_processed, self.interval):
            logger.warning("cameras are online but no frame was processed lately: withholding WATCHDOG=1")
            return
        fps = (self._processed - self._processed_at_ping) / max(now - self._last_ping, 1e-9)
        self._last_ping, self._processed_at_ping = now, self._processed
        self._notifier.notify(f"WATCHDOG=1\nSTATUS={online}/{cameras} cameras online, {fps:.1f} frames/s")


def pipeline_healthy(now: float, online: int, last_processed: float, interval: float) -> bool:
    """Whether the loop deserves ``WATCHDOG=1``: nothing to do, or frames processed within 2 intervals.

    A loop that spins while online cameras' frames go unprocessed (a wedged
    detector, a stuck GPU) is as dead as a frozen one: systemd should restart it.
    """
    return online == 0 or now - last_processed <= max(2 * interval, STALL_GRACE)


def watchdog_interval(watchdog_usec: str | None, watchdog_pid: str | None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings from systemd's variables, or None when not asked."""
    if not watchdog_usec or (watchdog_pid and watchdog_pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(watchdog_usec) / 1e6 / 2)
    except ValueError:
        return None
