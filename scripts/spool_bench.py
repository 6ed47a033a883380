"""What the on-disk spool costs: capture -> PUBACK latency with and without SQLite writes.

Starts a local Mosquitto on a free port and publishes RATE events per second
through the real ``monitor.publisher.Publisher`` for SECONDS per mode:

* ``memory``: the same Publisher code path with a spool that keeps its rows in
  a dict (no SQLite, no fsync): the baseline;
* ``full``: the real ``Spool`` with ``synchronous=FULL`` (``spool.synchronous:
  full``; the ``Spool`` class's own default: a message survives a power cut);
* ``normal``: the real ``Spool`` with ``synchronous=NORMAL`` (survives a crash
  of the daemon, not of the machine);
* ``auto`` (the daemon's default, ``spool.synchronous: auto``): NORMAL while the broker
  is connected, FULL while not.

Modes run interleaved, in ROUNDS rounds (the order rotates each round), each
with a fresh spool file in DIR (default: the system's temporary directory;
put it on the disk the daemon's spool will use), warmed up first. Latency is
the event's capture time (taken just before ``publish()``) to the broker's
PUBACK as paho reports it, as in
``monitor_alert_latency_seconds``; ``publish()`` is the time the pipeline loop
spends in the call. Usage:

    .venv/bin/python scripts/spool_bench.py [--rate 50] [--seconds 20] [--rounds 4] [--dir DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from monitor.alerts import Alert, Event
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.settings import MqttSettings
from monitor.spool import Message, Outgoing, Spool, Stored

Mode = Literal["memory", "full", "normal", "auto"]
MODES: tuple[Mode, ...] = ("memory", "full", "normal", "auto")
#: Events sent as fast as possible before measuring: past SQLite's first WAL
#: checkpoint (1000 pages), so the WAL file has its steady size, as in a
#: daemon that has run for a while, instead of growing on every commit.
WARMUP_EVENTS = 1500


class MemorySpool(Spool):
    """The spool's interface and bookkeeping with rows in a dict: the baseline without SQLite."""

    def __init__(self) -> None:
        self.path = Path(":memory:")
        self.max_events = 10_000
        self.max_age = 7 * 24 * 3600.0
        self._rows: dict[int, tuple[Message, float]] = {}
        self._next = 1
        self._mem_lock = threading.Lock()

    def close(self) -> None:
        pass

    def put(self, messages: list[Outgoing]) -> Stored:
        now = time.time()
        stored = []
        with self._mem_lock:
            for m in messages:
                message = Message(self._next, m.topic, m.payload, m.retain, m.capture_time)
                self._rows[self._next] = (message, now)
                self._next += 1
                stored.append(message)
        return Stored(stored, 0)

    def trim(self) -> int:
        return 0

    def broker_connected(self, connected: bool) -> None:
        pass

    def remove(self, message_id: int) -> bool:
        with self._mem_lock:
            return self._rows.pop(message_id, None) is not None

    def pending(self, after: int = 0, limit: int = -1) -> list[Message]:
        with self._mem_lock:
            rows = [m for i, (m, _) in sorted(self._rows.items()) if i > after]
        return rows if limit < 0 else rows[:limit]

    def count(self) -> int:
        return len(self._rows)

    def oldest_age(self) -> float:
        with self._mem_lock:
            first = min(self._rows.values(), key=lambda r: r[0].id, default=None)
        return 0.0 if first is None else time.time() - first[1]


class Recorder:
    """Stands in for the latency histogram: keeps every sample."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    def observe(self, value: float) -> None:
        self.samples.append(value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_broker(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("mosquitto did not start") from None
            time.sleep(0.05)


def make_alert(i: int) -> Alert:
    now = time.time()
    event = Event(
        type="update",
        event_id=f"{int(now)}-bench{i:06d}",
        camera="gate",
        label="person",
        score=0.91,
        top_score=0.93,
        box=[100.0, 120.0, 340.0, 610.0],
        track_id=i,
        start_time=now - 3.0,
        end_time=None,
        frame_time=now,
        model="yolov8s.pt@0123456789ab",
        snapshot=None,
    )
    return Alert(event, None, now)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def run(
    mode: Mode, port: int, directory: Path, rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    """One mode for ``seconds``: (capture -> PUBACK latencies, publish() durations), in seconds."""
    metrics = Metrics()
    recorder = Recorder()
    metrics.alert_latency = recorder  # type: ignore[assignment]
    if mode == "memory":
        spool: Spool = MemorySpool()
    else:
        path = directory / f"spool-{mode}-{time.monotonic_ns()}.db"
        spool = Spool(path, synchronous={"full": "FULL", "normal": "NORMAL", "auto": "AUTO"}[mode])
    settings = MqttSettings(port=port, topic_prefix="bench", client_id=f"bench-{mode}")
    calls: list[float] = []
    with spool, Publisher(settings, spool, metrics) as publisher:
        wait_until(lambda: publisher.connected, 10, "the connection")
        for i in range(WARMUP_EVENTS):
            publisher.publish([make_alert(i)])
        wait_until(lambda: spool.count() == 0, 30, "the warm-up PUBACKs")
        recorder.samples.clear()
        interval = 1.0 / rate
        start = time.perf_counter()
        n = int(seconds * rate)
        for i in range(n):
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            alert = make_alert(i)
            t0 = time.perf_counter()
            publisher.publish([alert])
            calls.append(time.perf_counter() - t0)
        wait_until(lambda: len(recorder.samples) >= n, 30, "every PUBACK")
        wait_until(lambda: spool.count() == 0, 10, "the spool to empty")
    return recorder.samples, calls


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def filesystem(path: Path) -> str:
    best = ("?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path.resolve()).startswith(mount) and len(mount) >= len(best[1]):
            best = (fstype, mount)
    return f"{best[0]} at {best[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (default 50)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per mode (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where spool files go")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed (scripts/setup installs it)")
    work = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
    latencies: dict[Mode, list[float]] = {m: [] for m in MODES}
    durations: dict[Mode, list[float]] = {m: [] for m in MODES}
    broker, port = start_broker(work)
    try:
        for r in range(args.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                got, calls = run(mode, port, work, args.rate, args.seconds / args.rounds)
                latencies[mode] += got
                durations[mode] += calls
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"{args.rate:g} events/s, {args.seconds:g} s per mode in {args.rounds} rounds; "
        f"spool on {filesystem(args.dir)}; {os.cpu_count()} CPUs"
    )
    print("capture -> PUBACK (ms)                  |  publish() call (ms)")
    print("mode     events    p50    p90    p99    max |    p50    p99")
    for mode in MODES:
        lat, call = [v * 1e3 for v in latencies[mode]], [v * 1e3 for v in durations[mode]]
        print(
            f"{mode:<8} {len(lat):>6} {percentile(lat, 0.5):>6.2f} {percentile(lat, 0.9):>6.2f}"
            f" {percentile(lat, 0.99):>6.2f} {max(lat):>6.2f} | {percentile(call, 0.5):>6.2f}"
            f" {percentile(call, 0.99):>6.2f}"
        )
    base = percentile(latencies["memory"], 0.99)
    for mode in ("full", "normal", "auto"):
        extra = (percentile(latencies[mode], 0.99) - base) * 1e3
        print(f"p99 added by the spool with synchronous={mode.upper()}: {extra:+.2f} ms")


if __name__ == "__main__":
    main()
