"""MQTT publishing (paho-mqtt 2, QoS 1, MQTT 3.1.1 or 5, optional TLS) behind the on-disk spool.

Topics (``P`` is ``mqtt.topic_prefix``):

* ``P/available`` (``P/instances/<id>/available`` when several daemons share
  the cameras): retained ``online`` / ``offline``; ``offline`` is also the
  last will, so a crash reads the same as a clean stop;
* ``P/events``: one JSON ``Event`` per message, and the same on
  ``P/<camera>/<category>``;
* ``P/<camera>/<label>/snapshot``: retained annotated JPEG of an event's best frame;
* ``P/<camera>/status``: retained JSON camera state.

Events and snapshots go to the spool first, then to paho, which keeps them
(and re-sends them after a reconnect) until the broker's PUBACK; the PUBACK
deletes them from the spool. Camera status and availability are state, not
history: they are re-published on every connect instead of spooled.

At most ``WINDOW`` spooled messages are in paho's hands at a time; the rest
wait on disk and are handed over, oldest first, as PUBACKs free room. So a
broker that is gone for days costs disk (bounded by ``spool.max_events`` and
``spool.max_age``), not memory. A row the spool drops to stay within its
bounds may still be delivered if paho already holds it.

Under MQTT 5 a PUBACK carries a reason code: one that says failure (0x87
not authorized, when the broker's ACL denies the topic) leaves the row in the
spool, logged and counted in ``monitor_mqtt_publish_refused_total``, to be
sent again on the next start. MQTT 3.1.1 has no such code, and Mosquitto
PUBACKs a publish its ACL denies like any other, so under 3.1.1 that message
is deleted and lost: ``mqtt.protocol: "5"`` is the safer choice.

When the spool cannot be written (a full or read-only disk, or a spool file
that could not even be opened at start), nothing stops: events go to paho
directly, still QoS 1, and wait in memory (at most ``HELD_MAX_BYTES``, plus
the ``WINDOW`` in paho's hands) until their PUBACK; while the broker is away
they stay out of paho's queue, which has no bound, and past the bound the
oldest are dropped and counted in ``monitor_spool_bypass_dropped_total``.
``monitor_spool_degraded`` is 1 and ``degraded`` says why (for ``/readyz``),
with one log line when it starts and one when it ends. Every
``SPOOL_RETRY`` seconds the disk is tried again; once a write succeeds, what
is held in memory is written to the spool, in order, and the spool takes over.
A PUBACK whose row cannot be deleted is retried then (until then the row
would only be a duplicate at the next start).

A message paho refuses outright (a topic with an MQTT wildcard, which a
label like ``per+son`` makes) can never be sent: it is moved to the spool's
quarantine table, logged and counted in ``monitor_spool_quarantined_total``,
instead of being replayed at every start.

Connection failures never raise: paho retries with backoff
(``RECONNECT_MIN`` doubling to ``RECONNECT_MAX`` seconds) while events keep
going to the spool. Each new kind of failure is logged once and kept in
``last_error`` (``unauthorized (...)``, ``TLS error: ...``,
``connection refused``) for ``/readyz``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from monitor.alerts import Alert
from monitor.errors import PublishError
from monitor.metrics import Metrics
from monitor.settings import MqttSettings, TlsSettings
from monitor.sources import CameraStatus
from monitor.spool import Message, Outgoing, Spool, Stored

logger = logging.getLogger(__name__)

RECONNECT_MIN = 1
RECONNECT_MAX = 30
#: Messages sent before their PUBACK; more wait in paho's queue.
MAX_INFLIGHT = 100
#: Most spooled messages handed to paho at once (in flight or queued); the rest wait on disk.
WINDOW = 2 * MAX_INFLIGHT
#: Seconds between checks for messages older than ``spool.max_age``.
TRIM_INTERVAL = 60.0
#: Seconds between attempts to write to (or open) a spool that could not be written.
SPOOL_RETRY = 5.0
#: Most payload bytes held in memory while the spool cannot be written (about 300 snapshots).
HELD_MAX_BYTES = 32 * 1024 * 1024
CLOSE_POLL = 0.1
#: MQTT 3.1.1 CONNACK 4/5 and MQTT 5 0x86/0x87: bad user name or password / not authorized.
_UNAUTHORIZED = (4, 5, 0x86, 0x87)
_SSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")
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
        self.prefix = settings.topic_prefix
        # One daemon says P/available; each of several says P/instances/<id>/available,
        # so that one stopping does not mark the others offline.
        self._events_topic = self.topic("events")
        self.available_topic = (
            self.topic("instances", instance, "available")
            if instance is not None
            else self.topic("available")
        )
        self._spool: Spool | None = spool if isinstance(spool, Spool) else None
        self._open_spool = None if isinstance(spool, Spool) else spool
        self._metrics = metrics
        # Guards _inflight, _handed, _skip, _backlog, the held messages, _degraded, _unremoved
        # and paho publish calls.
        self._lock = threading.Lock()
        # Keeps spool order and hand-over order the same; taken before _lock.
        self._publishing = threading.Lock()
        self._inflight: dict[int, Message] = {}
        self._handed = 0  # highest spool id given to paho
        self._skip: set[int] = set()  # spool ids above _handed already in paho's hands
        self._backlog = False  # rows on disk not yet given to paho
        # While the spool cannot be written: messages not yet acknowledged, by negative id
        # (in order; those in paho's hands first), the ones not yet handed over, their bytes.
        self._degraded: str | None = None
        self._held: dict[int, Message] = {}
        self._waiting: deque[Message] = deque()
        self._held_bytes = 0
        self._held_seq = 0
        self._bypassed = self._bypass_dropped = 0  # in this degraded period, for the summary
        self._unremoved: list[int] = []  # acknowledged rows whose delete failed
        self._next_retry = 0.0  # monotonic time of the next attempt at the spool
        self._dropping = False
        self._burst_dropped = 0
        # PUBACKs (mid, time, reason), _CONNECTED after a connect, _WAKE, None to stop.
        self._acks: queue.SimpleQueue[tuple[int, float, ReasonCode] | str | None] = queue.SimpleQueue()
        self._statuses: dict[str, bytes] = {}
        self._refused_topics: set[str] = set()
        self._connected = threading.Event()
        self._idle = threading.Condition(self._lock)
        self.last_error: str | None = None
        self._socket_error: OSError | None = None  # set on paho's thread, read in _on_disconnect
        self._client = self._make_client(settings)
        self._acker = threading.Thread(target=self._ack_loop, name="monitor-mqtt-acks", daemon=True)

    def _make_client(self, settings: MqttSettings) -> mqtt.Client:
        v5 = settings.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            # Our own session need not outlive a connection: paho re-sends what
            # was not acknowledged, and the spool covers our restarts.
            clean_session=None if v5 else True,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        tls = settings.tls
        if tls.enabled:
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(tls.cert_file) if tls.cert_file else None,
                    keyfile=str(tls.key_file) if tls.key_file else None,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise PublishError(_describe_tls_files(settings.tls, exc)) from exc
            if tls.insecure:
                client.tls_insecure_set(True)
                logger.warning(
                    "mqtt.tls.insecure is true: the broker's certificate is not checked against "
                    "mqtt.host %r, so anyone with a certificate from the same CA can pose as the broker",
                    settings.host,
                )
        client.will_set(self.available_topic, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    def topic(self, *parts: str) -> str:
        """``<prefix>/<part>/...``."""
        return "/".join((self.prefix, *parts))

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Publisher:
        if self._spool is None:
            self._try_open()
        if self._spool is not None:
            try:
                self._account_drops(self._spool.trim())
            except PublishError as exc:
                self._degrade(str(exc))
        self._acker.start()
        try:
            # MQTT 5 has clean_start per connection where 3.1.1 has clean_session per client.
            clean_start = True if self.settings.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY
            self._client.connect_async(
                self.settings.host, self.settings.port, self.settings.keepalive, clean_start=clean_start
            )
        except (OSError, ValueError) as exc:
            self._acks.put(None)  # ends the PUBACK thread
            if self._open_spool is not None and self._spool is not None:
                self._spool.close()
            raise PublishError(
                f"cannot connect to MQTT {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        self._metrics.spool_oldest_age.set_function(self._oldest_age)
        self._client.loop_start()
        replay = self._pending()
        if replay:
            logger.info("replaying %d spooled message(s)", replay)
        with self._lock:
            self._backlog = True
            self._fill()
        self._metrics.spool_pending.set(self._pending())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(timeout=5.0)

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for in-flight PUBACKs, publish ``offline``, disconnect."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and self._connected.is_set() and time.monotonic() < deadline:
                self._idle.wait(CLOSE_POLL)  # woken by the last PUBACK; polls for a lost broker
        left = self._pending()
        if left:
            logger.warning("%d message(s) not acknowledged at shutdown; they stay in the spool", left)
        if self._connected.is_set():
            info = self._client.publish(self.available_topic, "offline", qos=1, retain=True)
            # Not sent in time: the broker's last will says offline instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        self._acks.put(None)
        self._acker.join(timeout=1.0)
        if self._degraded is not None:  # a last try: what is held in memory survives on disk
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
        # paho closes its wake-up socket pair only in Client.__del__. Our callbacks
        # refer back to us; dropping them lets that run as soon as we are dropped,
        # not whenever the garbage collector gets to the cycle (a ResourceWarning).
        self._client.on_connect = self._client.on_connect_fail = None
        self._client.on_disconnect = self._client.on_publish = None

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    @property
    def in_flight(self) -> int:
        """Messages handed to paho and not yet acknowledged (at most ``WINDOW``)."""
        with self._lock:
            return len(self._inflight)

    @property
    def degraded(self) -> str | None:
        """Why the spool cannot be written right now (messages wait in memory), or None."""
        return self._degraded

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
            body = event.model_dump_json().encode()
            outgoing.append(Outgoing(self.topic("events"), body, False, alert.capture_time))
            if alert.snapshot is not None and event.snapshot is not None:
                outgoing.append(Outgoing(event.snapshot, alert.snapshot, True, None))
        if not outgoing:
            return
        with self._publishing:
            stored = None
            if self._degraded is None and self._spool is not None:
                try:
                    stored = self._spool.put(outgoing)
                except PublishError as exc:
                    self._degrade(str(exc))
            with self._lock:
                if stored is None:
                    self._hold(outgoing)
                    self._fill()
                elif not self._backlog and len(self._inflight) + len(stored.messages) <= WINDOW:
                    for message in stored.messages:
                        self._send(message)
                else:
                    self._backlog = True
                    self._fill()
        if stored is not None:
            self._account_drops(stored.dropped)
        self._metrics.spool_pending.set(self._pending())

    def _hold(self, outgoing: list[Outgoing]) -> None:
        """Keep messages the spool could not take in memory; the oldest go past the bound. Holds ``_lock``."""
        for m in outgoing:
            self._held_seq += 1
            message = Message(-self._held_seq, m.topic, m.payload, m.retain, m.capture_time)
            self._held[message.id] = message
            self._waiting.append(message)
            self._held_bytes += len(m.payload)
        self._bypassed += len(outgoing)
        self._metrics.spool_bypassed.inc(len(outgoing))
        dropped = 0
        # Those in paho's hands cannot be taken back; the oldest waiting go first.
        while self._held_bytes > HELD_MAX_BYTES and self._waiting:
            oldest = self._waiting.popleft()
            del self._held[oldest.id]
            self._held_bytes -= len(oldest.payload)
            dropped += 1
        if dropped:
            first = self._bypass_dropped == 0
            self._bypass_dropped += dropped
            self._metrics.spool_bypass_dropped.inc(dropped)
            logger.log(
                logging.ERROR if first else logging.DEBUG,
                "%d message(s) held in memory dropped (over %.1f MiB waiting for the broker while the "
                "spool cannot be written); further ones are counted in "
                "monitor_spool_bypass_dropped_total",
                dropped,
                HELD_MAX_BYTES / 2**20,
            )

    def _degrade(self, reason: str) -> None:
        """The spool cannot be written: say so once, then hold messages in memory until it can."""
        with self._lock:
            first = self._degraded is None
            self._degraded = reason
            if first:
                self._next_retry = time.monotonic() + SPOOL_RETRY
                self._bypassed = self._bypass_dropped = 0
        if not first:
            logger.debug("the spool still cannot be written: %s", reason)
            return
        self._metrics.spool_degraded.set(1)
        self._acks.put(_WAKE)  # the PUBACK thread may be asleep until the next trim: retries start now
        logger.error(
            "delivery guarantee degraded: %s; events now go to MQTT directly and wait in memory for "
            "their PUBACK (at most %.1f MiB), so a crash or a long broker outage can lose them; "
            "trying the spool again every %g s",
            reason,
            HELD_MAX_BYTES / 2**20,
            SPOOL_RETRY,
        )

    def _try_open(self) -> None:
        """Open the spool with the function given for it; degrade (or stay so) when that fails."""
        assert self._open_spool is not None
        try:
            spool = self._open_spool()
        except PublishError as exc:
            self._degrade(str(exc))
            return
        self._spool = spool
        if self._degraded is not None:
            logger.info("the spool %s could be opened", spool.path)

    def _retry_spool(self, hand_over: bool = True) -> None:
        """Try the spool again: open it, finish failed deletes, write what memory holds, in order.

        On success the spool takes over; messages already in paho's hands keep their place
        (their PUBACK deletes the row written for them), the rest follow from the spool.
        """
        with self._publishing:
            self._next_retry = time.monotonic() + SPOOL_RETRY
            if self._spool is None:
                self._try_open()
            spool = self._spool
            if spool is None:
                return
            with self._lock:
                held = list(self._held.values())
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
                if stored.messages:
                    # The newest rows are kept when the batch alone is over max_events.
                    kept = held[len(held) - len(stored.messages) :]
                    rows = {m.id: row for m, row in zip(kept, stored.messages, strict=True)}
                    for mid, message in self._inflight.items():
                        row = rows.get(message.id)
                        if row is not None:
                            self._inflight[mid] = row
                            self._skip.add(row.id)
                self._held.clear()
                self._waiting.clear()
                self._held_bytes = 0
                self._degraded = None
                bypassed, dropped = self._bypassed, self._bypass_dropped
                if hand_over:
                    self._backlog = True
                    self._fill()
        self._account_drops(stored.dropped)
        self._metrics.spool_degraded.set(0)
        self._metrics.spool_pending.set(self._pending())
        logger.warning(
            "delivery guarantee restored: the spool can be written again; %d message(s) went around it, "
            "%d of them dropped from memory, %d written to it now",
            bypassed,
            dropped,
            len(held),
        )

    def publish_status(self, status: CameraStatus) -> None:
        """Publish a camera's state (retained); re-sent on every reconnect."""
        body = {**asdict(status), "state": status.state.value}
        del body["camera"]
        payload = json.dumps(body).encode()
        topic = self.topic(status.camera, "status")
        self._statuses[topic] = payload
        if self._connected.is_set():
            self._client.publish(topic, payload, qos=1, retain=True)

    def forget_status(self, camera: str) -> None:
        """Clear a removed camera's retained status (an empty retained message deletes it)."""
        topic = self.topic(camera, "status")
        self._statuses.pop(topic, None)
        if self._connected.is_set():
            self._client.publish(topic, b"", qos=1, retain=True)

    def _fill(self) -> None:
        """Hand the oldest messages not yet in paho's hands over, up to ``WINDOW``. Holds ``_lock``.

        Rows on disk go first, then messages held in memory (which are newer).
        """
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        if self._backlog and self._spool is not None:
            try:
                rows = self._spool.pending(after=self._handed, limit=room)
            except PublishError as exc:  # tried again at the next PUBACK or publish
                logger.error("cannot read the spool's backlog: %s", exc)
                return
            for message in rows:
                self._send(message)
            if len(rows) < room:
                self._backlog = False
            room = WINDOW - len(self._inflight)
        elif self._spool is None:
            self._backlog = False
        # Held messages stay ours while the broker is away: paho would keep them without bound,
        # here the oldest are dropped past HELD_MAX_BYTES. A connect hands them over.
        while not self._backlog and self._waiting and room > 0 and self._connected.is_set():
            self._hand(self._waiting.popleft())
            room -= 1

    def _send(self, message: Message) -> None:
        """Hand a spool row to paho, once. Holds ``_lock``."""
        if message.id <= self._handed:
            return  # already handed over by _fill
        self._handed = message.id
        if message.id in self._skip:  # written from memory while paho already had it
            self._skip.discard(message.id)
            return
        self._hand(message)

    def _hand(self, message: Message) -> None:
        # Called with _lock held, so the PUBACK thread cannot see the mid
        # before it is recorded. paho never calls back into us with it held.
        try:
            info = self._client.publish(message.topic, message.payload, qos=1, retain=message.retain)
        except ValueError as exc:  # a topic or payload MQTT cannot carry, now or ever
            self._quarantine(message, str(exc))
            return
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued by paho
            self._inflight[info.mid] = message
            if message.topic == self._events_topic:
                self._send_category_copy(message)
            return
        logger.error("MQTT publish of message %d failed: %s", message.id, mqtt.error_string(info.rc))

    def _quarantine(self, message: Message, reason: str) -> None:
        """Take a message MQTT will never carry out of the queue, so it blocks nothing. Holds ``_lock``."""
        self._metrics.spool_quarantined.inc()
        where = "held in memory"
        if message.id < 0:
            held = self._held.pop(message.id, None)
            if held is not None:
                self._held_bytes -= len(held.payload)
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

    def _send_category_copy(self, message: Message) -> None:
        """The event again on ``P/<camera>/<category>``, riding on the event's spool row.

        Not spooled on its own (one row per event): it is derived again whenever
        the row is sent, at replay too. paho re-sends it like any QoS 1 message.
        """
        try:
            event = json.loads(message.payload)
            topic = self.topic(event["camera"], event.get("category", "other"))
        except (ValueError, KeyError, TypeError):
            return  # not an event we wrote; it still goes to P/events
        self._client.publish(topic, message.payload, qos=1, retain=False)

    def _account_drops(self, dropped: int) -> None:
        """Count rows the spool dropped; log once when a burst of drops starts."""
        if not dropped:
            return
        self._metrics.spool_dropped.inc(dropped)
        with self._lock:
            first = not self._dropping
            self._dropping = True
            self._burst_dropped += dropped
        if first:
            logger.warning(
                "spool limit reached (spool.max_events=%d, spool.max_age=%.0f s): dropped the %d oldest "
                "message(s); further drops are counted in monitor_spool_dropped_total and summed up "
                "once the spool drains",
                self._spool.max_events if self._spool is not None else 0,
                self._spool.max_age if self._spool is not None else 0.0,
                dropped,
            )

    # -- paho callbacks (network thread) ---------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._failed(_describe_refusal(reason))
            return
        if self.last_error is not None:
            logger.info(
                "connected to MQTT broker %s:%d (after: %s)",
                self.settings.host,
                self.settings.port,
                self.last_error,
            )
        else:
            logger.info("connected to MQTT broker %s:%d", self.settings.host, self.settings.port)
        self.last_error = None
        client.publish(self.available_topic, "online", qos=1, retain=True)
        for topic, payload in list(self._statuses.items()):
            client.publish(topic, payload, qos=1, retain=True)
        self._broker_connected(True)
        self._connected.set()
        self._metrics.mqtt_connected.set(1)
        self._acks.put(_CONNECTED)  # the PUBACK thread hands over what memory holds

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:` around the TCP connect and
        # TLS handshake, and passes no error: the one being handled is it.
        self._failed(_describe_connect_error(sys.exc_info()[1]))

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        # A TLS alert the broker sends after the handshake (TLS 1.3 checks the client
        # certificate only then: "certificate required", "unknown ca") fails a socket
        # read or write, which paho logs inside its `except OSError:` and then reports
        # only as a lost connection. Keep the error for _on_disconnect to describe.
        if level == mqtt.MQTT_LOG_ERR and not self._connected.is_set():
            error = sys.exc_info()[1]
            if isinstance(error, OSError):
                self._socket_error = error

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        socket_error, self._socket_error = self._socket_error, None
        was = self._connected.is_set()
        self._connected.clear()
        self._broker_connected(False)
        self._metrics.mqtt_connected.set(0)
        if was and reason.is_failure:
            self.last_error = f"disconnected: {reason}"
            logger.warning("lost the MQTT broker (%s); messages wait in the spool", reason)
        elif not was and reason.is_failure:
            if socket_error is not None:
                self._failed(_describe_connect_error(socket_error))
            elif self.last_error is None:
                self._failed(f"connection closed before the broker accepted it ({reason})")

    def _broker_connected(self, connected: bool) -> None:
        """Tell the spool (``synchronous=AUTO``); on paho's thread, so nothing may escape."""
        if self._spool is None:
            return
        try:
            self._spool.broker_connected(connected)
        except PublishError as exc:  # a full disk: the checkpoint could not grow the database
            logger.warning("%s; the spool keeps its previous durability", exc)

    def _failed(self, error: str) -> None:
        """Record why there is no connection; log each new reason once (paho retries on its own)."""
        level = logging.DEBUG if error == self.last_error else logging.ERROR
        self.last_error = error
        logger.log(
            level,
            "no connection to MQTT broker %s:%d: %s; retrying with backoff, events wait in the spool",
            self.settings.host,
            self.settings.port,
            error,
        )

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._acks.put((mid, time.time(), reason))

    # -- PUBACK handling (own thread: SQLite stays off paho's thread) -----------
    def _ack_loop(self) -> None:
        next_trim = time.monotonic() + TRIM_INTERVAL
        while True:
            due = next_trim if self._degraded is None else min(next_trim, self._next_retry)
            try:
                item = self._acks.get(timeout=max(0.0, due - time.monotonic()))
            except queue.Empty:
                pass  # a tick: only the chores below
            else:
                if item is None:
                    return
                if item == _CONNECTED:
                    with self._lock:
                        self._fill()
                elif isinstance(item, tuple):
                    self._ack(*item)
            # Checked after every PUBACK too, so a steady stream of them cannot starve these.
            now = time.monotonic()
            if now >= next_trim:
                next_trim = now + TRIM_INTERVAL
                self._trim()
            if self._degraded is not None and now >= self._next_retry:
                self._retry_spool()

    def _ack(self, mid: int, when: float, reason: ReasonCode) -> None:
        with self._lock:
            message = self._inflight.pop(mid, None)
            if message is None:
                return  # availability or status: nothing spooled
            if self._backlog or self._waiting:
                self._fill()
            if not self._inflight:
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
                held = self._held.pop(message.id, None)
                if held is not None:
                    self._held_bytes -= len(held.payload)
            return
        with self._lock:
            self._skip.discard(message.id)
        spool = self._spool
        assert spool is not None  # rows come from it
        try:
            spool.remove(message.id)
        except PublishError as exc:  # delivered: the row is deleted once the spool can be written
            with self._lock:
                self._unremoved.append(message.id)
            self._degrade(str(exc))
        pending = spool.count()
        self._metrics.spool_pending.set(pending)
        with self._lock:
            ended = self._dropping and pending <= spool.max_events // 2
            if ended:
                dropped, self._burst_dropped, self._dropping = self._burst_dropped, 0, False
        if ended:
            logger.info("the spool is draining; %d message(s) were dropped while it was full", dropped)

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
        if self._spool is None or self._degraded is not None:
            return
        try:
            self._account_drops(self._spool.trim())
            self._spool.compact()
        except PublishError as exc:
            logger.warning("cannot trim the spool: %s", exc)
        self._metrics.spool_pending.set(self._pending())


def _describe_tls_files(tls: TlsSettings, exc: Exception) -> str:
    """Which of the TLS files ``tls_set`` could not load, and why (OpenSSL's "PEM lib" names none)."""
    reason = _ssl_text(exc)
    try:
        ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as ca_exc:
        problem = _ssl_text(ca_exc)
        return f"mqtt.tls.ca_file: cannot load {str(tls.ca_file)!r} as PEM CA certificate(s): {problem}"
    if tls.cert_file is None or tls.key_file is None:
        return f"mqtt.tls: cannot load the CA file: {reason}"
    try:  # parses the file's certificates, without wanting a key next to them
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(tls.cert_file))
    except (ssl.SSLError, OSError) as cert_exc:
        problem = _ssl_text(cert_exc)
        return f"mqtt.tls.cert_file: cannot load {str(tls.cert_file)!r} as a PEM certificate: {problem}"
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"mqtt.tls.key_file: {str(tls.key_file)!r} is not the private key of "
            f"mqtt.tls.cert_file {str(tls.cert_file)!r}"
        )
    return (
        f"mqtt.tls.key_file: cannot load {str(tls.key_file)!r} as the PEM private key (unencrypted) "
        f"of mqtt.tls.cert_file: {reason}"
    )


def _ssl_text(exc: Exception) -> str:
    return _SSL_LOCATION.sub("", str(exc))


def _describe_refusal(reason: ReasonCode) -> str:
    text = str(reason)
    if reason.value in _UNAUTHORIZED:
        return f"unauthorized ({text})"
    return text


def _describe_connect_error(exc: BaseException | None) -> str:
    """A short reason for a failed TCP connect or TLS handshake; never contains credentials."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS error: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        text = _SSL_LOCATION.sub("", str(exc.args[1] if len(exc.args) > 1 else exc))
        if exc.reason == "WRONG_VERSION_NUMBER":
            text += " (is mqtt.port a TLS listener?)"
        elif exc.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            text += " (the broker wants a client certificate: set mqtt.tls.cert_file and key_file)"
        return f"TLS error: {text}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"host not found ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"connection failed: {exc}" if exc is not None else "connection failed"
