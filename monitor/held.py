"""Messages held in memory while the spool cannot be written: the publisher's fallback.

When the spool cannot be written (a full or read-only disk, or a spool file
that could not even be opened at start), nothing stops: events go to paho
directly, still QoS 1, and wait here until their PUBACK (at most
``HELD_MAX_BYTES``, plus the publisher's ``WINDOW`` in paho's hands). While
the broker is away they stay out of paho's queue, which has no bound, and
past the bound the oldest are dropped and counted in
``monitor_spool_bypass_dropped_total``. ``monitor_spool_degraded`` is 1 and
``Held.reason`` says why (for ``/readyz``), with one log line when it starts
and one when it ends. Every ``SPOOL_RETRY`` seconds the publisher tries the
disk again; once a write succeeds, what is held here is written to the spool,
in order, and the spool takes over.

Held messages have negative ids, so they never meet a spool row's (positive) id.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from monitor.metrics import Metrics
from monitor.spool import Message, Outgoing

logger = logging.getLogger(__name__)

#: Most payload bytes held in memory while the spool cannot be written (about 300 snapshots).
HELD_MAX_BYTES = 32 * 1024 * 1024
#: Seconds between attempts to write to (or open) a spool that could not be written.
SPOOL_RETRY = 5.0


class Held:
    """The messages held in memory, oldest first, and why the spool is not used (``reason``).

    Not thread-safe: the publisher calls it with its lock held.

    Args:
        metrics: Counts what went around the spool, and the degraded gauge.
    """

    def __init__(self, metrics: Metrics) -> None:
        #: Why the spool cannot be written, or None while it can.
        self.reason: str | None = None
        #: Monotonic time of the next attempt at the spool.
        self.next_retry = 0.0
        self._metrics = metrics
        self._messages: dict[int, Message] = {}  # not yet acknowledged, by id, in order
        self._waiting: deque[Message] = deque()  # not yet handed to paho
        self._bytes = 0
        self._seq = 0
        self._bypassed = self._dropped = 0  # in this degraded period, for the summary

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def waiting(self) -> bool:
        """Some held messages are not in paho's hands yet."""
        return bool(self._waiting)

    def degrade(self, reason: str) -> bool:
        """The spool cannot be written: say so (once per degraded period); True the first time."""
        first = self.reason is None
        self.reason = reason
        if not first:
            logger.debug("the spool still cannot be written: %s", reason)
            return False
        self.retry_later()
        self._bypassed = self._dropped = 0
        self._metrics.spool_degraded.set(1)
        logger.error(
            "delivery guarantee degraded: %s; events now go to MQTT directly and wait in memory for "
            "their PUBACK (at most %.1f MiB), so a crash or a long broker outage can lose them; "
            "trying the spool again every %g s",
            reason,
            HELD_MAX_BYTES / 2**20,
            SPOOL_RETRY,
        )
        return True

    def retry_later(self) -> None:
        """Put the next attempt at the spool ``SPOOL_RETRY`` seconds from now."""
        self.next_retry = time.monotonic() + SPOOL_RETRY

    def hold(self, outgoing: list[Outgoing]) -> None:
        """Keep messages the spool could not take; past the bound the oldest waiting ones go."""
        for m in outgoing:
            self._seq += 1
            message = Message(-self._seq, m.topic, m.payload, m.retain, m.capture_time)
            self._messages[message.id] = message
            self._waiting.append(message)
            self._bytes += len(m.payload)
        self._bypassed += len(outgoing)
        self._metrics.spool_bypassed.inc(len(outgoing))
        dropped = 0
        # Those in paho's hands cannot be taken back; the oldest waiting go first.
        while self._bytes > HELD_MAX_BYTES and self._waiting:
            oldest = self._waiting.popleft()
            del self._messages[oldest.id]
            self._bytes -= len(oldest.payload)
            dropped += 1
        if dropped:
            first = self._dropped == 0
            self._dropped += dropped
            self._metrics.spool_bypass_dropped.inc(dropped)
            logger.log(
                logging.ERROR if first else logging.DEBUG,
                "%d message(s) held in memory dropped (over %.1f MiB waiting for the broker while the "
                "spool cannot be written); further ones are counted in "
                "monitor_spool_bypass_dropped_total",
                dropped,
                HELD_MAX_BYTES / 2**20,
            )

    def take(self) -> Message:
        """The oldest message not yet handed to paho, which the caller hands over now."""
        return self._waiting.popleft()

    def release(self, message_id: int) -> None:
        """Forget a held message: acknowledged, or one that MQTT can never carry."""
        message = self._messages.pop(message_id, None)
        if message is not None:
            self._bytes -= len(message.payload)

    def messages(self) -> list[Message]:
        """Every held message, oldest first (those in paho's hands too)."""
        return list(self._messages.values())

    def restored(self, written: int) -> None:
        """The spool took over, with the ``written`` held messages in it now: forget them all, say so."""
        self._messages.clear()
        self._waiting.clear()
        self._bytes = 0
        self.reason = None
        self._metrics.spool_degraded.set(0)
        logger.warning(
            "delivery guarantee restored: the spool can be written again; %d message(s) went around it, "
            "%d of them dropped from memory, %d written to it now",
            self._bypassed,
            self._dropped,
            written,
        )
