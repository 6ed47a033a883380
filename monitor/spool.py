"""The spool: events on disk until the broker acknowledges them.

SQLite in WAL mode: a message is committed before it is handed to MQTT and
is deleted only when its PUBACK arrives, so neither a broker outage nor a
daemon crash (``kill -9``) loses it. On start the publisher replays whatever
is left, oldest first.

How far a commit goes toward the disk is ``synchronous``. The daemon passes
``spool.synchronous``, whose default is ``auto``: ``FULL`` (an fsync per
write, survives a power cut) while the broker is away, when messages may wait
for hours, and ``NORMAL`` (survives a crash of the process, not of the
machine) while it is connected and a PUBACK follows within milliseconds. This
class on its own defaults to ``FULL``; ``full`` and ``normal`` pin one mode.

The spool is bounded so that a broker gone for weeks cannot fill the disk:
past ``max_events`` messages, or for messages older than ``max_age`` seconds,
the oldest rows are dropped in the same transaction that adds new ones (or by
``trim``), and the caller is told how many. One warning says when a burst of
drops starts, one line how many it dropped once the spool has drained to half.

Deletes after a PUBACK are committed with ``synchronous=NORMAL``: in WAL mode
a later ``FULL`` commit syncs them too, and one lost to a power cut only
means the message is sent once more (at-least-once), never that one is lost.

The write-ahead log is bounded too, since every snapshot JPEG passes through
it: SQLite copies it back into the database every ``WAL_AUTOCHECKPOINT_PAGES``
pages (its default, 1000 pages, is 4 MiB: more than a small disk), truncates
it to ``WAL_SIZE_LIMIT`` when it starts over, and to nothing when the spool
drains (``compact``). So the files take what is pending, plus at most about
``WAL_AUTOCHECKPOINT_PAGES`` pages and one transaction.

A message that MQTT can never carry (a topic with a wildcard) is moved to
the ``quarantine`` table (the last ``QUARANTINE_MAX`` are kept for a look
with ``sqlite3``) instead of being replayed at every start.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from monitor.errors import PublishError
from monitor.settings import SpoolSettings

logger = logging.getLogger(__name__)

#: Defaults of ``max_events`` and ``max_age`` (seconds): those of the ``spool`` settings.
DEFAULT_MAX_EVENTS: int = SpoolSettings.model_fields["max_events"].default
DEFAULT_MAX_AGE: float = SpoolSettings.model_fields["max_age"].default
#: WAL pages (4 KiB) after which a commit copies the log back into the database (SQLite: 1000).
WAL_AUTOCHECKPOINT_PAGES = 128
#: Bytes the WAL file is truncated to when it starts over after a checkpoint.
WAL_SIZE_LIMIT = 512 * 1024
#: Least seconds between two truncations of the WAL when the spool drains (each one syncs).
COMPACT_INTERVAL = 5.0
#: Quarantined messages kept (the oldest go first).
QUARANTINE_MAX = 100

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    capture_time REAL,
    created REAL NOT NULL
)
""",
    """
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    capture_time REAL,
    created REAL NOT NULL,
    reason TEXT NOT NULL,
    quarantined REAL NOT NULL
)
""",
    "CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, written REAL NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class Message:
    """One stored MQTT message.

    Attributes:
        id: Spool row id (increasing in write order).
        topic: Full topic.
        payload: Bytes to publish.
        retain: MQTT retain flag.
        capture_time: Capture time of the frame behind it, for the latency metric.
    """

    id: int
    topic: str
    payload: bytes
    retain: bool
    capture_time: float | None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to store (no id yet)."""

    topic: str
    payload: bytes
    retain: bool = False
    capture_time: float | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """What ``Spool.put`` did.

    Attributes:
        messages: The new messages still in the spool, with their ids, oldest first
            (all of them unless the batch alone was larger than ``max_events``).
        dropped: Rows dropped to stay within ``max_events`` and ``max_age``.
    """

    messages: list[Message]
    dropped: int


class Spool:
    """A durable, bounded FIFO of MQTT messages. Thread-safe.

    Args:
        path: The SQLite file; its directory is created.
        max_events: Most rows kept; past it the oldest are dropped.
        max_age: Seconds a row is kept; older rows are dropped.
        clock: Wall-clock time (``time.time``); tests pass their own.
        synchronous: SQLite's ``synchronous`` for writes: ``FULL`` survives a power cut,
            ``NORMAL`` only a crash of the process (the benchmark compares them); ``AUTO``
            is ``NORMAL`` while the broker is connected (a message is acknowledged within
            milliseconds) and ``FULL`` while it is not (messages wait on disk, maybe for
            hours); the switch to ``FULL`` syncs what was written before it.

    Raises:
        PublishError: The file cannot be opened or is not a spool.
    """

    def __init__(
        self,
        path: Path,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
        synchronous: Literal["FULL", "NORMAL", "AUTO"] = "FULL",
    ) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be >= 1, got {max_events}")
        if max_age <= 0:
            raise ValueError(f"max_age must be > 0 seconds, got {max_age}")
        if synchronous not in ("FULL", "NORMAL", "AUTO"):
            raise ValueError(f"synchronous must be FULL, NORMAL or AUTO, got {synchronous!r}")
        self._auto = synchronous == "AUTO"
        # AUTO starts FULL: nothing is connected yet.
        initial: Literal["FULL", "NORMAL"] = "NORMAL" if synchronous == "NORMAL" else "FULL"
        self.path = path
        self.max_events = max_events
        self.max_age = max_age
        self._clock = clock
        self._synchronous = initial
        self._lock = threading.Lock()
        self._closed = False
        self._compacted = float("-inf")  # monotonic time of the last compact()
        self._burst: int | None = None  # rows dropped since the spool was last at most half full
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise PublishError(f"spool.path {str(path)!r} cannot be used: {exc}") from exc
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # SQLite answers with the old mode when it cannot switch
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (still {mode})")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.execute(f"PRAGMA synchronous={initial}")
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._count = int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        except sqlite3.Error as exc:
            self._db.close()
            raise PublishError(f"spool.path {str(path)!r} cannot be used: {exc}") from exc

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._closed = True
            self._db.close()

    def put(self, messages: list[Outgoing]) -> Stored:
        """Store messages in one transaction, dropping the oldest rows past the bounds.

        Raises:
            PublishError: The spool cannot be written (nothing was stored).
        """
        now = self._clock()
        stored = []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for m in messages:
                    cursor = self._db.execute(
                        "INSERT INTO messages (topic, payload, retain, capture_time, created)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (m.topic, m.payload, int(m.retain), m.capture_time, now),
                    )
                    assert cursor.lastrowid is not None
                    stored.append(Message(cursor.lastrowid, m.topic, m.payload, m.retain, m.capture_time))
                dropped, first_kept = self._trim(now, self._count + len(stored))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise PublishError(f"cannot write to the spool {str(self.path)!r}: {exc}") from exc
            self._count += len(stored) - dropped
            self._dropped(dropped)
        return Stored([m for m in stored if m.id >= first_kept], dropped)

    def trim(self) -> int:
        """Drop rows older than ``max_age`` (and past ``max_events``); return how many.

        Raises:
            PublishError: The spool cannot be written.
        """
        now = self._clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                dropped, _ = self._trim(now, self._count)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise PublishError(f"cannot trim the spool {str(self.path)!r}: {exc}") from exc
            self._count -= dropped
            self._dropped(dropped)
        return dropped

    def _trim(self, now: float, count: int) -> tuple[int, int]:
        """Inside a transaction: drop expired rows, then the oldest past ``max_events``.

        Returns:
            The number of rows dropped, and the least id that may still be there.
        """
        dropped = 0
        first_kept = 0
        oldest = self._db.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
        if oldest is not None and oldest[0] < now - self.max_age:
            # Rows are in id order and nearly in created order (the clock may step):
            # the first row tells cheaply whether anything expired at all.
            dropped += self._db.execute(
                "DELETE FROM messages WHERE created < ?", (now - self.max_age,)
            ).rowcount
        excess = count - dropped - self.max_events
        if excess > 0:
            (last,) = self._db.execute(
                "SELECT id FROM messages ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)
            ).fetchone()
            dropped += self._db.execute("DELETE FROM messages WHERE id <= ?", (last,)).rowcount
            first_kept = last + 1
        return dropped, first_kept

    def _dropped(self, dropped: int) -> None:
        """With the lock held: log once when a burst of drops starts."""
        if not dropped:
            return
        if self._burst is None:
            logger.warning(
                "spool limit reached (spool.max_events=%d, spool.max_age=%.0f s): dropped the %d oldest "
                "message(s); further drops are counted in monitor_spool_dropped_total and summed up "
                "once the spool drains",
                self.max_events,
                self.max_age,
                dropped,
            )
        self._burst = (self._burst or 0) + dropped

    def broker_connected(self, connected: bool) -> None:
        """With ``synchronous=AUTO``: NORMAL while connected, FULL (after syncing the WAL) while not."""
        if not self._auto:
            return
        wanted: Literal["FULL", "NORMAL"] = "NORMAL" if connected else "FULL"
        with self._lock:
            if self._closed or wanted == self._synchronous:
                return
            try:
                self._db.execute(f"PRAGMA synchronous={wanted}")
                self._synchronous = wanted
                if wanted == "FULL":  # what was committed under NORMAL reaches the disk now
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                raise PublishError(f"cannot change the spool's durability: {exc}") from exc

    def remove(self, message_id: int) -> bool:
        """Forget an acknowledged message; False when it was no longer there (dropped).

        Raises:
            PublishError: The spool cannot be written.
        """
        with self._lock:
            try:
                # Not synced on its own: a lost delete only means one duplicate.
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    removed = (
                        self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,)).rowcount > 0
                    )
                finally:
                    self._db.execute(f"PRAGMA synchronous={self._synchronous}")
            except sqlite3.Error as exc:
                raise PublishError(f"cannot delete from the spool {str(self.path)!r}: {exc}") from exc
            self._count -= int(removed)
            if self._burst is not None and self._count <= self.max_events // 2:
                logger.info(
                    "the spool is draining; %d message(s) were dropped while it was full", self._burst
                )
                self._burst = None
            if self._count == 0 and time.monotonic() - self._compacted >= COMPACT_INTERVAL:
                self._compact()
        return removed

    def compact(self) -> None:
        """Copy the WAL back into the database and truncate it, when nothing is pending.

        Raises:
            PublishError: The checkpoint failed (a full disk: the database cannot grow).
        """
        with self._lock:
            if self._closed or self._count:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise PublishError(f"cannot checkpoint the spool {str(self.path)!r}: {exc}") from exc
            self._compacted = time.monotonic()

    def _compact(self) -> None:
        """``compact`` with the lock held, after the spool drained; a failure waits for the next drain."""
        self._compacted = time.monotonic()
        try:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            logger.debug("cannot truncate the spool's WAL: %s", exc)
            return
        if busy:
            logger.debug("the spool's WAL was busy; truncated at the next drain")

    def quarantine(self, message_id: int, reason: str) -> bool:
        """Move a message that can never be sent out of the queue; False when it was no longer there.

        The newest ``QUARANTINE_MAX`` quarantined messages are kept, with the reason.

        Raises:
            PublishError: The spool cannot be written (the message stays queued).
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                moved = self._db.execute(
                    "INSERT INTO quarantine (id, topic, payload, retain, capture_time, created, reason,"
                    " quarantined) SELECT id, topic, payload, retain, capture_time, created, ?, ?"
                    " FROM messages WHERE id = ?",
                    (reason, self._clock(), message_id),
                ).rowcount
                self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                self._db.execute(
                    "DELETE FROM quarantine WHERE id NOT IN"
                    " (SELECT id FROM quarantine ORDER BY id DESC LIMIT ?)",
                    (QUARANTINE_MAX,),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise PublishError(f"cannot quarantine spool row {message_id}: {exc}") from exc
            self._count -= int(moved > 0)
        return moved > 0

    def quarantined(self) -> list[tuple[Message, str]]:
        """The quarantined messages, oldest first, each with the reason it could not be sent."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, retain, capture_time, reason FROM quarantine ORDER BY id"
            ).fetchall()
        return [(Message(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]), r[5]) for r in rows]

    def probe(self) -> None:
        """Commit one small write, to tell whether the spool can be written again.

        Raises:
            PublishError: It cannot (a full or read-only disk).
        """
        with self._lock:
            try:
                self._db.execute("INSERT OR REPLACE INTO probe (id, written) VALUES (1, ?)", (self._clock(),))
            except sqlite3.Error as exc:
                raise PublishError(f"cannot write to the spool {str(self.path)!r}: {exc}") from exc

    def pending(self, after: int = 0, limit: int = -1) -> list[Message]:
        """Stored messages with an id above ``after``, oldest first, at most ``limit`` (-1: all).

        Raises:
            PublishError: The spool cannot be read.
        """
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, topic, payload, retain, capture_time FROM messages WHERE id > ?"
                    " ORDER BY id LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise PublishError(f"cannot read the spool {str(self.path)!r}: {exc}") from exc
        return [Message(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def count(self) -> int:
        """Messages stored."""
        return self._count

    def oldest_age(self) -> float:
        """Seconds since the oldest stored message was written; 0 when empty (or closed), NaN unreadable."""
        with self._lock:
            if self._closed:
                return 0.0
            try:
                row = self._db.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error:  # read at scrape time: /metrics must still answer
                return float("nan")
        return max(0.0, self._clock() - row[0]) if row is not None else 0.0
