"""Publishing through the spool to a real Mosquitto."""

from __future__ import annotations

import json
import time

from monitor.alerts import Alert, Event
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.settings import MqttSettings
from monitor.sources import CameraState, CameraStatus
from monitor.spool import Outgoing, Spool
from tests.conftest import make_event, wait_until


def event(event_id: str, kind: str = "new") -> Event:
    return make_event(event_id, kind)


def test_spooled_messages_from_a_previous_run_are_replayed_then_removed(tmp_path, broker, subscriber_factory):
    sub = subscriber_factory(broker.port, "t/#")
    with Spool(tmp_path / "spool.db") as spool:
        spool.put(
            [
                Outgoing("t/events", event(f"old-{i}").model_dump_json().encode(), False, time.time())
                for i in range(3)
            ]
        )
        metrics = Metrics()
        with Publisher(MqttSettings(port=broker.port, topic_prefix="t"), spool, metrics) as publisher:
            for i in range(3):
                sub.wait_for(
                    lambda m, i=i: m.topic == "t/events" and json.loads(m.payload)["event_id"] == f"old-{i}",
                    10,
                    f"replayed event old-{i}",
                )
            wait_until(lambda: spool.count() == 0, 10, "the spool to empty on PUBACK")
            assert publisher.connected
        assert metrics.registry.get_sample_value("monitor_alert_latency_seconds_count") == 3
        assert metrics.registry.get_sample_value("monitor_spool_pending") == 0
    order = [json.loads(m.payload)["event_id"] for m in sub.seen if m.topic == "t/events"]
    assert order == ["old-0", "old-1", "old-2"]


def test_events_made_while_the_broker_is_down_arrive_when_it_starts(tmp_path, broker, subscriber_factory):
    broker.stop()
    with (
        Spool(tmp_path / "spool.db") as spool,
        Publisher(MqttSettings(port=broker.port, topic_prefix="t"), spool, Metrics()) as publisher,
    ):
        publisher.publish(
            [Alert(event("e1"), b"\xff\xd8jpeg", time.time()), Alert(event("e1", "end"), None, time.time())]
        )
        assert spool.count() == 3  # event, snapshot, end: on disk while nobody listens
        broker.start()
        sub = subscriber_factory(
            broker.port, "t/#"
        )  # no persistence in this broker: subscribe before delivery
        sub.wait_for(
            lambda m: m.topic == "t/events" and json.loads(m.payload)["type"] == "end", 30, "the end event"
        )
        wait_until(lambda: spool.count() == 0, 10, "the spool to empty")
        snapshot = sub.wait_for(lambda m: m.topic == "t/gate/deer/snapshot", 5, "the snapshot")
        assert snapshot.payload == b"\xff\xd8jpeg"


def test_availability_and_retained_camera_status(tmp_path, broker, subscriber_factory):
    with Spool(tmp_path / "spool.db") as spool:
        publisher = Publisher(MqttSettings(port=broker.port, topic_prefix="t"), spool, Metrics())
        with publisher:
            publisher.publish_status(CameraStatus("gate", CameraState.ONLINE, 12.5, None, 2))
            wait_until(lambda: publisher.connected, 10, "a connection")
            late = subscriber_factory(broker.port, "t/#")
            status = late.wait_for(lambda m: m.topic == "t/gate/status", 10, "the retained status")
            assert json.loads(status.payload) == {
                "state": "online",
                "since": 12.5,
                "reason": None,
                "reconnects": 2,
            }
            late.wait_for(lambda m: m.topic == "t/available" and m.payload == b"online", 5, "online")
        late.wait_for(lambda m: m.topic == "t/available" and m.payload == b"offline", 5, "offline on close")
