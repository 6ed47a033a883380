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
from monitor.spool import Message, Outgoing, Spool

logger = logging.getLogger(__name__)

RECONNECT_MIN = 1
RECONNECT_MAX = 30
#: Messages sent before their PUBACK; more wait in paho's queue.
MAX_INFLIGHT = 100
#: Most spooled messages handed to paho at once (in flight or queued); the rest wait on disk.
WINDOW = 2 * MAX_INFLIGHT
#: Seconds between checks for messages older than ``spool.max_age``.
TRIM_INTERVAL = 60.0
CLOSE_POLL = 0.1
#: MQTT 3.1.1 CONNACK 4/5 and MQTT 5 0x86/0x87: bad user name or password / not authorized.
_UNAUTHORIZED = (4, 5, 0x86, 0x87)
_SSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


class Publisher:
    """Delivers alerts at least once; a context manager that connects and disconnects.

    ``publish`` may be called from one thread at a time (the pipeline loop);
    PUBACKs are handled on a thread of its own.

    Args:
        settings: The ``mqtt`` section.
        spool: Where messages wait for their PUBACK.
        metrics: Latency, connection and spool metrics.

    Raises:
        PublishError: The TLS files cannot be loaded.
    """

    def __init__(
        self, settings: MqttSettings, spool: Spool, metrics: Metrics, instance: str | None = None
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
        self._spool = spool
        self._metrics = metrics
        self._lock = threading.Lock()  # guards _inflight, _handed, _backlog and paho publish calls
        self._publishing = threading.Lock()  # keeps spool order and hand-over order the same
        self._inflight: dict[int, Message] = {}
        self._handed = 0  # highest spool id given to paho
        self._backlog = False  # rows on disk not yet given to paho
        self._dropping = False
        self._burst_dropped = 0
        self._acks: queue.SimpleQueue[tuple[int, float, ReasonCode] | None] = queue.SimpleQueue()
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
        self._account_drops(self._spool.trim())
        self._acker.start()
        try:
            # MQTT 5 has clean_start per connection where 3.1.1 has clean_session per client.
            clean_start = True if self.settings.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY
            self._client.connect_async(
                self.settings.host, self.settings.port, self.settings.keepalive, clean_start=clean_start
            )
        except (OSError, ValueError) as exc:
            self._acks.put(None)  # ends the PUBACK thread
            raise PublishError(
                f"cannot connect to MQTT {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        self._metrics.spool_oldest_age.set_function(self._spool.oldest_age)
        self._client.loop_start()
        replay = self._spool.count()
        if replay:
            logger.info("replaying %d spooled message(s)", replay)
        with self._lock:
            self._backlog = True
            self._fill()
        self._metrics.spool_pending.set(self._spool.count())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(timeout=5.0)

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for in-flight PUBACKs, publish ``offline``, disconnect."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and self._connected.is_set() and time.monotonic() < deadline:
                self._idle.wait(CLOSE_POLL)  # woken by the last PUBACK; polls for a lost broker
        left = self._spool.count()
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
        """Spooled messages handed to paho and not yet acknowledged (at most ``WINDOW``)."""
        with self._lock:
            return len(self._inflight)

    # -- publishing ----------------------------------------------------------
    def publish(self, alerts: list[Alert]) -> None:
        """Spool and send alerts: the event, and the snapshot of new events.

        Raises:
            PublishError: The spool cannot be written.
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
            stored = self._spool.put(outgoing)
            with self._lock:
                if not self._backlog and len(self._inflight) + len(stored.messages) <= WINDOW:
                    for message in stored.messages:
                        self._send(message)
                else:
                    self._backlog = True
                    self._fill()
        self._account_drops(stored.dropped)
        self._metrics.spool_pending.set(self._spool.count())

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
        """Hand the oldest rows not yet in paho's hands over, up to ``WINDOW``. Holds ``_lock``."""
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        rows = self._spool.pending(after=self._handed, limit=room)
        for message in rows:
            self._send(message)
        if len(rows) < room:
            self._backlog = False

    def _send(self, message: Message) -> None:
        # Called with _lock held, so the PUBACK thread cannot see the mid
        # before it is recorded. paho never calls back into us with it held.
        if message.id <= self._handed:
            return  # already handed over by _fill
        self._handed = message.id
        try:
            info = self._client.publish(message.topic, message.payload, qos=1, retain=message.retain)
        except ValueError as exc:  # a topic or payload MQTT cannot carry
            logger.error("MQTT cannot carry spool row %d: %s", message.id, exc)
            return
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued by paho
            self._inflight[info.mid] = message
            if message.topic == self._events_topic:
                self._send_category_copy(message)
            return
        logger.error("MQTT publish of spool row %d failed: %s", message.id, mqtt.error_string(info.rc))

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
                self._spool.max_events,
                self._spool.max_age,
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
        self._spool.broker_connected(True)
        self._connected.set()
        self._metrics.mqtt_connected.set(1)

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
        self._spool.broker_connected(False)
        self._metrics.mqtt_connected.set(0)
        if was and reason.is_failure:
            self.last_error = f"disconnected: {reason}"
            logger.warning("lost the MQTT broker (%s); messages wait in the spool", reason)
        elif not was and reason.is_failure:
            if socket_error is not None:
                self._failed(_describe_connect_error(socket_error))
            elif self.last_error is None:
                self._failed(f"connection closed before the broker accepted it ({reason})")

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
            try:
                item = self._acks.get(timeout=max(0.0, next_trim - time.monotonic()))
            except queue.Empty:
                next_trim = time.monotonic() + TRIM_INTERVAL
                self._trim()
                continue
            if item is None:
                return
            mid, when, reason = item
            with self._lock:
                message = self._inflight.pop(mid, None)
                if message is None:
                    continue  # availability or status: nothing spooled
                if self._backlog:
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
        try:
            self._spool.remove(message.id)
        except PublishError:  # a failed delete only means a duplicate on the next start
            logger.exception("cannot remove acknowledged spool row %d", message.id)
        pending = self._spool.count()
        self._metrics.spool_pending.set(pending)
        with self._lock:
            ended = self._dropping and pending <= self._spool.max_events // 2
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
        self._metrics.spool_pending.set(self._spool.count())

    def _trim(self) -> None:
        try:
            self._account_drops(self._spool.trim())
        except PublishError:
            logger.exception("cannot drop expired messages from the spool")
        self._metrics.spool_pending.set(self._spool.count())


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
