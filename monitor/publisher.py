"""MQTT publishing (paho-mqtt 2, QoS 1) behind the on-disk spool.

Topics (``P`` is ``mqtt.topic_prefix``):

* ``P/available``: retained ``online`` / ``offline``; ``offline`` is also the
  last will, so a crash reads the same as a clean stop;
* ``P/events``: one JSON ``Event`` per message;
* ``P/<camera>/<label>/snapshot``: retained annotated JPEG of each new event;
* ``P/<camera>/status``: retained JSON camera state.

Events and snapshots go to the spool first, then to paho, which keeps them
(and re-sends them after a reconnect) until the broker's PUBACK; the PUBACK
deletes them from the spool. Camera status and availability are state, not
history: they are re-published on every connect instead of spooled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
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
from monitor.settings import MqttSettings
from monitor.sources import CameraStatus
from monitor.spool import Message, Outgoing, Spool

logger = logging.getLogger(__name__)

RECONNECT_MIN = 1
RECONNECT_MAX = 30
#: Messages sent before their PUBACK; more wait in paho's queue.
MAX_INFLIGHT = 100
CLOSE_POLL = 0.1


class Publisher:
    """Delivers alerts at least once; a context manager that connects and disconnects.

    Args:
        settings: The ``mqtt`` section.
        spool: Where messages wait for their PUBACK.
        metrics: Latency and connection metrics.
    """

    def __init__(self, settings: MqttSettings, spool: Spool, metrics: Metrics) -> None:
        self.settings = settings
        self.prefix = settings.topic_prefix
        self._spool = spool
        self._metrics = metrics
        self._lock = threading.Lock()
        self._inflight: dict[int, Message] = {}
        self._acks: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
        self._statuses: dict[str, bytes] = {}
        self._connected = threading.Event()
        self._idle = threading.Condition(self._lock)
        self.last_error: str | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            self._client.username_pw_set(settings.username, password)
        self._client.will_set(self.topic("available"), "offline", qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._acker = threading.Thread(target=self._ack_loop, name="monitor-mqtt-acks", daemon=True)

    def topic(self, *parts: str) -> str:
        """``<prefix>/<part>/...``."""
        return "/".join((self.prefix, *parts))

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Publisher:
        self._acker.start()
        try:
            self._client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive)
        except (OSError, ValueError) as exc:
            raise PublishError(
                f"cannot connect to MQTT {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        self._client.loop_start()
        replay = self._spool.pending()
        if replay:
            logger.info("replaying %d spooled message(s)", len(replay))
        for message in replay:
            self._send(message)
        self._metrics.spool_pending.set(len(replay))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(timeout=5.0)

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` for in-flight PUBACKs, publish ``offline``, disconnect."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and self._connected.is_set() and time.monotonic() < deadline:
                self._idle.wait(CLOSE_POLL)  # woken by the last PUBACK; polls for a lost broker
            left = len(self._inflight)
        if left:
            logger.warning("%d message(s) not acknowledged at shutdown; they stay in the spool", left)
        if self._connected.is_set():
            info = self._client.publish(self.topic("available"), "offline", qos=1, retain=True)
            # Not sent in time: the broker's last will says offline instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        self._acks.put(None)
        self._acker.join(timeout=1.0)

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    # -- publishing ----------------------------------------------------------
    def publish(self, alerts: list[Alert]) -> None:
        """Spool and send alerts: the event, and the snapshot of new events.

        Raises:
            PublishError: The spool cannot be written.
        """
        outgoing = []
        for alert in alerts:
            event = alert.event
            outgoing.append(
                Outgoing(self.topic("events"), event.model_dump_json().encode(), False, alert.capture_time)
            )
            if alert.snapshot is not None and event.snapshot is not None:
                outgoing.append(Outgoing(event.snapshot, alert.snapshot, True, None))
        if not outgoing:
            return
        for message in self._spool.put(outgoing):
            self._send(message)
        self._metrics.spool_pending.inc(len(outgoing))

    def publish_status(self, status: CameraStatus) -> None:
        """Publish a camera's state (retained); re-sent on every reconnect."""
        body = {**asdict(status), "state": status.state.value}
        del body["camera"]
        payload = json.dumps(body).encode()
        topic = self.topic(status.camera, "status")
        self._statuses[topic] = payload
        if self._connected.is_set():
            self._client.publish(topic, payload, qos=1, retain=True)

    def _send(self, message: Message) -> None:
        # The lock spans publish() so the PUBACK thread cannot see the mid
        # before it is recorded. paho never calls back into us with it held.
        with self._lock:
            info = self._client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued by paho
                self._inflight[info.mid] = message
                return
        logger.error("MQTT publish of spool row %d failed: %s", message.id, mqtt.error_string(info.rc))

    # -- paho callbacks (network thread) ---------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = _describe_refusal(reason)
            logger.error(
                "MQTT broker %s:%d refused the connection: %s",
                self.settings.host,
                self.settings.port,
                self.last_error,
            )
            return
        self.last_error = None
        logger.info("connected to MQTT broker %s:%d", self.settings.host, self.settings.port)
        client.publish(self.topic("available"), "online", qos=1, retain=True)
        for topic, payload in list(self._statuses.items()):
            client.publish(topic, payload, qos=1, retain=True)
        self._connected.set()
        self._metrics.mqtt_connected.set(1)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._metrics.mqtt_connected.set(0)
        if was and reason.is_failure:
            self.last_error = f"disconnected: {reason}"
            logger.warning("lost the MQTT broker (%s); messages wait in the spool", reason)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._acks.put((mid, time.time()))

    # -- PUBACK handling (own thread: SQLite deletes stay off paho's thread) -----
    def _ack_loop(self) -> None:
        while (item := self._acks.get()) is not None:
            mid, when = item
            with self._lock:
                message = self._inflight.pop(mid, None)
                if message is None:
                    continue  # availability or status: nothing spooled
                self._acked(message, when)
                if not self._inflight:
                    self._idle.notify_all()

    def _acked(self, message: Message, when: float) -> None:
        try:
            self._spool.remove(message.id)
        except Exception:  # a failed delete only means a duplicate on the next start
            logger.exception("cannot remove acknowledged spool row %d", message.id)
        self._metrics.spool_pending.dec()
        if message.capture_time is not None:
            self._metrics.alert_latency.observe(max(0.0, when - message.capture_time))


def _describe_refusal(reason: ReasonCode) -> str:
    text = str(reason)
    if reason.value in (4, 5, 0x86, 0x87):  # bad user name or password / not authorized
        return f"unauthorized ({text})"
    return text
