"""The MQTT topic scheme: every topic the daemon publishes on is built here.

Topics (``P`` is ``mqtt.topic_prefix``):

* ``P/available`` (``P/instances/<id>/available`` when several daemons share
  the cameras): retained ``online`` / ``offline``, and the last will;
* ``P/events``: one JSON event per message, and the same on
  ``P/<camera>/<category>``;
* ``P/reviews``: one JSON visit (review item) per message, new/update/end;
* ``P/<camera>/<label>/snapshot``: retained annotated JPEG of an event's best frame;
* ``P/<camera>/status``: retained JSON camera state.

Camera names and labels go into topics as they are: a label with an MQTT
wildcard (``per+son``) makes a topic paho refuses, which the publisher
quarantines instead of replaying it forever (see ``monitor.publisher``).
"""

from __future__ import annotations

from dataclasses import dataclass

from monitor.cluster import INSTANCE_ID

#: Characters that a topic name must not contain (MQTT wildcards, and NUL).
FORBIDDEN = ("#", "+", "\0")


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one daemon; checked on creation, so an invalid one cannot exist.

    Args:
        prefix: ``mqtt.topic_prefix``: every topic starts with it.
        instance: The daemon's instance id when several daemons share the cameras (its
            availability then has a topic of its own); None for a daemon on its own.

    Raises:
        ValueError: The prefix is empty, has a wildcard or NUL, or starts or ends with ``/``;
            or the instance id is not a valid one.
    """

    prefix: str
    instance: str | None = None

    def __post_init__(self) -> None:
        prefix = self.prefix
        if (
            not prefix
            or any(c in prefix for c in FORBIDDEN)
            or prefix.startswith("/")
            or prefix.endswith("/")
        ):
            raise ValueError(
                f"prefix must be non-empty, without # + or NUL, and not start or end with /, got {prefix!r}"
            )
        if self.instance is not None and not INSTANCE_ID.match(self.instance):
            raise ValueError(f"instance must match {INSTANCE_ID.pattern}, got {self.instance!r}")

    def _join(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def available(self) -> str:
        """Availability (``online`` / ``offline``): one per daemon, so one stopping marks no other offline."""
        if self.instance is None:
            return self._join("available")
        return self._join("instances", self.instance, "available")

    def events(self) -> str:
        """Where every event goes."""
        return self._join("events")

    def reviews(self) -> str:
        """Where every visit (review item) goes: one notification per visit."""
        return self._join("reviews")

    def status(self, camera: str) -> str:
        """A camera's retained state."""
        return self._join(camera, "status")

    def category(self, camera: str, category: str) -> str:
        """A copy of a camera's events of one category (wildlife, person, vehicle, other)."""
        return self._join(camera, category)

    def snapshot(self, camera: str, label: str) -> str:
        """The retained annotated JPEG of a camera's latest event with this label."""
        return self._join(camera, label, "snapshot")
