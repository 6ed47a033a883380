"""A full disk never kills the daemon or loses an alert (issue 17).

Real small file systems (a tmpfs, else an ext4 image on a loop device) that
the tests fill with a file of zeros, real Mosquitto, the real daemon on the
real weights. ``small_disk`` is imported by the spool, publisher and snapshot
tests too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from monitor.configfile import load_settings
from tests.conftest import CLIP, base_config, free_port, wait_until

#: Size of the file system under the daemon's spool and snapshots (both on it).
DAEMON_DISK_KIB = 4096


@dataclass
class SmallDisk:
    """A mounted small file system, and a filler file that takes all of its free space."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def fill(self) -> int:
        """Write zeros until the file system says ENOSPC; the bytes written."""
        written = 0
        chunk = 1 << 20
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while chunk:
                try:
                    written += os.write(fd, bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk //= 2  # down to the last byte
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        """Delete the filler: the space is back."""
        self.filler.unlink()

    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _mount(where: Path, size_kib: int) -> str | None:
    """Mount a ``size_kib`` file system on ``where``; None, or why neither kind could be mounted."""
    tmpfs = _run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(where))
    if tmpfs.returncode == 0:
        return None
    image = where.with_suffix(".img")
    with image.open("wb") as f:
        f.truncate(size_kib * 1024)
    mkfs = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    loop = _run("mount", "-o", "loop", str(image), str(where)) if mkfs.returncode == 0 else mkfs
    if loop.returncode == 0:
        return None
    return f"tmpfs: {tmpfs.stderr.strip() or tmpfs.returncode}; loop device: {loop.stderr.strip()}"


def _unmount(where: Path) -> None:
    if _run("umount", str(where)).returncode != 0:
        # Still busy (a child of a killed daemon closing its files): detach it now, freed later.
        _run("umount", "-l", str(where))


def small_disks(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    """The body of a ``small_disk`` fixture: ``make(size_kib)`` mounts a fresh small file system.

    Each is unmounted at teardown. Skips the test where neither a tmpfs nor a loop
    device can be mounted. Request the fixture before ``daemon_factory``, so that
    the daemon is killed before the unmount.
    """
    mounted: list[Path] = []

    def make(size_kib: int) -> SmallDisk:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        problem = _mount(where, size_kib)
        if problem is not None:
            pytest.skip(f"cannot mount a small file system here (needs root): {problem}")
        mounted.append(where)
        return SmallDisk(where)

    try:
        yield make
    finally:
        for where in reversed(mounted):
            _unmount(where)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    """``make(size_kib)``: a fresh small file system, unmounted at teardown (``small_disks``)."""
    yield from small_disks(tmp_path)


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
