"""The spool keeps messages on disk, in order, until they are removed."""

from __future__ import annotations

import logging
import os

import pytest

from monitor.errors import PublishError
from monitor.settings import SpoolSettings
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


#: Bytes of one snapshot in the WAL tests (the test clip's JPEGs are 40-70 KB).
SNAPSHOT_BYTES = 100_000
#: Most bytes the WAL may take: a quarter of the 2 MiB disk of the test (SQLite's default lets it
#: grow to 4 MiB before copying it back).
WAL_BOUND = 512 * 1024 + 2 * SNAPSHOT_BYTES


def test_the_wal_stays_bounded_on_a_small_disk(small_disk):
    """Snapshots pass through the WAL; on a 2 MiB disk it must never fill it, however many go by."""
    disk = small_disk(2048)
    path = disk.path / "spool.db"
    wal = path.with_name("spool.db-wal")
    largest_wal = least_free = None
    with Spool(path, synchronous="AUTO") as spool:
        spool.broker_connected(True)  # NORMAL, as while the broker acknowledges at once
        for i in range(300):  # 60 MB through a 2 MiB disk
            stored = spool.put(
                [
                    Outgoing("t/events", b"{}", False, 1.0),
                    Outgoing("t/snap", os.urandom(SNAPSHOT_BYTES), True),
                ]
            )
            size = wal.stat().st_size
            largest_wal = max(largest_wal or 0, size)
            least_free = min(least_free if least_free is not None else disk.available(), disk.available())
            for message in stored.messages:
                assert spool.remove(message.id), f"put {i}: row {message.id} vanished"
        assert spool.count() == 0
        spool.compact()
        assert wal.stat().st_size == 0, "a drained spool keeps its WAL"
    # 128 pages (4 KiB) between checkpoints, plus one transaction.
    bound = WAL_BOUND
    assert largest_wal is not None
    assert largest_wal <= bound, f"the WAL reached {largest_wal} bytes (bound {bound})"
    assert least_free is not None
    assert least_free > 512 * 1024, f"only {least_free} bytes were left free"
    print(f"largest WAL {largest_wal} B, least free {least_free} B of 2 MiB")  # noqa: T201


def test_a_spool_on_a_full_disk_says_so_and_nothing_is_stored(small_disk):
    disk = small_disk(1024)
    with Spool(disk.path / "spool.db") as spool:
        disk.fill()
        with pytest.raises(PublishError, match="cannot write to the spool"):
            spool.put([Outgoing("t/snap", bytes(SNAPSHOT_BYTES * 4), True)])
        with pytest.raises(PublishError):
            spool.probe()
        assert spool.count() == 0
        disk.free()
        spool.probe()
        assert spool.put([Outgoing("t/events", b"1")]).messages
        assert spool.count() == 1


def test_a_spool_cannot_be_created_on_a_full_disk(small_disk):
    disk = small_disk(512)
    disk.fill()
    with pytest.raises(PublishError, match=r"spool\.path .* cannot be used"):
        Spool(disk.path / "spool.db")  # and its connection is closed: no ResourceWarning
    disk.free()
    with Spool(disk.path / "spool.db") as spool:
        assert spool.count() == 0


def test_quarantine_moves_a_row_out_of_the_queue_and_keeps_the_newest(tmp_path, monkeypatch):
    from monitor import spool as spool_module

    monkeypatch.setattr(spool_module, "QUARANTINE_MAX", 2)
    with Spool(tmp_path / "spool.db") as spool:
        rows = spool.put([Outgoing(f"t/bad+{i}", str(i).encode()) for i in range(3)]).messages
        ok = spool.put([Outgoing("t/events", b"ok")]).messages
        for row in rows:
            assert spool.quarantine(row.id, "wildcard")
        assert not spool.quarantine(rows[0].id, "again")  # no longer queued
        assert [m.payload for m in spool.pending()] == [b"ok"]
        assert spool.count() == 1
        assert [(m.topic, reason) for m, reason in spool.quarantined()] == [
            ("t/bad+1", "wildcard"),
            ("t/bad+2", "wildcard"),
        ]
        assert ok[0].id > rows[-1].id


def test_messages_older_than_max_age_are_dropped(tmp_path):
    now = [1_000_000.0]
    with Spool(tmp_path / "spool.db", max_events=100, max_age=60.0, clock=lambda: now[0]) as spool:
        spool.put([Outgoing("t/events", b"old")])
        now[0] += 30
        spool.put([Outgoing("t/events", b"mid")])
        assert spool.oldest_age() == 30
        now[0] += 31  # "old" is 61 s old
        assert spool.trim() == 1
        assert [m.payload for m in spool.pending()] == [b"mid"]
        now[0] += 30  # "mid" is 61 s old: the next put drops it
        stored = spool.put([Outgoing("t/events", b"new")])
        assert stored.dropped == 1
        assert [m.payload for m in stored.messages] == [b"new"]
        assert [m.payload for m in spool.pending()] == [b"new"]
        assert spool.count() == 1


def test_a_batch_larger_than_the_spool_keeps_its_newest_messages(tmp_path):
    with Spool(tmp_path / "spool.db", max_events=3) as spool:
        spool.put([Outgoing("t/events", b"a")])
        stored = spool.put([Outgoing("t/events", bytes([c])) for c in b"bcdef"])
        assert stored.dropped == 3
        assert [m.payload for m in stored.messages] == [b"d", b"e", b"f"]
        assert [m.payload for m in spool.pending()] == [b"d", b"e", b"f"]
        assert spool.count() == 3


def test_remove_tells_whether_the_row_was_still_there(tmp_path):
    with Spool(tmp_path / "spool.db", max_events=1) as spool:
        first = spool.put([Outgoing("t/events", b"1")]).messages[0]
        spool.put([Outgoing("t/events", b"2")])  # drops the first
        assert spool.remove(first.id) is False
        assert spool.count() == 1


def test_drops_are_logged_once_per_burst_and_summed_up_when_the_spool_drains(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="monitor.spool")
    with Spool(tmp_path / "spool.db", max_events=4) as spool:
        rows = spool.put([Outgoing("t/events", bytes([i])) for i in range(4)]).messages
        for _ in range(3):
            rows += spool.put([Outgoing("t/events", b"more")]).messages
        assert [r.getMessage().startswith("spool limit reached") for r in caplog.records] == [True]
        for row in rows[3:5]:
            spool.remove(row.id)  # 4 -> 2 left: half of max_events
        assert "3 message(s) were dropped while it was full" in caplog.records[-1].getMessage()
        spool.put([Outgoing("t/events", b"x")] * 3)  # full again: a new burst
        assert sum("spool limit reached" in r.getMessage() for r in caplog.records) == 2


def test_the_spool_bounds_default_to_the_spool_settings(tmp_path):
    defaults = SpoolSettings()
    with Spool(tmp_path / "spool.db") as spool:
        assert (spool.max_events, spool.max_age) == (defaults.max_events, defaults.max_age)
