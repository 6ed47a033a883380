"""Visits ("review items", as in Frigate 0.14+): a camera's overlapping or adjacent events as one.

A dog and a person walking in together are two events but one visit, so a
consumer that wants one notification per visit subscribes to
``<prefix>/reviews`` instead of ``<prefix>/events``. ``Visits`` is stepped with
the events the daemon publishes, in their order (new, update..., end per
track), and returns the ``Review`` messages to publish. It does no I/O: the
daemon publishes the reviews and journals ``Visits.open`` so that a restart
can end a visit that a crash left open (``monitor.recorder``).

A visit's labels, zones and severity only grow: a review never takes back what
an earlier one of the same visit said.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from monitor.events import Event
from monitor.record_settings import AlertRule

Severity = Literal["alert", "detection"]
ReviewType = Literal["new", "update", "end"]


class Review(BaseModel):
    """A visit on ``<prefix>/reviews`` (JSON): one ``new``, ``update`` as it grows, one ``end``."""

    type: ReviewType = Field(description="new: the visit began; update: it grew; end: it is over.")
    visit_id: str = Field(description="Stable for one visit's new, update and end.")
    camera: str = Field(description="The camera all its events are on.")
    severity: Severity = Field(
        description="alert: one of its events matched an alerts rule; else detection. Never goes down."
    )
    labels: list[str] = Field(description="Sorted union of its events' labels and sub_labels so far.")
    zones: list[str] = Field(description="Sorted union of the zones its events entered so far.")
    event_ids: list[str] = Field(description="Its events, in the order they started.")
    start_time: float = Field(description="Capture time (Unix seconds) its first event started.")
    end_time: float | None = Field(description="On end: capture time its last event ended, else null.")
    snapshot: str | None = Field(
        description="HTTP path of the snapshot of its best-scoring event that has one, else null."
    )
    clip: str | None = Field(None, description="On end, where recording is on: HTTP path of its MP4 clip.")
    clip_error: str | None = Field(None, description="On end, why the clip could not be made, else null.")
    instance: str | None = Field(None, description="Id of the daemon that saw it (cluster.instance_id).")


def matches(rule: AlertRule, event: Event) -> bool:
    """Whether ``event`` satisfies everything ``rule`` sets (an empty list sets nothing)."""
    names = {event.label, event.category} | ({event.sub_label} if event.sub_label is not None else set())
    label_ok = not rule.labels or not names.isdisjoint(rule.labels)
    zone_ok = not rule.zones or not set(rule.zones).isdisjoint(event.entered_zones)
    return label_ok and zone_ok


def snapshot_path(event_id: str) -> str:
    """The HTTP path ``monitor.api`` serves an event's snapshot on."""
    return f"/api/events/{event_id}/snapshot.jpg"


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a visit keeps of one of its events."""

    start_time: float
    #: Latest capture time known: start, last frame reported, or end.
    last_time: float
    ended: bool
    top_score: float
    has_snapshot: bool


@dataclass(slots=True)
class _Visit:
    """The open visit's mutable state (only ``Visits`` touches it)."""

    visit_id: str
    severity: Severity = "detection"
    labels: set[str] = field(default_factory=set)
    zones: set[str] = field(default_factory=set)
    #: In arrival order; ``event_ids`` sorts them by start time (stable, so ties keep arrival order).
    events: dict[str, _Seen] = field(default_factory=dict)
    instance: str | None = None

    @property
    def latest(self) -> float:
        return max(seen.last_time for seen in self.events.values())

    def review(self, kind: ReviewType, camera: str, end_time: float | None = None) -> Review:
        order = sorted(self.events.items(), key=lambda item: item[1].start_time)
        with_snapshot = [(eid, seen) for eid, seen in order if seen.has_snapshot]
        # max() keeps the first of equal scores: the earliest-started event wins a tie.
        best = max(with_snapshot, key=lambda item: item[1].top_score, default=None)
        return Review(
            type=kind,
            visit_id=self.visit_id,
            camera=camera,
            severity=self.severity,
            labels=sorted(self.labels),
            zones=sorted(self.zones),
            event_ids=[eid for eid, _ in order],
            start_time=min(seen.start_time for seen in self.events.values()),
            end_time=end_time,
            snapshot=snapshot_path(best[0]) if best is not None else None,
            instance=self.instance,
        )


