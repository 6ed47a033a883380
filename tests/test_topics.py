"""The MQTT topic scheme (README's topics table): one ``Topics`` value builds every topic."""

from __future__ import annotations

import dataclasses

import pytest

from monitor.topics import Topics

SOLO = Topics("monitor")
CLUSTER = Topics("site/monitor", "gpu-1")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (SOLO.available(), "monitor/available"),
        (SOLO.events(), "monitor/events"),
        (SOLO.status("gate"), "monitor/gate/status"),
        (SOLO.category("gate", "wildlife"), "monitor/gate/wildlife"),
        (SOLO.snapshot("gate", "deer"), "monitor/gate/deer/snapshot"),
        # Several daemons: each its own availability, everything else shared.
        (CLUSTER.available(), "site/monitor/instances/gpu-1/available"),
        (
            Topics("site/monitor", "monitor-0.local").available(),
            "site/monitor/instances/monitor-0.local/available",
        ),
        (CLUSTER.events(), "site/monitor/events"),
        (CLUSTER.status("gate"), "site/monitor/gate/status"),
        (CLUSTER.category("gate", "person"), "site/monitor/gate/person"),
        (CLUSTER.snapshot("gate", "red fox"), "site/monitor/gate/red fox/snapshot"),
    ],
)
def test_each_topic_is_where_the_readme_says(topic, expected):
    assert topic == expected


def test_two_instances_never_share_an_availability_topic():
    assert Topics("m", "a").available() != Topics("m", "b").available() != Topics("m").available()


@pytest.mark.parametrize(
    ("prefix", "instance"),
    [
        ("", None),
        ("home/#", None),
        ("home/+/cams", None),
        ("/monitor", None),
        ("monitor/", None),
        ("mon\0itor", None),
        ("monitor", ""),
        ("monitor", "a/b"),
        ("monitor", "shard+1"),
        ("monitor", "-leading-dash"),
    ],
)
def test_an_invalid_prefix_or_instance_is_refused_with_the_value(prefix, instance):
    with pytest.raises(ValueError, match="prefix" if instance is None else "instance") as info:
        Topics(prefix, instance)
    assert repr(prefix if instance is None else instance) in str(info.value)


def test_a_topics_value_cannot_be_changed_into_an_invalid_one():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SOLO.prefix = "bad/#"  # type: ignore[misc]


def test_a_label_with_a_wildcard_is_passed_through_for_the_publisher_to_quarantine():
    # Refusing it here would lose the event itself; paho refuses only the snapshot topic.
    assert SOLO.snapshot("gate", "per+son") == "monitor/gate/per+son/snapshot"
