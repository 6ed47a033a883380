"""A daemon-like publisher in a process of its own, for the crash test in test_delivery.py.

Usage: ``python tests/publisher_proc.py SPOOL PORT COUNT RUN``

Opens the spool and a ``Publisher`` (prefix ``t``, broker 127.0.0.1:PORT; the
spool is replayed on start), prints ``STARTED <pending>``, publishes COUNT
events with ids ``RUN-0`` .. ``RUN-<COUNT-1>``, printing ``SPOOLED <n>`` once
the n-th is on disk, then blocks. SIGTERM stops it cleanly (exit 0); the test
uses SIGKILL for the crash.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from monitor import publisher as publisher_module
from monitor.alerts import Alert, Event
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.settings import MqttSettings
from monitor.spool import Spool


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(spool_path: Path, port: int, count: int, run: str) -> int:
    # Tests wait for the reconnect: keep the backoff short.
    publisher_module.RECONNECT_MAX = publisher_module.RECONNECT_MIN
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = MqttSettings(port=port, topic_prefix="t", client_id=f"proc-{run}")
    # The daemon's default durability (spool.synchronous: auto): FULL while the broker is away.
    with (
        Spool(spool_path, synchronous="AUTO") as spool,
        Publisher(settings, spool, Metrics()) as publisher,
    ):
        say(f"STARTED {spool.count()}")
        for i in range(count):
            now = time.time()
            event = Event(
                type="end",
                event_id=f"{run}-{i}",
                camera="gate",
                label="deer",
                score=0.9,
                top_score=0.9,
                box=[1.0, 2.0, 3.0, 4.0],
                track_id=i,
                start_time=now,
                end_time=now,
                frame_time=now,
                model="m.pt@abc",
                snapshot=None,
            )
            publisher.publish([Alert(event, None, now)])  # returns once the spool has it on disk
            say(f"SPOOLED {i + 1}")
        stop.wait()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
