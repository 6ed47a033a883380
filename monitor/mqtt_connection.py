"""The connection to the MQTT broker: one paho-mqtt 2 client (MQTT 3.1.1 or 5, optional TLS).

Connection failures never raise: paho connects and reconnects on its own
thread, with a backoff that doubles from the least to the most delay given,
while the publisher's messages wait in the spool. Each new kind of failure
is logged once (repeats at debug) and kept in ``last_error``
(``unauthorized (...)``, ``TLS error: ...``, ``connection refused``) for
``/readyz``; ``monitor.mqtt_errors`` words them.

Availability and retained state (camera status) are state, not history:
``online`` and every retained state are published again on each connect,
``offline`` at a clean stop, and the broker sends the same ``offline`` as the
last will when the daemon dies, so a crash reads the same as a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from monitor.errors import PublishError
from monitor.mqtt_errors import describe_connect_error, describe_refusal, describe_tls_files
from monitor.settings import MqttSettings

logger = logging.getLogger(__name__)


def _nothing(*args: object) -> None:
    """Stands in for the callbacks after ``close``."""


class Connection:
    """The broker connection: ``start`` connects in the background, ``close`` says offline and ends it.

    Args:
        settings: The ``mqtt`` section.
        available: The availability topic (``online``, ``offline`` and the last will).
        on_change: Called with True once the broker accepted the connection (``online`` and
            the retained states are queued by then), with False when it is lost. On paho's
            thread: it must not raise.
        on_ack: Called with the message id and reason code of each PUBACK, on paho's thread.
        max_inflight: Messages sent before their PUBACK; more wait in paho's queue.
        reconnect: Least and most seconds between connection attempts.

    Raises:
        PublishError: The TLS files cannot be loaded.
    """

    def __init__(
        self,
        settings: MqttSettings,
        available: str,
        on_change: Callable[[bool], None],
        on_ack: Callable[[int, ReasonCode], None],
        *,
        max_inflight: int,
        reconnect: tuple[int, int],
    ) -> None:
        self.settings = settings
        self.available = available
        self.last_error: str | None = None
        self._on_change = on_change
        self._on_ack = on_ack
        self._states: dict[str, bytes] = {}
        self._connected = threading.Event()
        self._socket_error: OSError | None = None  # set on paho's thread, read in _on_disconnect
        self._client = self._make_client(max_inflight, reconnect)

    def _make_client(self, max_inflight: int, reconnect: tuple[int, int]) -> mqtt.Client:
        settings = self.settings
        v5 = settings.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            # Our own session need not outlive a connection: paho re-sends what
            # was not acknowledged, and the spool covers our restarts.
            clean_session=None if v5 else True,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(max_inflight)
        client.reconnect_delay_set(*reconnect)
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
                raise PublishError(describe_tls_files(settings.tls, exc)) from exc
            if tls.insecure:
                client.tls_insecure_set(True)
                logger.warning(
                    "mqtt.tls.insecure is true: the broker's certificate is not checked against "
                    "mqtt.host %r, so anyone with a certificate from the same CA can pose as the broker",
                    settings.host,
                )
        client.will_set(self.available, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting, and reconnecting whenever the connection is lost, on paho's thread.

        Raises:
            PublishError: The connection cannot even be tried (e.g. a malformed host).
        """
        settings = self.settings
        # MQTT 5 has clean_start per connection where 3.1.1 has clean_session per client.
        clean_start = True if settings.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        try:
            self._client.connect_async(
                settings.host, settings.port, settings.keepalive, clean_start=clean_start
            )
        except (OSError, ValueError) as exc:
            raise PublishError(f"cannot connect to MQTT {settings.host}:{settings.port}: {exc}") from exc
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool) -> mqtt.MQTTMessageInfo:
        """Send at QoS 1: paho keeps the message (queued while disconnected) until its PUBACK.

        Raises:
            ValueError: MQTT cannot carry the topic or the payload (a wildcard in the topic).
        """
        return self._client.publish(topic, payload, qos=1, retain=retain)

    def retain(self, topic: str, payload: bytes) -> None:
        """Publish retained state now (when connected) and again on every connect; ``b""`` deletes it."""
        if payload:
            self._states[topic] = payload
        else:  # an empty retained message deletes the broker's copy
            self._states.pop(topic, None)
        if self._connected.is_set():
            self._client.publish(topic, payload, qos=1, retain=True)

    def close(self, deadline: float) -> None:
        """Publish ``offline`` (waiting for it until ``deadline``, monotonic), disconnect, stop paho."""
        if self._connected.is_set():
            info = self._client.publish(self.available, "offline", qos=1, retain=True)
            # Not sent in time: the broker's last will says offline instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        # paho closes its wake-up socket pair only in Client.__del__. Our callbacks
        # refer back to us (and we to the publisher); dropping them lets that run as
        # soon as we are dropped, not whenever the garbage collector gets to the
        # cycle (a ResourceWarning).
        self._client.on_connect = self._client.on_connect_fail = None
        self._client.on_disconnect = self._client.on_publish = None
        self._on_change = self._on_ack = _nothing

    # -- paho callbacks (network thread) ---------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        if reason.is_failure:
            self._failed(describe_refusal(reason))
            return
        settings = self.settings
        if self.last_error is not None:
            logger.info(
                "connected to MQTT broker %s:%d (after: %s)", settings.host, settings.port, self.last_error
            )
        else:
            logger.info("connected to MQTT broker %s:%d", settings.host, settings.port)
        self.last_error = None
        client.publish(self.available, "online", qos=1, retain=True)
        for topic, payload in list(self._states.items()):
            client.publish(topic, payload, qos=1, retain=True)
        self._connected.set()
        self._on_change(True)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError:` around the TCP connect and
        # TLS handshake, and passes no error: the one being handled is it.
        self._failed(describe_connect_error(sys.exc_info()[1]))

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
        self._on_change(False)
        if was and reason.is_failure:
            self.last_error = f"disconnected: {reason}"
            logger.warning("lost the MQTT broker (%s); messages wait in the spool", reason)
        elif not was and reason.is_failure:
            if socket_error is not None:
                self._failed(describe_connect_error(socket_error))
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
        self._on_ack(mid, reason)
