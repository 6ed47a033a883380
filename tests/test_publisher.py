"""Publishing through the spool to a real Mosquitto."""

from __future__ import annotations

import json
import logging
import time

from monitor import held as held_module
from monitor.alerts import Alert, Event
from monitor.frames import CameraState, CameraStatus
from monitor.metrics import Metrics
from monitor.publisher import Publisher
from monitor.settings import MqttSettings
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


#: A snapshot of about the test clip's size.
JPEG = b"\xff\xd8" + bytes(150_000)


def event_ids(messages) -> list[str]:
    return [json.loads(m.payload)["event_id"] for m in messages if m.topic == "t/events"]


def test_a_full_disk_sends_events_around_the_spool_until_space_returns(
    small_disk, broker, subscriber_factory, monkeypatch, caplog
):
    monkeypatch.setattr(held_module, "SPOOL_RETRY", 0.2)
    disk = small_disk(2048)
    sub = subscriber_factory(broker.port, "t/#")
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    settings = MqttSettings(port=broker.port, topic_prefix="t")
    caplog.set_level(logging.INFO, logger="monitor.held")
    with (
        Spool(disk.path / "spool.db", synchronous="AUTO") as spool,
        Publisher(settings, spool, metrics) as publisher,
    ):
        wait_until(lambda: publisher.connected, 10, "a connection")
        disk.fill()
        # 8 snapshots in one transaction: far more than the WAL could reuse.
        publisher.publish([Alert(event(f"full-{i}"), JPEG, time.time()) for i in range(8)])
        assert publisher.degraded is not None
        assert "full" in publisher.degraded
        assert sample("monitor_spool_degraded") == 1
        assert sample("monitor_spool_bypassed_total") == 16
        publisher.publish([Alert(event("full-8"), JPEG, time.time())])  # still around the spool
        for i in range(9):
            sub.wait_for(
                lambda m, i=i: m.topic == "t/events" and json.loads(m.payload)["event_id"] == f"full-{i}",
                10,
                f"event full-{i}",
            )
        wait_until(lambda: publisher.held == 0, 10, "the PUBACKs of the messages held in memory")
        assert spool.count() == 0

        disk.free()
        wait_until(lambda: publisher.degraded is None, 10, "the spool to take over again")
        assert sample("monitor_spool_degraded") == 0
        publisher.publish([Alert(event("back-0"), JPEG, time.time())])
        assert sample("monitor_spool_bypassed_total") == 18, "went around a spool that works"
        sub.wait_for(
            lambda m: m.topic == "t/events" and json.loads(m.payload)["event_id"] == "back-0", 10, "back-0"
        )
        wait_until(lambda: spool.count() == 0, 10, "the spool to empty on PUBACK")
    sub.drain()
    assert list(dict.fromkeys(event_ids(sub.seen))) == [*(f"full-{i}" for i in range(9)), "back-0"]
    snapshots = [m for m in sub.seen if m.topic == "t/gate/deer/snapshot"]
    assert len(snapshots) >= 10
    assert all(m.payload == JPEG for m in snapshots)
    assert sample("monitor_spool_bypass_dropped_total") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("delivery guarantee degraded" in m for m in messages) == 1
    assert sum("delivery guarantee restored" in m for m in messages) == 1


def test_a_message_mqtt_cannot_carry_is_quarantined_and_the_ones_behind_it_are_sent(
    tmp_path, broker, subscriber_factory, caplog
):
    bad_topic = "t/gate/per+son/snapshot"  # a label with a wildcard: paho refuses the topic
    sub = subscriber_factory(broker.port, "t/#")
    metrics = Metrics()
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        spool.put(
            [
                Outgoing(bad_topic, b"\xff\xd8old", True),
                *(
                    Outgoing("t/events", event(f"behind-{i}").model_dump_json().encode(), False, time.time())
                    for i in range(3)
                ),
            ]
        )
        with Publisher(MqttSettings(port=broker.port, topic_prefix="t"), spool, metrics) as publisher:
            for i in range(3):
                sub.wait_for(
                    lambda m, i=i: (
                        m.topic == "t/events" and json.loads(m.payload)["event_id"] == f"behind-{i}"
                    ),
                    10,
                    f"behind-{i}, spooled after the message MQTT cannot carry",
                )
            live = event("live").model_copy(update={"label": "per+son", "snapshot": bad_topic})
            publisher.publish(
                [Alert(live, b"\xff\xd8new", time.time()), Alert(event("after"), None, time.time())]
            )
            sub.wait_for(
                lambda m: m.topic == "t/events" and json.loads(m.payload)["event_id"] == "after", 10, "after"
            )
            wait_until(lambda: spool.count() == 0, 10, "the spool to empty")
        assert metrics.registry.get_sample_value("monitor_spool_quarantined_total") == 2
        assert metrics.registry.get_sample_value("monitor_spool_pending") == 0
        quarantined = spool.quarantined()
        assert [(m.topic, m.payload) for m, _ in quarantined] == [
            (bad_topic, b"\xff\xd8old"),
            (bad_topic, b"\xff\xd8new"),
        ]
        assert all("wildcard" in reason for _, reason in quarantined)
    with Spool(path) as reopened:
        assert reopened.count() == 0, "the next start would replay it again"
    sub.drain()
    assert "live" in event_ids(sub.seen)  # the event itself went; only its snapshot could not
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "monitor.publisher"]
    assert len(errors) == 2
    assert all(bad_topic in r.getMessage() for r in errors)
