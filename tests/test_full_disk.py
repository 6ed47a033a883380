"""A full disk never kills the daemon or loses an alert (issue 17).

Real small file systems (a tmpfs, else an ext4 image on a loop device) that
the tests fill with a file of zeros, real Mosquitto, the real daemon on the
real weights. The ``small_disk`` fixture is conftest.py's, shared with the
spool, publisher and snapshot tests.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from typing import Any

import pytest

from monitor.configfile import load_settings
from tests.conftest import CLIP, base_config, free_port, wait_until

#: Size of the file system under the daemon's spool and snapshots (both on it).
DAEMON_DISK_KIB = 4096


def readyz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def events_of(messages: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic == "test/events"]


@pytest.mark.integration
def test_on_a_full_disk_events_keep_arriving_and_the_spool_takes_over_when_space_returns(
    small_disk, weights, tmp_path, broker, subscriber_factory, daemon_factory
):
    disk = small_disk(DAEMON_DISK_KIB)
    disk.fill()  # full before the daemon starts: the spool file cannot even be created
    sub = subscriber_factory(broker.port, "test/#")
    config = base_config(weights, tmp_path, broker.port, free_port(), cameras={"cam1": {"url": str(CLIP)}})
    config["spool"] = {"path": str(disk.path / "spool" / "spool.db")}
    config["snapshots"] = {"path": str(disk.path / "snapshots")}
    daemon = daemon_factory(config)

    assert daemon.metrics()["monitor_spool_degraded"] == 1
    assert "spool" in readyz(daemon.http_port)["degraded"]

    # A whole track arrives: its new (with the MQTT snapshot, which needs no disk) and its end.
    new = sub.wait_for(
        lambda m: m.topic == "test/events" and json.loads(m.payload)["type"] == "new", 90, "a new event"
    )
    first = json.loads(new.payload)
    sub.wait_for(lambda m: m.topic == first["snapshot"], 10, "the new event's snapshot")
    sub.wait_for(
        lambda m: (
            m.topic == "test/events"
            and (json.loads(m.payload)["event_id"], json.loads(m.payload)["type"])
            == (first["event_id"], "end")
        ),
        60,
        "the end of the first track",
    )
    during = daemon.metrics()
    assert during["monitor_spool_degraded"] == 1
    assert during["monitor_spool_bypassed_total"] >= 3  # new, its snapshot, end
    assert during["monitor_snapshot_save_failures_total"] >= 1
    degraded = readyz(daemon.http_port)["degraded"]
    assert "disk is full" in degraded["spool"] or "No space" in degraded["spool"], degraded
    assert "No space left on device" in degraded["snapshots"], degraded
    assert daemon.proc.poll() is None

    disk.free()
    wait_until(lambda: daemon.metrics()["monitor_spool_degraded"] == 0, 30, "the spool to take over again")
    bypassed = daemon.metrics()["monitor_spool_bypassed_total"]
    sub.drain()
    seen = {e["event_id"] for e in events_of(sub.seen)}
    later = sub.wait_for(
        lambda m: (
            m.topic == "test/events"
            and json.loads(m.payload)["type"] == "new"
            and json.loads(m.payload)["event_id"] not in seen
        ),
        120,
        "a new event once space is back",
    )
    later_id = json.loads(later.payload)["event_id"]
    # The snapshot store works again too: /readyz has nothing degraded left.
    wait_until(lambda: readyz(daemon.http_port)["degraded"] == {}, 10, "/readyz to say nothing is degraded")
    served = urllib.request.urlopen(
        f"http://127.0.0.1:{daemon.http_port}/api/events/{later_id}/snapshot.jpg", timeout=5
    ).read()
    assert served[:2] == b"\xff\xd8"
    wait_until(lambda: daemon.metrics()["monitor_spool_pending"] == 0, 20, "the spool to drain")
    after = daemon.metrics()
    assert after["monitor_spool_bypassed_total"] == bypassed, "events went around a writable spool"
    assert after["monitor_spool_degraded"] == 0
    assert (disk.path / "spool" / "spool.db").stat().st_size > 0

    assert daemon.proc.poll() is None, "the daemon exited"
    assert daemon.terminate() == 0
    sub.wait_for(lambda m: m.topic == "test/available" and m.payload == b"offline", 5, "available=offline")
    sub.drain()
    bodies = events_of(sub.seen)
    news = {e["event_id"] for e in bodies if e["type"] == "new"}
    ends = {e["event_id"] for e in bodies if e["type"] == "end"}
    assert later_id in news
    assert news == ends, "every track's new and end arrived, with matching event ids"
    log = daemon.log()
    assert log.count("delivery guarantee degraded") == 1
    assert log.count("delivery guarantee restored") == 1
    assert "Traceback" not in log


class _RaisingLoad:
    """A configuration loader that fails the way no ConfigError describes."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        raise RuntimeError("the new file made the loader trip")


@pytest.mark.integration
def test_a_reload_that_fails_unexpectedly_keeps_the_daemon_and_its_configuration(
    weights, tmp_path, broker, caplog
):
    from monitor.daemon import Daemon

    path = tmp_path / "monitor.yaml"
    path.write_text(json.dumps(base_config(weights, tmp_path, broker.port, free_port())))
    settings = load_settings(path)
    daemon = Daemon(settings)
    stop, reload = threading.Event(), threading.Event()
    load = _RaisingLoad()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run(stop, reload, load)
        except BaseException as exc:  # what would end `monitor run`
            failures.append(exc)

    thread = threading.Thread(target=run, name="test-daemon")
    caplog.set_level(logging.INFO, logger="monitor")
    thread.start()
    try:
        wait_until(lambda: daemon.running or failures, 120, "the daemon to start")
        assert not failures, failures
        reload.set()
        wait_until(lambda: load.calls == 1 and not reload.is_set(), 10, "the reload to be tried")
        wait_until(
            lambda: any("reload failed unexpectedly" in r.getMessage() for r in caplog.records),
            10,
            "the failed reload to be logged",
        )
        record = next(r for r in caplog.records if "reload failed unexpectedly" in r.getMessage())
        assert record.exc_info is not None, "logged without its traceback"
        reload.set()  # and again: the loop still serves reloads
        wait_until(lambda: load.calls == 2, 10, "a second reload to be tried")
        assert thread.is_alive(), f"the daemon stopped: {failures}"
        assert daemon.settings is settings
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert not failures, failures


def test_the_small_disk_helper_fills_up_and_frees(small_disk):
    disk = small_disk(512)
    assert disk.fill() > 0
    assert disk.available() == 0
    with pytest.raises(OSError, match="No space left"):
        (disk.path / "more").write_bytes(bytes(8192))
    disk.free()
    assert disk.available() > 400 * 1024
