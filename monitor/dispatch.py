"""What happens to an alert after the rules: counted, kept, grouped into visits, held for its clip, sent.

The pipeline loop hands every batch of alerts to ``Dispatcher.publish``:

* suppressed ones (cooldown, rate limit) are only counted;
* the rest are counted and logged, their snapshots saved for the HTTP API;
* each camera's ``Visits`` (``monitor.visits``) turns them into review items
  on ``<prefix>/reviews``, one notification per visit;
* on a recording camera (``monitor.recorder``) the ``end`` of an event or a
  visit waits for its clip; ``tick`` sends what the recorder has finished;
* everything goes through the publisher's spool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from monitor.decoder import RecordTarget
from monitor.events import Alert
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.recorder import Recorder
from monitor.settings import Settings
from monitor.snapshots import SnapshotStore
from monitor.visits import Review, Visits

logger = logging.getLogger(__name__)


class Dispatcher:
    """Sends alerts and visits for the daemon's loop (one thread: the loop's).

    Args:
        publisher: Spools and sends.
        metrics: Event, review and snapshot counters.
        snapshots: Keeps each event's best JPEG for ``/api/events/<id>/snapshot.jpg``.
        recorder: Cuts the clips of recording cameras.
    """

    def __init__(
        self, publisher: Publisher, metrics: Metrics, snapshots: SnapshotStore, recorder: Recorder
    ) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._snapshots = snapshots
        self._recorder = recorder
        self._visits: dict[str, Visits] = {}
        self._recovered: set[str] = set()

    def add_camera(self, name: str, settings: Settings) -> RecordTarget | None:
        """Start a camera's visits and, when it records, its recording; where its child records."""
        self._visits[name] = Visits(name, settings.alerts_for(name), settings.visits.gap)
        for review_type in ("new", "update", "end"):
            self._metrics.reviews.labels(name, review_type)
        record = settings.record_for(name)
        if record is None:
            return None
        target = self._recorder.add_camera(name, record, recover=name not in self._recovered)
        self._recovered.add(name)
        return target

    def remove_camera(self, name: str, ended: list[Alert]) -> None:
        """Send a removed camera's last alerts, end its visit; its clips are still cut."""
        self.publish(ended)
        visits = self._visits.pop(name, None)
        if visits is not None:
            self._reviews(visits.close())
        self._recorder.remove_camera(name)

    def publish(self, alerts: Sequence[Alert]) -> None:
        """Count, keep and send a batch of alerts (the end of a recording camera's event waits)."""
        suppressed = [a for a in alerts if a.suppressed is not None]
        for alert in suppressed:
            self._metrics.events_suppressed.labels(alert.event.camera, alert.suppressed).inc()
        alerts = [a for a in alerts if a.suppressed is None]
        reviews: list[Review] = []
        for alert in alerts:
            event = alert.event
            self._metrics.events.labels(event.camera, event.label, event.type).inc()
            if alert.snapshot is not None:
                self._save_snapshot(event.event_id, alert.snapshot)
            logger.info(
                "%s %s %s score=%.2f track=%d",
                event.type,
                event.label,
                event.event_id,
                event.score,
                event.track_id,
                extra={"camera": event.camera},
            )
            visits = self._visits.get(event.camera)
            if visits is not None:
                reviews += visits.add(event)
        self._send(self._recorder.hold(alerts))
        self._reviews(reviews)
        for camera in {a.event.camera for a in alerts}:
            visits = self._visits.get(camera)
            visit = visits.open if visits is not None else None
            if visit is not None:  # the journal follows the visit (its end_time: the latest sighting)
                self._recorder.hold_review(visit)

    def tick(self, now: float | None = None) -> None:
        """End visits after their gap; send what the recorder finished."""
        wall = time.time() if now is None else now
        for visits in self._visits.values():
            ended = visits.expire(wall)
            if ended:
                self._reviews(ended)
        self._finished(self._recorder.done())

    def close(self) -> None:
        """The daemon stops: end every visit, cut the clips left with what is on disk, send it all."""
        for visits in self._visits.values():
            self._reviews(visits.close())
        self._finished(self._recorder.finish())

    # -- internals -------------------------------------------------------------
    def _reviews(self, reviews: list[Review]) -> None:
        """Send visits; a recording camera's visit ends wait for their clip."""
        self._send_reviews([r for r in reviews if r.type != "end" or not self._recorder.hold_review(r)])

    def _finished(self, done: list[tuple[Alert | Review, list[str]]]) -> None:
        if not done:
            return
        alerts = [item for item, _ in done if isinstance(item, Alert)]
        reviews = [item for item, _ in done if isinstance(item, Review)]
        self._send(alerts)
        self._send_reviews(reviews)
        self._recorder.published([i for _, ids in done for i in ids])

    def _send(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        try:
            self._publisher.publish(alerts)
        except Exception:  # it handles the spool's failures itself; anything else is a bug, not an exit
            logger.exception("cannot publish %d event(s)", len(alerts))

    def _send_reviews(self, reviews: list[Review]) -> None:
        if not reviews:
            return
        for review in reviews:
            self._metrics.reviews.labels(review.camera, review.type).inc()
        try:
            self._publisher.publish_reviews(list(reviews))
        except Exception:
            logger.exception("cannot publish %d visit(s)", len(reviews))

    def _save_snapshot(self, event_id: str, jpeg: bytes) -> None:
        """Keep the snapshot for the HTTP API; a failure there never costs the event."""
        try:
            saved = self._snapshots.save(event_id, jpeg)  # logs a full disk itself, once per burst
        except Exception:
            logger.exception("cannot save the snapshot of %s", event_id)
            saved = False
        if not saved:
            self._metrics.snapshot_save_failures.inc()
