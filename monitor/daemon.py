"""The daemon: start the stages, run the pipeline loop, stop in reverse order.

Start-up: publisher (opens the spool, or runs degraded while the disk cannot
take it; connects in the background) -> HTTP ->
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
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Literal

import supervision as sv

from monitor.api import Health, create_app
from monitor.camera import CameraPipeline
from monitor.classifier import load_classifier
from monitor.cluster import Shard, mine
from monitor.detector import Detector
from monitor.dispatch import Dispatcher
from monitor.errors import MonitorError
from monitor.frames import CameraState, Frame
from monitor.http_server import HttpServer
from monitor.loop import Loop, settled_heap
from monitor.metrics import Metrics
from monitor.notify import SystemdNotifier, Watchdog, watchdog_interval
from monitor.pipeline import PipelineStep, at_least
from monitor.publisher import Publisher
from monitor.recorder import Recorder
from monitor.scheduler import Request, RequestQueue, Scheduler
from monitor.settings import Settings
from monitor.snapshots import SnapshotStore
from monitor.sources import Source
from monitor.spool import Spool
from monitor.workers import TrackingWorkers

__all__ = ["Daemon", "watchdog_interval"]

logger = logging.getLogger(__name__)

SYNCHRONOUS: dict[str, Literal["FULL", "NORMAL", "AUTO"]] = {
    "full": "FULL",
    "normal": "NORMAL",
    "auto": "AUTO",
}
#: Uploaded pictures take at most 1/UPLOAD_SHARE of a batch next to camera frames.
UPLOAD_SHARE = 4
#: Sections read once at start (the model, connections, files, logging): a reload keeps them.
RESTART_SECTIONS = (
    "model",
    "classifier",
    "mqtt",
    "http",
    "spool",
    "snapshots",
    "record",
    "visits",
    "log",
    "cluster",
)
#: detect keys the detector and the loop read once at start (detect.fps applies on reload).
RESTART_DETECT_KEYS = ("max_batch", "max_wait_ms", "max_age_ms", "workers")


class Daemon:
    """The monitoring daemon.

    Args:
        settings: The validated configuration.
        notify_socket: ``$NOTIFY_SOCKET`` under systemd.
        watchdog_interval: Seconds between ``WATCHDOG=1`` (half of ``WatchdogSec``), or None.
        serve_only: ``monitor serve``: the HTTP API and the detector; no cameras, no MQTT.
        shard: This daemon's shard (default: the only one); it runs only the cameras it owns.
    """

    def __init__(
        self,
        settings: Settings,
        shard: Shard | None = None,
        notify_socket: str | None = None,
        watchdog_interval: float | None = None,
        serve_only: bool = False,
    ) -> None:
        self.settings = settings
        self.serve_only = serve_only
        self.shard = shard or Shard(0, 1, "shard-0")
        # Uploads get at most a quarter of a batch while cameras run (all of it in `serve`).
        share = settings.detect.max_batch if serve_only else settings.detect.max_batch // UPLOAD_SHARE
        self._upload_share = max(1, share)
        self.metrics = Metrics()
        self.health = Health()
        self.sources: dict[str, Source] = {}
        self.cameras: dict[str, CameraPipeline] = {}
        self._notifier = SystemdNotifier(notify_socket)
        self.watchdog = Watchdog(self._notifier, watchdog_interval, time.monotonic())
        #: True once start-up is over (READY=1 sent): a failure after that is a run-time failure.
        self.running = False

    def run(
        self,
        stop: threading.Event,
        reload: threading.Event | None = None,
        load: Callable[[], Settings] | None = None,
    ) -> None:
        """Run until ``stop`` is set.

        Args:
            stop: Set to shut down (SIGTERM, SIGINT).
            reload: Set to re-read the configuration with ``load`` (SIGHUP).
            load: Reads and validates the configuration again (raises ``ConfigError``).

        Raises:
            MonitorError: A stage could not start (bad model file, port taken). A spool
                that cannot be opened is not one: the publisher runs degraded (events wait
                in memory for their PUBACK) and tries the disk again.
        """
        self._reload_requested = reload or threading.Event()
        self._load = load
        settings = self.settings
        with ExitStack() as stack:
            publisher: Publisher | None = None
            if not self.serve_only:
                spool = settings.spool

                def open_spool() -> Spool:
                    durability = SYNCHRONOUS[spool.synchronous]
                    return Spool(spool.path, spool.max_events, spool.max_age, synchronous=durability)

                instance = self.shard.instance_id if self.shard.count > 1 else None
                # The publisher opens the spool, and on a full disk runs without it until it can.
                publisher = stack.enter_context(Publisher(settings.mqtt, open_spool, self.metrics, instance))
                self.health.mqtt_connected = lambda: publisher.connected
                self.health.mqtt_error = lambda: publisher.last_error
            self.health.cameras = lambda: [s.status() for s in self.sources.values()]
            self._snapshots = SnapshotStore(settings.snapshots.path, settings.snapshots.max_count)
            self.health.snapshot = self._snapshots.load
            recorder = stack.enter_context(Recorder(settings.record.path, self.metrics))
            self.health.clip = recorder.clip
            self._recorder = recorder
            self.health.degraded = lambda: self._degraded(publisher)
            requests = RequestQueue(settings.http.queue_size)
            stack.callback(requests.close, "the daemon is stopping")
            self.health.predict = requests.submit
            app = create_app(self.metrics, self.health, settings.http)
            stack.enter_context(HttpServer(settings.http, app))
            detector = Detector(settings.model, settings.detect.max_batch)
            self._net = detector.net_input
            logger.info("warm-up took %.2f s", detector.warmup())
            classifier = load_classifier(settings)
            # Read at scrape time, under systemd or not.
            self.metrics.gpu_memory.set_function(detector.memory_bytes)
            self.health.model_ready = True
            self.metrics.ready.set(1)
            workers = None
            if settings.detect.workers and publisher is not None:  # before the cameras' first frames
                restarts = self.metrics.tracker_restarts.inc
                workers = stack.enter_context(TrackingWorkers(settings.detect.workers, restarts))
            if publisher is not None:
                self._dispatch = Dispatcher(publisher, self.metrics, self._snapshots, recorder)
                stack.callback(self._end_open_events)
                stack.callback(self._close_sources)
                owned = mine(settings.cameras, self.shard)
                logger.info(
                    "shard %d of %d (%s): %d of %d camera(s)",
                    self.shard.index,
                    self.shard.count,
                    self.shard.instance_id,
                    len(owned),
                    len(settings.cameras),
                )
                for name in owned:
                    self._add_camera(name, settings, detector.label, publisher)
            # The one way out, for a stop and for an error alike: this stack unwinds, this
            # announcement first, then decoders stop, open events end, HTTP stops, and the
            # publisher waits for PUBACKs and says offline.
            stack.callback(self._announce_stop)
            self._notifier.notify("READY=1")
            self.running = True
            logger.info("running with %d camera(s)", len(self.sources))
            self._step = PipelineStep(
                detector,
                self.cameras,
                self.metrics,
                settings.model.conf,
                on_alerts=lambda alerts: self._dispatch.publish(alerts) if publisher is not None else None,
                classifier=classifier,
                workers=workers,
            )
            with settled_heap():
                self._loop(stop, detector, publisher, requests)

    def _announce_stop(self) -> None:
        self._notifier.notify("STOPPING=1")
        logger.info("stopping")

    def _degraded(self, publisher: Publisher | None) -> dict[str, str]:
        """What runs in a reduced way, for /readyz: the spool and the snapshot store."""
        degraded = {}
        spool = publisher.degraded if publisher is not None else None
        if spool is not None:
            degraded["spool"] = f"{spool}; events wait in memory for their PUBACK"
        if self._snapshots.problem is not None:
            degraded["snapshots"] = self._snapshots.problem
        return degraded

    def _add_camera(self, name: str, settings: Settings, model: str, publisher: Publisher) -> None:
        camera = settings.cameras[name]
        self.cameras[name] = CameraPipeline(name, settings, model, publisher.topics, self.shard.instance_id)
        record = self._dispatch.add_camera(name, settings)
        source = Source(
            name,
            camera,
            settings.camera_fps(name),
            self.metrics,
            publisher.publish_status,
            record=record,
            on_recording=self._recorder.on_recording,
            net=self._net,
        )
        self.sources[name] = source.__enter__()

    def _remove_camera(self, name: str, publisher: Publisher, forget: bool = True) -> None:
        self.sources.pop(name).close()
        if forget:
            publisher.forget_status(name)
        self._dispatch.remove_camera(name, self.cameras.pop(name).rules.expire(float("inf")))
        self.metrics.remove_camera(name)

    def _close_sources(self) -> None:
        for source in self.sources.values():
            source.close()

    def _apply_reload(self, model: str, publisher: Publisher | None) -> None:
        """Re-read the configuration; add, remove and restart only the cameras that changed."""
        self._reload_requested.clear()
        if self._load is None or publisher is None:
            return
        logger.info("reloading the configuration")
        try:
            new = self._load()
        except MonitorError as exc:
            logger.error("reload rejected, the running configuration stays: %s", exc)
            return
        except Exception:  # whatever the new file holds, a reload never ends the daemon
            logger.exception("reload failed unexpectedly, the running configuration stays")
            return
        try:
            self._reconfigure(new, model, publisher)
        except Exception:
            logger.exception(
                "reload failed while applying it; cameras started so far run, the others as before"
            )

    def _reconfigure(self, new: Settings, model: str, publisher: Publisher) -> None:
        """Take a validated configuration: keep what needs a restart, restart cameras that changed."""
        old = self.settings
        fixed = [k for k in RESTART_SECTIONS if getattr(old, k) != getattr(new, k)]
        fixed_detect = [k for k in RESTART_DETECT_KEYS if getattr(old.detect, k) != getattr(new.detect, k)]
        if fixed or fixed_detect:
            changed = [*fixed, *(f"detect.{k}" for k in fixed_detect)]
            logger.warning("changes to %s take effect after a restart", ", ".join(changed))
        # Keep what needs a restart, take the rest.
        detect = new.detect.model_copy(update={k: getattr(old.detect, k) for k in fixed_detect})
        self.settings = new.model_copy(update={**{k: getattr(old, k) for k in fixed}, "detect": detect})
        rebuild_all = (old.objects, old.detect) != (self.settings.objects, self.settings.detect)
        wanted = set(mine(new.cameras, self.shard))
        for name in sorted(set(self.sources) - wanted):
            logger.info("camera removed", extra={"camera": name})
            self._remove_camera(name, publisher)
        for name in sorted(wanted):
            if name in self.sources and not rebuild_all and old.cameras.get(name) == new.cameras[name]:
                continue
            if name in self.sources:
                logger.info("camera changed: restarting it", extra={"camera": name})
                self._remove_camera(name, publisher, forget=False)
            else:
                logger.info("camera added", extra={"camera": name})
            self._add_camera(name, self.settings, model, publisher)
        logger.info("reload done: %d camera(s)", len(self.sources))

    def _loop(
        self, stop: threading.Event, detector: Detector, publisher: Publisher | None, requests: RequestQueue
    ) -> None:
        detect = self.settings.detect
        scheduler = Scheduler(detect.max_batch, detect.max_age_ms / 1000 if detect.max_age_ms else None)

        def chores(now: float) -> None:
            self._expire_tracks(publisher)
            online = sum(1 for s in self.sources.values() if s.state is CameraState.ONLINE)
            self.watchdog.tick(now, online, len(self.sources))

        loop = Loop(
            self.sources,
            scheduler,
            detect.max_wait_ms / 1000,
            self._process,
            chores,
            self.metrics,
            requests,
            self._upload_share,
        )
        while not stop.is_set():
            if self._reload_requested.is_set():
                self._apply_reload(detector.label, publisher)
            loop.turn()

    def _expire_tracks(self, publisher: Publisher | None) -> None:
        """End the tracks of cameras that have gone quiet (those with frames end theirs as they go)."""
        if publisher is None:
            return
        wall = time.time()
        for camera in self.cameras.values():
            ended = camera.rules.expire(wall)
            if ended:
                self._dispatch.publish(ended)
        self._dispatch.tick(wall)

    def _process(self, frames: list[Frame], uploads: list[Request]) -> None:
        def answer(found: list[sv.Detections]) -> None:
            for upload, detections in zip(uploads, found, strict=True):
                if upload.result.set_running_or_notify_cancel():
                    upload.result.set_result(at_least(detections, upload.conf))

        conf = min((u.conf for u in uploads), default=None)
        try:
            self._step.run(frames, [u.image for u in uploads], conf, on_pictures=answer)
        except Exception as exc:
            for upload in uploads:  # never leave an HTTP request hanging
                if not upload.result.done():
                    upload.result.set_exception(RuntimeError(f"detection failed: {exc}"))
            raise
        self.watchdog.processed(len(frames), time.monotonic())

    def _end_open_events(self) -> None:
        ended = [a for camera in self.cameras.values() for a in camera.rules.expire(float("inf"))]
        self._dispatch.publish(ended)
        self._dispatch.close()
