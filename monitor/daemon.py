"""The daemon: start the stages, run the pipeline loop, stop in reverse order.

Start-up: spool -> publisher (connects in the background) -> HTTP ->
detector (load, warm up; then /readyz and systemd's READY=1) -> one decoder
per camera. The loop waits on the decoders' pipes, lets each camera's
watchdog act, takes the newest frame of every ready camera, runs them
through the detector in one batch, then tracks, applies the alert rules and
publishes per camera. ``ExitStack`` unwinds in reverse: decoders stop first,
open events end, the publisher waits for in-flight PUBACKs and says
``offline`` last.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import socket
import threading
import time
from contextlib import ExitStack

from monitor.alerts import Alert, AlertRules
from monitor.api import Health, HttpServer, create_app
from monitor.detector import Detector
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.scheduler import Scheduler
from monitor.settings import Settings
from monitor.sources import Frame, Source
from monitor.spool import Spool
from monitor.tracking import CameraTracker

logger = logging.getLogger(__name__)

#: Longest the loop sleeps without a frame (watchdogs and stop checks run this often).
LOOP_TICK = 0.2
#: Seconds given to in-flight MQTT messages at shutdown.
SHUTDOWN_PUBLISH_TIMEOUT = 5.0


class SystemdNotifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET``; does nothing when not under systemd.

    Args:
        address: The socket path (``@`` for the abstract namespace), or None.
    """

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._target = "\0" + address[1:] if address.startswith("@") else address

    def notify(self, state: str) -> None:
        """Send one state line, e.g. ``READY=1``; failures are logged, never raised."""
        if self._sock is None:
            return
        try:
            self._sock.sendto(state.encode(), self._target)
        except OSError as exc:
            logger.warning("sd_notify %s failed: %s", state.split("=")[0], exc)


class Camera:
    """The per-camera stages after the detector: tracker and alert rules."""

    def __init__(self, name: str, settings: Settings, model: str, prefix: str) -> None:
        fps = settings.camera_fps(name)
        self.tracker = CameraTracker(settings.objects.tracker, fps, settings.objects.track)
        self.rules = AlertRules(name, settings.objects, model, f"{prefix}/{name}/{{label}}/snapshot")


class Daemon:
    """The monitoring daemon.

    Args:
        settings: The validated configuration.
        notify_socket: ``$NOTIFY_SOCKET`` under systemd.
        watchdog_interval: Seconds between ``WATCHDOG=1`` (half of ``WatchdogSec``), or None.
    """

    def __init__(
        self,
        settings: Settings,
        notify_socket: str | None = None,
        watchdog_interval: float | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health()
        self.sources: dict[str, Source] = {}
        self.cameras: dict[str, Camera] = {}
        self._notifier = SystemdNotifier(notify_socket)
        self._watchdog_interval = watchdog_interval
        self._last_watchdog = 0.0

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set.

        Raises:
            MonitorError: A stage could not start (bad model file, port taken, spool unusable).
        """
        settings = self.settings
        with ExitStack() as stack:
            spool = stack.enter_context(Spool(settings.spool.path))
            publisher = stack.enter_context(Publisher(settings.mqtt, spool, self.metrics))
            self.health.mqtt_connected = lambda: publisher.connected
            self.health.mqtt_error = lambda: publisher.last_error
            self.health.cameras = lambda: [s.status() for s in self.sources.values()]
            stack.enter_context(HttpServer(settings.http, create_app(self.metrics, self.health)))
            detector = Detector(settings.model)
            logger.info("warm-up took %.2f s", detector.warmup())
            self.health.model_ready = True
            self.metrics.ready.set(1)
            for name, camera in settings.cameras.items():
                self.cameras[name] = Camera(name, settings, detector.label, publisher.prefix)
                source = Source(
                    name, camera, settings.camera_fps(name), self.metrics, publisher.publish_status
                )
                self.sources[name] = stack.enter_context(source)
            stack.callback(self._end_open_events, publisher)
            self._notifier.notify("READY=1")
            logger.info("running with %d camera(s)", len(self.sources))
            self._loop(stop, detector, publisher)
            self._notifier.notify("STOPPING=1")
            logger.info("stopping")
            for source in self.sources.values():  # stop decoders before the stack unwinds
                source.close()

    def _loop(self, stop: threading.Event, detector: Detector, publisher: Publisher) -> None:
        scheduler = Scheduler(self.settings.detect.max_batch)
        while not stop.is_set():
            connections = [s.connection for s in self.sources.values() if s.connection is not None]
            mpc.wait(connections, timeout=LOOP_TICK)
            now = time.monotonic()
            for source in self.sources.values():
                source.drain()
                source.check(now)
                self.metrics.camera_frame_age.labels(source.name).set(source.last_frame_age(now))
            frames = scheduler.pick(self.sources.values())
            if frames:
                self._process(frames, detector, publisher)
            wall = time.time()
            seen = {f.camera for f in frames}
            for name, camera in self.cameras.items():
                if name not in seen:
                    ended = camera.rules.expire(wall)
                    if ended:
                        self._publish(ended, publisher)
            self.metrics.loop_iterations.inc()
            self._watchdog(now)

    def _process(self, frames: list[Frame], detector: Detector, publisher: Publisher) -> None:
        timings: dict[str, float] = {}
        detections = detector.detect([f.image for f in frames], timings)
        done = time.time()
        stage = self.metrics.stage_duration
        for name, seconds in timings.items():
            stage.labels(name).observe(seconds)
        self.metrics.batch_size.observe(len(frames))
        clock = time.perf_counter
        for frame, found in zip(frames, detections, strict=True):
            self.metrics.frames_processed.labels(frame.camera).inc()
            self.metrics.detect_latency.observe(max(0.0, done - frame.capture_time))
            camera = self.cameras[frame.camera]
            t0 = clock()
            tracked = camera.tracker.update(found, frame.capture_time)
            t1 = clock()
            alerts = camera.rules.update(tracked, frame)
            t2 = clock()
            stage.labels("tracking").observe(t1 - t0)
            stage.labels("alerts").observe(t2 - t1)
            if alerts:
                self._publish(alerts, publisher)
                stage.labels("publish").observe(clock() - t2)

    def _publish(self, alerts: list[Alert], publisher: Publisher) -> None:
        for alert in alerts:
            event = alert.event
            self.metrics.events.labels(event.camera, event.label, event.type).inc()
            logger.info(
                "%s %s %s score=%.2f track=%d",
                event.type,
                event.label,
                event.event_id,
                event.score,
                event.track_id,
                extra={"camera": event.camera},
            )
        publisher.publish(alerts)

    def _end_open_events(self, publisher: Publisher) -> None:
        ended = [a for camera in self.cameras.values() for a in camera.rules.expire(float("inf"))]
        if ended:
            self._publish(ended, publisher)

    def _watchdog(self, now: float) -> None:
        if self._watchdog_interval is None or now - self._last_watchdog < self._watchdog_interval:
            return
        self._last_watchdog = now
        online = sum(1 for s in self.sources.values() if s.state.value == "online")
        self._notifier.notify(f"WATCHDOG=1\nSTATUS={online}/{len(self.sources)} cameras online")


def watchdog_interval(watchdog_usec: str | None, watchdog_pid: str | None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings from systemd's variables, or None when not asked."""
    if not watchdog_usec or (watchdog_pid and watchdog_pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(watchdog_usec) / 1e6 / 2)
    except ValueError:
        return None