class Visits:
    """One camera's visits.

    At most one visit is open at a time. An open visit takes every new event
    that starts while one of its events is live or less than ``gap`` seconds
    (capture time) after its last event ended; ``expire`` ends it once all its
    events have ended and ``gap`` seconds of wall clock have passed since.
    """

    def __init__(self, camera: str, rules: Sequence[AlertRule], gap: float) -> None:
        if not camera:
            raise ValueError("camera: expected a camera name, got ''")
        if not math.isfinite(gap) or gap <= 0:
            raise ValueError(f"gap: expected seconds > 0, got {gap!r}")
        self.camera = camera
        self.rules = tuple(rules)
        self.gap = gap
        self._visit: _Visit | None = None

    @property
    def open(self) -> Review | None:
        """The open visit as an ``update`` for the daemon's journal, else None.

        Unlike a published ``update``, its ``end_time`` is the latest capture
        time known of its events, so that a restart can end it there.
        """
        if self._visit is None:
            return None
        return self._visit.review("update", self.camera, end_time=self._visit.latest)

    def add(self, event: Event) -> list[Review]:
        """Step with one published event; return the reviews to publish (oldest first).

        A ``new`` joins the open visit (``update`` when it adds a label, a
        zone or raises the severity, else nothing) or starts one (``new``);
        when the open visit can no longer take it, that visit's ``end`` comes
        first. An ``update`` or ``end`` gives an ``update`` when it adds a
        label or zone or raises the severity. An ``update`` or ``end`` for an
        event id this tracker does not know (never seen, e.g. after a restart,
        or of a visit already ended), or for an event already ended, is
        ignored: ``[]``.

        Raises:
            ValueError: ``event`` is of another camera.
        """
        if event.camera != self.camera:
            raise ValueError(f"event: expected camera {self.camera!r}, got {event.camera!r}")
        visit = self._visit
        seen = visit.events.get(event.event_id) if visit is not None else None
        if seen is None:
            return self._start(event) if event.type == "new" else []
        if seen.ended or visit is None:
            return []
        return [visit.review("update", self.camera)] if self._take(visit, event) else []

    def expire(self, now: float) -> list[Review]:
        """``end`` of the open visit once all its events ended and ``now >= last end + gap``, else ``[]``.

        ``now`` is the wall clock (Unix seconds), compared with capture times.
        """
        visit = self._visit
        if visit is None or not all(seen.ended for seen in visit.events.values()):
            return []
        if visit.latest + self.gap > now:
            return []
        return [self._end()]

    def close(self) -> list[Review]:
        """End the open visit now (the daemon stops); live events count as ended when last seen."""
        return [self._end()] if self._visit is not None else []

    def _start(self, event: Event) -> list[Review]:
        out: list[Review] = []
        visit = self._visit
        if visit is not None and not self._joins(visit, event):
            out.append(self._end())
            visit = None
        if visit is None:
            visit = self._visit = _Visit(f"{event.start_time:.6f}-{secrets.token_hex(3)}")
            self._take(visit, event)
            out.append(visit.review("new", self.camera))
        elif self._take(visit, event):
            out.append(visit.review("update", self.camera))
        return out

    def _joins(self, visit: _Visit, event: Event) -> bool:
        live = any(not seen.ended for seen in visit.events.values())
        return live or event.start_time - visit.latest < self.gap

    def _take(self, visit: _Visit, event: Event) -> bool:
        """Fold ``event`` into ``visit``; whether its labels, zones or severity grew."""
        before = (len(visit.labels), len(visit.zones), visit.severity)
        visit.labels.add(event.label)
        if event.sub_label is not None:
            visit.labels.add(event.sub_label)
        visit.zones.update(event.entered_zones)
        if any(matches(rule, event) for rule in self.rules):
            visit.severity = "alert"
        if visit.instance is None:
            visit.instance = event.instance
        end = event.end_time if event.end_time is not None else event.start_time
        last = max(event.start_time, event.frame_time, end)
        old = visit.events.get(event.event_id)
        if old is None:
            old = _Seen(event.start_time, last, False, event.top_score, False)
        visit.events[event.event_id] = dataclasses.replace(
            old,
            last_time=max(old.last_time, last),
            ended=event.type == "end",
            top_score=max(old.top_score, event.top_score),
            has_snapshot=old.has_snapshot or event.snapshot is not None,
        )
        return before != (len(visit.labels), len(visit.zones), visit.severity)

    def _end(self) -> Review:
        visit = self._visit
        assert visit is not None
        self._visit = None
        return visit.review("end", self.camera, end_time=visit.latest)
