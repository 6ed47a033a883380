"""The spool: events on disk until the broker acknowledges them.

SQLite in WAL mode with ``synchronous=FULL``: a message is on disk before it
is handed to MQTT and is deleted only when its PUBACK arrives, so neither a
broker outage nor a daemon crash (nor a power cut) loses it. On start the
publisher replays whatever is left, oldest first.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import PublishError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    capture_time REAL,
    created REAL NOT NULL
)
"""


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


class Spool:
    """A durable FIFO of MQTT messages. Thread-safe.

    Args:
        path: The SQLite file; its directory is created.

    Raises:
        PublishError: The file cannot be opened or is not a spool.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise PublishError(f"spool.path {str(path)!r} cannot be used: {exc}") from exc

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def put(self, messages: list[Outgoing]) -> list[Message]:
        """Store messages in one transaction; return them with their ids."""
        now = time.time()
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
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise PublishError(f"cannot write to the spool {str(self.path)!r}: {exc}") from exc
        return stored

    def remove(self, message_id: int) -> None:
        """Forget an acknowledged message."""
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def pending(self) -> list[Message]:
        """Every stored message, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, retain, capture_time FROM messages ORDER BY id"
            ).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def count(self) -> int:
        """Messages stored."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
