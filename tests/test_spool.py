"""The spool keeps messages on disk, in order, until they are removed."""

from __future__ import annotations

import pytest

from monitor.errors import PublishError
from monitor.spool import Outgoing, Spool


def test_messages_survive_reopening_in_order(tmp_path):
    path = tmp_path / "state" / "spool.db"
    with Spool(path) as spool:
        stored = spool.put([Outgoing("t/events", b"1", False, 10.0), Outgoing("t/snap", b"\xff\xd8", True)])
        spool.put([Outgoing("t/events", b"2")])
        spool.remove(stored.messages[0].id)
    with Spool(path) as spool:
        pending = spool.pending()
    assert [(m.topic, m.payload, m.retain) for m in pending] == [
        ("t/snap", b"\xff\xd8", True),
        ("t/events", b"2", False),
    ]
    assert pending[0].id < pending[1].id


def test_unusable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PublishError, match=r"spool\.path"):
        Spool(blocker / "spool.db")


def test_auto_durability_follows_the_broker_connection(tmp_path):
    import sqlite3

    path = tmp_path / "spool.db"
    with Spool(path, synchronous="AUTO") as spool:
        mode = lambda: spool._db.execute("PRAGMA synchronous").fetchone()[0]  # noqa: E731
        assert mode() == 2  # FULL: nothing is connected at start
        spool.broker_connected(True)
        assert mode() == 1  # NORMAL while the broker acknowledges within milliseconds
        spool.put([Outgoing("t/events", b"1")])
        spool.broker_connected(False)
        assert mode() == 2  # FULL again while messages wait on disk
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    finally:
        db.close()
