"""The daemon's side of recording: clips of ended events and visits, the ring, retention.

Decoder children of recording cameras write the segments (``monitor.recording``);
this module decides what to keep and cuts the clips (``monitor.clips``) on a
thread of its own, so the pipeline loop only hands work over:

* the ``end`` of an event (and of a visit) on a recording camera is held back
  until the recording covers ``end + post_capture`` (the segment holding it
  is closed, or a deadline passed: a camera that went offline), then cut into
  ``<path>/<camera>/clips/<id>.mp4`` and released with ``clip`` set, or
  ``clip_error`` saying why. The loop publishes what ``done()`` returns;
* segments are kept while an open event may need them for its pre-roll,
  and deleted after (the ring); clips by age and by ``retention.max_bytes``
  (oldest first; segments only once no clip is left). An open visit does not
  hold the ring: a camera busy all day would keep a day of segments and push
  out the events' clips. A visit's clip is cut at its end from what the ring
  still holds, its events' periods (``cut_clip`` closes the gaps between);
* a journal (``<path>/<camera>/open/<id>.json``, the latest new/update of each
  open event and visit) survives ``kill -9``: after a restart each entry is
  ended with a clip cut from the segments left on disk, or ``clip_error``.

Nothing here touches the spool or the snapshot store.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from monitor.clips import ClipError, cut_clip, enforce_retention, list_segments, prune_segments, repair
from monitor.decoder import RecordingFailed, RecordTarget, SegmentClosed
from monitor.events import Alert, Event
from monitor.metrics import Metrics
from monitor.recording import clips_dir, failure_reason, segments_dir
from monitor.settings import RecordSettings
from monitor.visits import Review

logger = logging.getLogger(__name__)

#: Seconds between two passes of the ring and retention.
HOUSEKEEPING = 1.0
#: Retention keeps this many passes' worth of the camera's bit rate free for the segment being written.
HEADROOM_PASSES = 3
#: Seconds past ``end + post_capture + segment`` a clip waits for the recording to catch up.
CLIP_GRACE = 10.0
#: Ids of events and visits (hex tokens): the only names a clip file may have.
CLIP_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

Item = Alert | Review


@dataclass(slots=True)
class _Camera:
    name: str
    settings: RecordSettings
    directory: Path
    latest_end: float = 0.0  # end of the newest closed segment (written by the loop's thread)
    rate: float = 0.0  # bytes per second of the newest closed segment
    open_since: dict[str, float] = field(default_factory=dict)  # open event id -> start time


@dataclass(frozen=True, slots=True)
class _Job:
    camera: str
    clip_id: str
    start: float
    end: float
    deadline: float
    item: Item


def clip_path_of(item: Item) -> tuple[str, str]:
    """The id and HTTP path of an item's clip."""
    if isinstance(item, Alert):
        return item.event.event_id, f"/api/events/{item.event.event_id}/clip.mp4"
    return item.visit_id, f"/api/reviews/{item.visit_id}/clip.mp4"


