"""Two shards of one configuration: every camera runs exactly once, events from all arrive."""

from __future__ import annotations

import json

import pytest

from monitor.cluster import owners
from tests.conftest import CLIP, base_config, free_port, wait_until

pytestmark = pytest.mark.integration

CAMERAS = ["gate", "barn", "orchard", "pond"]


def test_two_shards_split_the_cameras_and_report_their_own_availability(
    weights, tmp_path, broker, subscriber_factory, daemon_factory
):
    shards = owners(CAMERAS, 2)
    assert set(shards.values()) == {0, 1}, "the test needs cameras on both shards"
    events = subscriber_factory(broker.port, "test/#")
    daemons = []
    for index in (0, 1):
        config = base_config(
            weights,
            tmp_path / f"shard{index}",
            broker.port,
            free_port(),
            cameras={name: {"url": str(CLIP), "detect": {"fps": 2}} for name in CAMERAS},
            cluster={"shard_count": 2, "shard_index": index, "instance_id": f"monitor-{index}"},
        )
        config["model"]["imgsz"] = 320
        config["mqtt"]["client_id"] = f"monitor-{index}"
        (tmp_path / f"shard{index}").mkdir()
        daemons.append(daemon_factory(config))

    for index in (0, 1):
        events.wait_for(
            lambda m, i=index: m.topic == f"test/instances/monitor-{i}/available" and m.payload == b"online",
            10,
            f"monitor-{index} online",
        )
    # An event from every camera, each from the daemon that owns it.
    for name in CAMERAS:
        message = events.wait_for(
            lambda m, n=name: m.topic == "test/events" and json.loads(m.payload)["camera"] == n,
            90,
            f"an event of {name}",
        )
        assert json.loads(message.payload)["instance"] == f"monitor-{shards[name]}"

    # From the metrics: each daemon processes its own cameras and never the other's.
    def processed(daemon, name: str) -> float:
        return daemon.metrics().get(f'monitor_camera_frames_processed_total{{camera="{name}"}}', 0.0)

    wait_until(
        lambda: all(processed(daemons[shards[n]], n) > 0 for n in CAMERAS), 30, "every camera processed"
    )
    for name in CAMERAS:
        assert processed(daemons[1 - shards[name]], name) == 0, f"{name} processed by both shards"

    for index, daemon in enumerate(daemons):
        assert daemon.terminate() == 0
        events.wait_for(
            lambda m, i=index: m.topic == f"test/instances/monitor-{i}/available" and m.payload == b"offline",
            10,
            f"monitor-{index} offline",
        )
