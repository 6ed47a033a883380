"""The publisher's window: the messages in paho's hands and not yet acknowledged.

At most ``WINDOW`` messages are handed to paho at a time (``MAX_INFLIGHT`` of
them sent, the rest in paho's queue); the rest wait on disk, or in memory
while the spool cannot be written, and are handed over oldest first as
PUBACKs free room. So a broker that is gone for days costs disk, not memory.
Spool rows go first, each once, then messages held in memory (which are newer).

Each event also goes to ``P/<camera>/<category>``: that copy is derived from
the event whenever it is handed over (at replay too), and rides on the
event's spool row instead of having one of its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt

from monitor.errors import PublishError
from monitor.held import Held
from monitor.mqtt_connection import Connection
from monitor.spool import Message, Spool
from monitor.topics import Topics

logger = logging.getLogger(__name__)

#: Messages sent before their PUBACK; more wait in paho's queue.
MAX_INFLIGHT = 100
#: Most messages handed to paho at once (in flight or queued); the rest wait on disk.
WINDOW = 2 * MAX_INFLIGHT


class Window:
    """What paho holds for us, by message id; not thread-safe: the publisher calls it under its lock.

    That lock also keeps the PUBACK thread from seeing a message id before it is recorded
    (paho never calls back into us while holding its own).

    Args:
        connection: Where messages are handed over.
        topics: For the events' category copies.
        held: The messages held in memory, handed over after the spool's.
        quarantine: Called with a message MQTT can never carry and paho's reason.
    """

    def __init__(
        self,
        connection: Connection,
        topics: Topics,
        held: Held,
        quarantine: Callable[[Message, str], None],
    ) -> None:
        #: Rows on disk not yet handed to paho.
        self.backlog = False
        self._connection = connection
        self._topics = topics
        self._held = held
        self._quarantine = quarantine
        self._inflight: dict[int, Message] = {}  # by paho's message id
        self._handed = 0  # highest spool id handed to paho
        self._skip: set[int] = set()  # spool ids above _handed already in paho's hands

    def __len__(self) -> int:
        return len(self._inflight)

    def fits(self, count: int) -> bool:
        """``count`` new rows can go to paho at once: nothing older waits, and there is room."""
        return not self.backlog and len(self._inflight) + count <= WINDOW

    def fill(self, spool: Spool | None) -> None:
        """Hand the oldest messages not yet in paho's hands over, up to ``WINDOW``."""
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        if self.backlog and spool is not None:
            try:
                rows = spool.pending(after=self._handed, limit=room)
            except PublishError as exc:  # tried again at the next PUBACK or publish
                logger.error("cannot read the spool's backlog: %s", exc)
                return
            for message in rows:
                self.send(message)
            if len(rows) < room:
                self.backlog = False
            room = WINDOW - len(self._inflight)
        elif spool is None:
            self.backlog = False
        # Held messages stay ours while the broker is away: paho would keep them without bound,
        # while Held drops the oldest past its bound. A connect hands them over.
        while not self.backlog and self._held.waiting and room > 0 and self._connection.connected:
            self._hand(self._held.take())
            room -= 1

    def send(self, message: Message) -> None:
        """Hand a spool row to paho, once."""
        if message.id <= self._handed:
            return  # already handed over by fill
        self._handed = message.id
        if message.id in self._skip:  # written from memory while paho already had it
            self._skip.discard(message.id)
            return
        self._hand(message)

    def acknowledged(self, mid: int) -> Message | None:
        """The message a PUBACK is for, now out of paho's hands; None for one not ours (availability)."""
        message = self._inflight.pop(mid, None)
        if message is not None:
            self._skip.discard(message.id)
        return message

    def written(self, rows: dict[int, Message]) -> None:
        """Held messages were written to the spool as ``rows`` (by held id): those paho has keep their
        place, and their PUBACK deletes the row; the others follow from the spool."""
        for mid, message in self._inflight.items():
            row = rows.get(message.id)
            if row is not None:
                self._inflight[mid] = row
                self._skip.add(row.id)

    def _hand(self, message: Message) -> None:
        try:
            info = self._connection.publish(message.topic, message.payload, message.retain)
        except ValueError as exc:  # a topic or payload MQTT cannot carry, now or ever
            self._quarantine(message, str(exc))
            return
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued by paho
            self._inflight[info.mid] = message
            if message.topic == self._topics.events():
                self._send_category_copy(message)
            return
        logger.error("MQTT publish of message %d failed: %s", message.id, mqtt.error_string(info.rc))

    def _send_category_copy(self, message: Message) -> None:
        """The event again on ``P/<camera>/<category>``; paho re-sends it like any QoS 1 message."""
        try:
            event = json.loads(message.payload)
            topic = self._topics.category(event["camera"], event.get("category", "other"))
        except (ValueError, KeyError, TypeError):
            return  # not an event we wrote; it still goes to P/events
        self._connection.publish(topic, message.payload, retain=False)