class Recorder:
    """Clips, ring and retention of every recording camera; a context manager that runs the cutter.

    The loop's thread calls everything but the cutting, which runs on the recorder's thread.
    """

    def __init__(self, root: Path, metrics: Metrics) -> None:
        self.root = root
        self._metrics = metrics
        self._cameras: dict[str, _Camera] = {}
        self._jobs: list[_Job] = []
        self._done: list[tuple[Item, list[str]]] = []
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="monitor-clips", daemon=True)
        self._failing: dict[str, str] = {}
        self._housekeeping_problem: dict[str, str] = {}  # per camera, the last one logged

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_thread()

    def _stop_thread(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- cameras -------------------------------------------------------------
    def add_camera(self, name: str, settings: RecordSettings, recover: bool = True) -> RecordTarget:
        """Start recording camera ``name``.

        Args:
            recover: End what a killed daemon left open (the journal): on the first start of
                the camera in this process only, since a camera restarted by a reload has its
                ended events' clips already queued.
        """
        directory = settings.path / name
        camera = _Camera(name, settings, directory)
        self._metrics.clips.labels(name)
        try:
            for folder in (
                segments_dir(settings.path, name),
                clips_dir(settings.path, name),
                directory / "open",
            ):
                folder.mkdir(parents=True, exist_ok=True)
            segments = repair(segments_dir(settings.path, name))  # what a killed child left behind
            camera.latest_end = max((s.end for s in segments), default=0.0)
        except OSError as exc:  # a full or read-only disk: the camera runs, its clips fail, retried
            logger.error(
                "recording folder %s unusable: %s; detection and alerts go on",
                directory,
                exc.strerror or exc,
                extra={"camera": name},
            )
        with self._lock:
            self._cameras[name] = camera
        if recover:
            self._recover(camera)
        return RecordTarget(str(segments_dir(settings.path, name)), settings.segment)

    def remove_camera(self, name: str) -> None:
        """Stop managing a camera; its pending clips are cut with what is on disk."""
        with self._lock:
            camera = self._cameras.pop(name, None)
            if camera is not None:
                self._jobs = [replace(j, deadline=0.0) if j.camera == name else j for j in self._jobs]
                self._lock.notify_all()

    # -- messages from the decoder children (the loop's thread) ----------------
    def on_recording(self, name: str, message: SegmentClosed | RecordingFailed) -> None:
        camera = self._cameras.get(name)
        if camera is None:
            return
        if isinstance(message, SegmentClosed):
            camera.latest_end = max(camera.latest_end, message.end)
            camera.rate = message.bytes / max(message.end - message.start, 0.1)
            if self._failing.pop(name, None) is not None:
                logger.info("recording again", extra={"camera": name})
            with self._lock:
                self._lock.notify_all()
            return
        self._metrics.recording_segments_dropped.inc()
        if self._failing.get(name) != message.reason:
            self._failing[name] = message.reason
            logger.error(
                "recording stopped: %s; detection and alerts go on, recording retries",
                message.reason,
                extra={"camera": name},
            )

    # -- events and visits (the loop's thread) -------------------------------
    def hold(self, alerts: Sequence[Alert]) -> list[Alert]:
        """Journal new/update events of recording cameras; hold back their ends. Returns the rest."""
        now: list[Alert] = []
        for alert in alerts:
            event = alert.event
            camera = self._cameras.get(event.camera)
            if camera is None:
                now.append(alert)
            elif event.type == "end":
                self._opened(camera, event.event_id, None)
                self._add_job(camera, alert, event.start_time, event.end_time or event.frame_time)
            else:
                self._opened(camera, event.event_id, event.start_time)
                self._journal(camera, event.event_id, "event", event.model_dump_json(), event.frame_time)
                now.append(alert)
        return now

    def hold_review(self, review: Review) -> bool:
        """Journal a recording camera's open visit (``Visits.open``: its ``end_time`` is its latest
        sighting), or hold back its end for its clip; False: the camera does not record."""
        camera = self._cameras.get(review.camera)
        if camera is None:
            return False
        last = review.end_time or review.start_time
        if review.type == "end":
            self._add_job(camera, review, review.start_time, last)
            return True
        self._journal(camera, review.visit_id, "review", review.model_dump_json(), last)
        return False

    def done(self) -> list[tuple[Item, list[str]]]:
        """Items whose clip is cut (or failed), with the journal ids to forget once they are published."""
        if not self._done:
            return []
        with self._lock:
            done, self._done = self._done, []
        return done

    def published(self, ids: Sequence[str]) -> None:
        """Forget journal entries whose end is in the spool now."""
        for clip_id in ids:
            for camera in list(self._cameras.values()):
                (camera.directory / "open" / f"{clip_id}.json").unlink(missing_ok=True)

    def finish(self) -> list[tuple[Item, list[str]]]:
        """Cut every pending clip now with what is on disk (the daemon stops; decoders are gone).

        The cutting thread is stopped first: a clip it is cutting is finished and returned too.
        """
        self._stop_thread()
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            self._cut(job)
        return self.done()

    def clip(self, clip_id: str) -> Path | None:
        """The file of a clip by event or visit id (HTTP), or None."""
        if not CLIP_ID.match(clip_id):
            return None
        for camera in list(self._cameras.values()):
            path = clips_dir(camera.settings.path, camera.name) / f"{clip_id}.mp4"
            if path.is_file():
                return path
        return None

    # -- internals -------------------------------------------------------------
    def _opened(self, camera: _Camera, item_id: str, start: float | None) -> None:
        """Note an open event (its pre-roll stays in the ring), or its end (None)."""
        with self._lock:
            if start is None:
                camera.open_since.pop(item_id, None)
            else:
                camera.open_since.setdefault(item_id, start)

    def _journal(self, camera: _Camera, item_id: str, kind: str, body: str, last: float) -> None:
        path = camera.directory / "open" / f"{item_id}.json"
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"kind": kind, "last": last, "item": json.loads(body)}))
            tmp.replace(path)
        except OSError as exc:  # a full disk: the event goes on, only its recovery after a crash is lost
            logger.warning("cannot journal %s: %s", item_id, exc.strerror, extra={"camera": camera.name})

    def _add_job(self, camera: _Camera, item: Item, start: float, end: float) -> None:
        settings = camera.settings
        clip_id, _ = clip_path_of(item)
        stop = end + settings.post_capture
        job = _Job(
            camera.name,
            clip_id,
            start - settings.pre_capture,
            stop,
            stop + settings.segment + CLIP_GRACE,
            item,
        )
        with self._lock:
            self._jobs.append(job)
            self._lock.notify_all()

    def _recover(self, camera: _Camera) -> None:
        """End what the journal says was open when the daemon died; its clip comes from the disk."""
        entries = []
        for path in sorted((camera.directory / "open").glob("*.json")):
            try:
                entry = json.loads(path.read_text())
                entries.append((path, entry["kind"], float(entry["last"]), entry["item"]))
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning(
                    "unreadable journal entry %s removed", path.name, extra={"camera": camera.name}
                )
                path.unlink(missing_ok=True)
        for _, kind, last, item in entries:
            if kind == "event":
                event = Event.model_validate(item).model_copy(update={"type": "end", "end_time": last})
                logger.warning(
                    "ending event %s left open by the last run", event.event_id, extra={"camera": camera.name}
                )
                self._add_job(camera, Alert(event, None, last), event.start_time, last)
        for _, kind, last, item in entries:
            if kind == "review":
                review = Review.model_validate(item)
                known = [
                    e[2] for e in entries if e[1] == "event" and e[3].get("event_id") in review.event_ids
                ]
                end = max([last, *known])
                review = review.model_copy(update={"type": "end", "end_time": end})
                self._add_job(camera, review, review.start_time, end)

    def _run(self) -> None:
        next_housekeeping = 0.0
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.time()
                ready = [j for j in self._jobs if self._ready(j, now)]
                self._jobs = [j for j in self._jobs if j not in ready]
                if not ready and now < next_housekeeping:
                    self._lock.wait(min(1.0, next_housekeeping - now))
                    continue
            for job in ready:
                self._cut(job)
            if time.time() >= next_housekeeping:
                self._housekeeping(time.time())
                next_housekeeping = time.time() + HOUSEKEEPING

    def _ready(self, job: _Job, now: float) -> bool:
        camera = self._cameras.get(job.camera)
        return camera is None or camera.latest_end >= job.end or now >= job.deadline

    def _cut(self, job: _Job) -> None:
        clip_id, url = clip_path_of(job.item)
        root = self._root_of(job.camera)
        update: dict[str, str | None]
        try:
            segments = list_segments(segments_dir(root, job.camera))
            # Room first: the clip is at most the segments it is cut from, so the bound holds.
            size = sum(x.bytes for x in segments if x.end >= job.start and x.start <= job.end)
            self._housekeeping(time.time(), {job.camera: size}, {job.camera: job.start})
            cut_clip(segments, job.start, job.end, clips_dir(root, job.camera) / f"{clip_id}.mp4")
            update = {"clip": url, "clip_error": None}
            self._metrics.clips.labels(job.camera).inc()
        except (ClipError, OSError) as exc:  # OSError: the folder itself is gone or unreadable
            reason = exc.reason if isinstance(exc, ClipError) else failure_reason(exc, "recording unreadable")
            update = {"clip": None, "clip_error": reason}
            self._metrics.clip_failures.labels(job.camera, reason).inc()
            logger.warning("no clip for %s: %s", clip_id, reason, extra={"camera": job.camera})
        except Exception:  # a bug must not cost the event: it goes out without its clip
            logger.exception("cutting the clip of %s failed", clip_id, extra={"camera": job.camera})
            update = {"clip": None, "clip_error": "internal error"}
            self._metrics.clip_failures.labels(job.camera, "internal error").inc()
        item: Item
        if isinstance(job.item, Alert):
            # The wait for the recording is on purpose: the latency metric counts from here.
            event = job.item.event.model_copy(update=update)
            item = replace(job.item, event=event, capture_time=time.time())
        else:
            item = job.item.model_copy(update=update)
        with self._lock:
            self._done.append((item, [clip_id]))

    def _root_of(self, name: str) -> Path:
        camera = self._cameras.get(name)
        return camera.settings.path if camera is not None else self.root

    def _housekeeping(
        self, now: float, reserve: dict[str, int] | None = None, cutting: dict[str, float] | None = None
    ) -> None:
        """The ring (segments no open event can need) and retention, per camera.

        Retention leaves room for what is written until the next pass (the camera's bit
        rate), and for ``reserve`` bytes per camera (a clip about to be cut, whose segments
        from ``cutting`` on the ring keeps).
        """
        with self._lock:
            cameras = [
                (
                    camera,
                    min(camera.open_since.values(), default=now) - camera.settings.pre_capture,
                    min(
                        [j.start for j in self._jobs if j.camera == camera.name],
                        default=now,
                    ),
                )
                for camera in self._cameras.values()
            ]
        total = 0
        for camera, opened, pending in cameras:
            s = camera.settings
            keep = min(
                now - s.pre_capture - 2 * s.segment, opened, pending, (cutting or {}).get(camera.name, now)
            )
            try:
                prune_segments(segments_dir(s.path, camera.name), keep)
                room = HEADROOM_PASSES * HOUSEKEEPING * camera.rate + (reserve or {}).get(camera.name, 0)
                bound = max(0, int(s.retention.max_bytes - room))
                result = enforce_retention(camera.directory, s.retention.days * 86400, bound, now)
            except OSError as exc:  # said once per problem, not every second
                problem = failure_reason(exc, "recording folder unreadable")
                if self._housekeeping_problem.get(camera.name) != problem:
                    self._housekeeping_problem[camera.name] = problem
                    logger.warning("retention cannot run: %s", problem, extra={"camera": camera.name})
                continue
            self._housekeeping_problem.pop(camera.name, None)
            if result.segments_deleted:
                self._metrics.recording_segments_dropped.inc(result.segments_deleted)
            total += result.bytes
        self._metrics.recording_bytes.set(total)
