"""MQTT publishing (QoS 1) behind the on-disk spool: no alert is lost.

Topics: ``monitor.topics``; the broker connection: ``monitor.mqtt_connection``.

Events, visits and snapshots go to the spool first, then to paho, which keeps
them (re-sent after a reconnect) until the broker's PUBACK deletes them from
the spool. Camera status and availability are state: re-published on every
connect, not spooled.

At most ``WINDOW`` spooled messages are in paho's hands at a time
(``monitor.window``); the rest wait on disk, bounded by ``spool.max_events``
and ``spool.max_age``. A row the spool drops to stay within its bounds may
still be delivered if paho already holds it.

Under MQTT 5 a PUBACK that says failure (0x87 not authorized: the broker's
ACL denies the topic) leaves the row in the spool, logged and counted in
``monitor_mqtt_publish_refused_total``, to be sent again on the next start.
MQTT 3.1.1 has no such code and Mosquitto acknowledges a denied publish, so
there that message is lost: ``mqtt.protocol: "5"`` is the safer choice.

When the spool cannot be written, nothing stops: events go to paho directly
and wait in memory, bounded, until their PUBACK; the spool takes over once it
can be written (``monitor.held``), and deletes of acknowledged rows that
failed are retried then (meanwhile a row is at worst a duplicate later).

A message paho refuses outright (a topic with an MQTT wildcard: a label like
``per+son``) can never be sent: it is moved to the spool's quarantine table,
logged and counted in ``monitor_spool_quarantined_total``, not replayed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel

from monitor.alerts import Alert
from monitor.errors import PublishError
from monitor.frames import CameraStatus
from monitor.held import Held
from monitor.metrics import Metrics
from monitor.mqtt_connection import Connection
from monitor.settings import MqttSettings
from monitor.spool import Message, Outgoing, Spool, Stored
from monitor.topics import Topics
from monitor.window import MAX_INFLIGHT, Window

logger = logging.getLogger(__name__)

#: Least and most seconds between connection attempts (the delay doubles).
RECONNECT_MIN = 1
RECONNECT_MAX = 30
#: Seconds between checks for messages older than ``spool.max_age``.
TRIM_INTERVAL = 60.0
#: Seconds the end of ``with Publisher(...)`` waits for in-flight PUBACKs (the rest stay spooled).
SHUTDOWN_TIMEOUT = 5.0
CLOSE_POLL = 0.1
#: Markers on the PUBACK queue: the broker connected (hand held messages over); degraded (retry timer).
_CONNECTED = "connected"
_WAKE = "wake"


class Publisher:
    """Delivers alerts at least once; a context manager that connects and disconnects.

    ``publish`` may be called from one thread at a time (the pipeline loop);
    PUBACKs are handled on a thread of its own.

    Args:
        settings: The ``mqtt`` section.
        spool: Where messages wait for their PUBACK; or a function that opens it, which
            the publisher calls on entry and, while it fails, every ``SPOOL_RETRY`` seconds
            (meanwhile it runs degraded), and whose spool it closes at the end.
        metrics: Latency, connection and spool metrics.
        instance: The instance id when several daemons share the broker.

    Raises:
        PublishError: The TLS files cannot be loaded.
    """

    def __init__(
        self,
        settings: MqttSettings,
        spool: Spool | Callable[[], Spool],
        metrics: Metrics,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        #: Every topic this daemon publishes on.
        self.topics = Topics(settings.topic_prefix, instance)
        self._spool: Spool | None = spool if isinstance(spool, Spool) else None
        self._open_spool = None if isinstance(spool, Spool) else spool
        self._metrics = metrics
        # Guards _window, _held, _unremoved and paho publish calls.
        self._lock = threading.Lock()
        # Keeps spool order and hand-over order the same; taken before _lock.
        self._publishing = threading.Lock()
        self._held = Held(metrics)  # while the spool cannot be written
        self._unremoved: list[int] = []  # acknowledged rows whose delete failed
        # PUBACKs (mid, time, reason), _CONNECTED after a connect, _WAKE, None to stop.
        self._acks: queue.SimpleQueue[tuple[int, float, ReasonCode] | str | None] = queue.SimpleQueue()
        self._refused_topics: set[str] = set()
        self._idle = threading.Condition(self._lock)
        self._connection = Connection(
            settings,
            self.topics.available(),
            self._connection_changed,
            self._on_ack,
            max_inflight=MAX_INFLIGHT,
            reconnect=(RECONNECT_MIN, RECONNECT_MAX),
        )
        self._window = Window(self._connection, self.topics, self._held, self._quarantine)
        self._acker = threading.Thread(target=self._ack_loop, name="monitor-mqtt-acks", daemon=True)

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Publisher:
        if self._spool is None:
            self._try_open()
        if self._spool is not None:
            try:
                self._metrics.spool_dropped.inc(self._spool.trim())
            except PublishError as exc:
                self._degrade(str(exc))
        self._acker.start()
        try:
            self._connection.start()
        except PublishError:
            self._acks.put(None)  # ends the PUBACK thread
            if self._open_spool is not None and self._spool is not None:
                self._spool.close()
            raise
        self._metrics.spool_oldest_age.set_function(self._oldest_age)
        replay = self._pending()
        if replay:
            logger.info("replaying %d spooled message(s)", replay)
        with self._lock:
            self._window.backlog = True
            self._window.fill(self._spool)
        self._metrics.spool_pending.set(self._pending())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(SHUTDOWN_TIMEOUT)

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for in-flight PUBACKs, publish ``offline``, disconnect."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._window and self._connection.connected and time.monotonic() < deadline:
                self._idle.wait(CLOSE_POLL)  # woken by the last PUBACK; polls for a lost broker
        left = self._pending()
        if left:
            logger.warning("%d message(s) not acknowledged at shutdown; they stay in the spool", left)
        self._connection.close(deadline)
        self._acks.put(None)
        self._acker.join(timeout=1.0)
        if self._held.reason is not None:  # a last try: what is held in memory survives on disk
            self._retry_spool(hand_over=False)
        with self._lock:
            lost = len(self._held)
        if lost:
            logger.error(
                "%d message(s) held in memory (the spool could not be written) were not acknowledged "
                "at shutdown and are lost",
                lost,
            )
        if self._open_spool is not None and self._spool is not None:
            self._spool.close()

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connection.connected

    @property
    def last_error(self) -> str | None:
        """Why there is no connection (``unauthorized (...)``, ``TLS error: ...``), or None."""
        return self._connection.last_error

    @property
    def in_flight(self) -> int:
        """Messages handed to paho and not yet acknowledged (at most ``WINDOW``)."""
        with self._lock:
            return len(self._window)

    @property
    def degraded(self) -> str | None:
        """Why the spool cannot be written right now (messages wait in memory), or None."""
        return self._held.reason

    @property
    def held(self) -> int:
        """Messages held in memory, not acknowledged, because the spool could not be written."""
        with self._lock:
            return len(self._held)

    def _pending(self) -> int:
        return self._spool.count() if self._spool is not None else 0

    def _oldest_age(self) -> float:
        return self._spool.oldest_age() if self._spool is not None else 0.0

    # -- publishing ----------------------------------------------------------
    def publish(self, alerts: list[Alert]) -> None:
        """Spool and send alerts: the event, and the snapshot of new events.

        Never raises for the spool: one that cannot be written degrades to holding the
        messages in memory until their PUBACK (see the module's docstring).
        """
        outgoing = []
        for alert in alerts:
            event = alert.event
            outgoing.append(
                Outgoing(self.topics.events(), event.model_dump_json().encode(), False, alert.capture_time)
            )
            if alert.snapshot is not None and event.snapshot is not None:
                outgoing.append(Outgoing(event.snapshot, alert.snapshot, True, None))
        self._send(outgoing)

    def publish_reviews(self, reviews: list[BaseModel]) -> None:
        """Spool and send visits (``monitor.visits.Review``) on ``<prefix>/reviews``, as events are."""
        self._send([Outgoing(self.topics.reviews(), r.model_dump_json().encode()) for r in reviews])

    def _send(self, outgoing: list[Outgoing]) -> None:
        if not outgoing:
            return
        with self._publishing:
            stored = None
            if self._held.reason is None and self._spool is not None:
                try:
                    stored = self._spool.put(outgoing)
                except PublishError as exc:
                    self._degrade(str(exc))
            with self._lock:
                if stored is None:
                    self._held.hold(outgoing)
                    self._window.fill(self._spool)
                elif self._window.fits(len(stored.messages)):
                    for message in stored.messages:
                        self._window.send(message)
                else:
                    self._window.backlog = True
                    self._window.fill(self._spool)
        if stored is not None:  # the spool logs what it drops to stay within its bounds
            self._metrics.spool_dropped.inc(stored.dropped)
        self._metrics.spool_pending.set(self._pending())

    def publish_status(self, status: CameraStatus) -> None:
        """Publish a camera's state (retained); re-sent on every reconnect."""
        body = {**asdict(status), "state": status.state.value}
        del body["camera"]
        self._connection.retain(self.topics.status(status.camera), json.dumps(body).encode())

    def forget_status(self, camera: str) -> None:
        """Clear a removed camera's retained status (an empty retained message deletes it)."""
        self._connection.retain(self.topics.status(camera), b"")

    # -- the spool, or memory while it cannot be written ---------------------------
    def _degrade(self, reason: str) -> None:
        """The spool cannot be written: hold messages in memory until it can (``monitor.held``)."""
        with self._lock:
            first = self._held.degrade(reason)
        if first:  # the PUBACK thread may be asleep until the next trim: retries start now
            self._acks.put(_WAKE)

    def _try_open(self) -> None:
        """Open the spool with the function given for it; degrade (or stay so) when that fails."""
        assert self._open_spool is not None
        try:
            spool = self._open_spool()
        except PublishError as exc:
            self._degrade(str(exc))
            return
        self._spool = spool
        if self._held.reason is not None:
            logger.info("the spool %s could be opened", spool.path)

    def _retry_spool(self, hand_over: bool = True) -> None:
        """Try the spool again: open it, finish failed deletes, write what memory holds, in order.

        On success the spool takes over; messages already in paho's hands keep their place
        (their PUBACK deletes the row written for them), the rest follow from the spool.
        """
        with self._publishing:
            self._held.retry_later()
            if self._spool is None:
                self._try_open()
            spool = self._spool
            if spool is None:
                return
            with self._lock:
                held = self._held.messages()
                unremoved = list(self._unremoved)
            stored = Stored([], 0)
            try:
                for message_id in unremoved:
                    spool.remove(message_id)
                    with self._lock:
                        self._unremoved.remove(message_id)
                if held:
                    stored = spool.put([Outgoing(m.topic, m.payload, m.retain, m.capture_time) for m in held])
                else:
                    spool.probe()
            except PublishError as exc:
                self._degrade(str(exc))
                return
            with self._lock:
                # The newest rows are kept when the batch alone is over max_events.
                kept = held[len(held) - len(stored.messages) :]
                self._window.written({m.id: row for m, row in zip(kept, stored.messages, strict=True)})
                self._held.restored(len(held))
                if hand_over:
                    self._window.backlog = True
                    self._window.fill(self._spool)
        self._metrics.spool_dropped.inc(stored.dropped)
        self._metrics.spool_pending.set(self._pending())

    # -- what MQTT cannot carry -----------------------------------------------------
    def _quarantine(self, message: Message, reason: str) -> None:
        """Take a message MQTT will never carry out of the queue, so it blocks nothing. Holds ``_lock``."""
        self._metrics.spool_quarantined.inc()
        where = "held in memory"
        if message.id < 0:
            self._held.release(message.id)
        elif self._spool is not None:
            try:
                self._spool.quarantine(message.id, reason)
                where = "moved to the spool's quarantine table"
            except PublishError as exc:  # deleted with the failed deletes once the disk works
                self._unremoved.append(message.id)
                where = f"to be deleted from the spool ({exc})"
        logger.error(
            "MQTT cannot carry message %d on topic %r: %s; it is dropped (%s), further messages are "
            "not held up, and monitor_spool_quarantined_total counts it",
            message.id,
            message.topic,
            reason,
            where,
        )

    # -- from the connection (paho's thread) -------------------------------------
    def _connection_changed(self, connected: bool) -> None:
        self._metrics.mqtt_connected.set(1 if connected else 0)
        if self._spool is not None:
            try:  # synchronous=AUTO: NORMAL while connected, FULL while not
                self._spool.broker_connected(connected)
            except PublishError as exc:  # a full disk: the checkpoint could not grow the database
                logger.warning("%s; the spool keeps its previous durability", exc)
        if connected:
            self._acks.put(_CONNECTED)  # the PUBACK thread hands over what memory holds

    def _on_ack(self, mid: int, reason: ReasonCode) -> None:
        self._acks.put((mid, time.time(), reason))

    # -- PUBACK handling (own thread: SQLite stays off paho's thread) -----------
    def _ack_loop(self) -> None:
        next_trim = time.monotonic() + TRIM_INTERVAL
        while True:
            degraded = self._held.reason is not None
            due = min(next_trim, self._held.next_retry) if degraded else next_trim
            try:
                item = self._acks.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                pass  # a tick: only the chores below
            else:
                if item is None:
                    return
                if item == _CONNECTED:
                    with self._lock:
                        self._window.fill(self._spool)
                elif isinstance(item, tuple):
                    self._ack(*item)
            # Checked after every PUBACK too, so a steady stream of them cannot starve these.
            now = time.monotonic()
            if now >= next_trim:
                next_trim = now + TRIM_INTERVAL
                self._trim()
            if self._held.reason is not None and now >= self._held.next_retry:
                self._retry_spool()

    def _ack(self, mid: int, when: float, reason: ReasonCode) -> None:
        with self._lock:
            message = self._window.acknowledged(mid)
            if message is None:
                return  # availability or status: nothing spooled
            if self._window.backlog or self._held.waiting:
                self._window.fill(self._spool)
            if not self._window:
                self._idle.notify_all()
        self._acked(message, when, reason)

    def _acked(self, message: Message, when: float, reason: ReasonCode) -> None:
        if reason.is_failure:  # MQTT 5 only, e.g. 0x87 when the ACL forbids the topic
            self._refused(message, reason)
            return
        if message.capture_time is not None:
            self._metrics.alert_latency.observe(max(0.0, when - message.capture_time))
        if message.id < 0:  # held in memory: delivered, nothing on disk
            with self._lock:
                self._held.release(message.id)
            return
        spool = self._spool
        assert spool is not None  # rows come from it
        try:
            spool.remove(message.id)
        except PublishError as exc:  # delivered: the row is deleted once the spool can be written
            with self._lock:
                self._unremoved.append(message.id)
            self._degrade(str(exc))
        self._metrics.spool_pending.set(spool.count())

    def _refused(self, message: Message, reason: ReasonCode) -> None:
        """A PUBACK with a failure code: not delivered, so the row stays in the spool.

        It is not re-sent on this connection (the broker would refuse it again);
        the next start replays it, after whoever runs the broker fixed the cause.
        Each topic's first refusal is an error, repeats are debug and counted.
        """
        self._metrics.mqtt_refused.inc()
        first = message.topic not in self._refused_topics  # only this thread touches the set
        self._refused_topics.add(message.topic)
        logger.log(
            logging.ERROR if first else logging.DEBUG,
            "the broker refused spool row %d on %s: %s (does its ACL let user %r publish there?); "
            "the message stays in the spool and is sent again when the daemon restarts; further "
            "refusals are counted in monitor_mqtt_publish_refused_total",
            message.id,
            message.topic,
            reason,
            self.settings.username,
        )
        self._metrics.spool_pending.set(self._pending())

    def _trim(self) -> None:
        """Drop expired rows; truncate the WAL when the spool is empty. Skipped while degraded."""
        if self._spool is None or self._held.reason is not None:
            return
        try:
            self._metrics.spool_dropped.inc(self._spool.trim())
            self._spool.compact()
        except PublishError as exc:
            logger.warning("cannot trim the spool: %s", exc)
        self._metrics.spool_pending.set(self._pending())
