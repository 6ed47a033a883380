"""Alert rules: turn tracked detections into new / update / end events.

Per track (one camera's ByteTrack id):

* every analysed frame adds the track's score to its history, or 0 when the
  track was not seen or scored under the label's ``min_score``;
* ``new`` once the median of the last ``objects.score_history`` scores
  reaches the label's ``threshold``, the track was seen in ``min_frames``
  frames and, where the camera has ``required_zones``, entered one of them
  (Frigate's true-positive rule: one good frame is not enough, one bad frame
  does not end it);
* ``update`` on a better top score or a change of zones, at most every
  ``update_interval``, never while the object is stationary;
* ``end`` when the track has not been seen for ``max_disappeared`` seconds
  (``stationary_max_disappeared`` for a stationary one).

Each event keeps its best frame (highest score) as an annotated snapshot
(zones, box, label): ``new`` carries the best so far, an ``update`` with a
better score a better one, and ``end`` the best frame when it came after the
last one sent (a peak inside ``update_interval`` just before the track was
lost would otherwise never be kept).

A track that has not moved (its box keeps overlapping where it came to rest
by ``stationary_iou``) for ``stationary_after`` seconds is stationary: it
sends no updates, and a new ByteTrack id that appears on the same spot with
the same label continues it instead of alerting again (a parked car is not
re-announced all night).

``cooldown`` (per camera and label) and ``max_events_per_minute`` (per
camera) silence whole tracks at confirmation: their new, update and end are
still worked out, and returned with ``suppressed`` set, so the daemon counts
exactly the events it did not send.

``event_id`` is fixed at ``new`` and repeated in ``update`` and ``end`` so
consumers can de-duplicate (QoS 1 may deliver twice).

With a classifier (``monitor.sublabels``), tracks it applies to carry a
``sub_label`` (the species) decided by the vote over their crops. A track
alerts when its label or its sub_label is in ``objects.track``, so a camera
tracking only ``elephant`` alerts on animals the classifier calls elephants;
the sub_label's filter, category and snapshot topic are used where it has
one, and a change of sub_label is an ``update`` at once (with a new snapshot).
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import supervision as sv

from monitor.classifier import Classification
from monitor.events import Alert as Alert
from monitor.events import Event as Event
from monitor.events import EventType
from monitor.frames import Frame
from monitor.settings import ClassifierSettings, FilterSettings, ObjectsSettings, Point
from monitor.snapshots import Annotator, encode_jpeg
from monitor.sublabels import SubLabeler, Vote
from monitor.topics import Topics
from monitor.zones import to_pixels

RATE_WINDOW = 60.0  # seconds of max_events_per_minute


@dataclass(slots=True)
class _Track:
    track_id: int
    label: str
    start_time: float
    scores: deque[float]
    last_seen: float
    box: list[float]
    score: float = 0.0
    hits: int = 0
    top_score: float = 0.0
    event_id: str | None = None
    silenced: str | None = None
    last_sent: float = 0.0
    sent_top: float = 0.0
    sent_zones: tuple[str, ...] = ()
    zones: list[str] = field(default_factory=list)
    entered: list[str] = field(default_factory=list)
    rest_box: list[float] = field(default_factory=list)
    still_since: float = 0.0
    stationary: bool = False
    best_image: np.ndarray | None = None
    best_box: list[float] = field(default_factory=list)
    best_score: float = -1.0
    sent_best: float = -1.0  # best_score of the last snapshot sent
    seen_now: bool = False
    vote: Vote = field(default_factory=Vote)
    sub_label: str | None = None
    sub_label_score: float | None = None
    sent_sub: str | None = None  # sub_label of the last event sent

    @property
    def shown(self) -> str:
        """The label events are filed under: the sub_label when there is one."""
        return self.sub_label or self.label


def _iou(a: list[float], b: list[float]) -> float:
    return float(sv.box_iou_batch(np.array([a]), np.array([b]))[0, 0])


class AlertRules:
    """The alert rules of one camera.

    Args:
        camera: Camera name.
        objects: The camera's effective ``objects`` settings.
        model: Model identity reported in events.
        topics: The MQTT topic scheme (for the snapshot topic named in events).
        instance: The daemon's instance id, reported in events.
        required_zones: Zones an object must enter before it alerts (none: anywhere).
        zones: The camera's zone polygons by name (pixels or fractions), drawn on snapshots.
        classifier: The classifier as this camera uses it (none: no sub_labels).
    """

    def __init__(
        self,
        camera: str,
        objects: ObjectsSettings,
        model: str,
        topics: Topics,
        instance: str | None = None,
        required_zones: list[str] | None = None,
        zones: Mapping[str, list[Point]] | None = None,
        classifier: ClassifierSettings | None = None,
    ) -> None:
        self.camera = camera
        self.objects = objects
        self.model = model
        self.topics = topics
        self.instance = instance
        self.required_zones = set(required_zones or [])
        self.zones = dict(zones or {})
        self._tracks: dict[int, _Track] = {}
        self._aliases: dict[int, int] = {}  # later ByteTrack ids of a parked object -> its track
        self._last_new: dict[str, float] = {}
        self._recent_news: deque[float] = deque()
        self._annotator = Annotator()
        self.sublabeler = SubLabeler(classifier, objects.category_of) if classifier is not None else None
        self._early: dict[int, Vote] = {}  # votes of ByteTrack ids cropped before their first update

    def wanted(self, tracked: sv.Detections, now: float) -> list[int]:
        """Which of a frame's tracked detections to crop for the classifier (indices).

        Call before ``update`` with the same detections and the frame's capture time
        ``now``; pass the classifications to ``update``.
        """
        sublabeler = self.sublabeler
        if sublabeler is None or len(tracked) == 0:
            return []
        assert tracked.confidence is not None
        assert tracked.tracker_id is not None
        wanted = []
        rows = zip(tracked.tracker_id, tracked.data["class_name"], tracked.confidence, strict=True)
        for i, (track_id, label, score) in enumerate(rows):
            if not sublabeler.applies(str(label)):
                continue
            key = int(track_id)
            track = self._tracks.get(self._aliases.get(key, key))
            vote = track.vote if track is not None else self._early.setdefault(key, Vote())
            if sublabeler.due(vote, float(score), now):
                sublabeler.ask(vote, float(score), now)
                wanted.append(i)
        return wanted

    def update(
        self,
        tracked: sv.Detections,
        frame: Frame,
        zones: list[list[str]] | None = None,
        classes: Mapping[int, Classification] | None = None,
    ) -> list[Alert]:
        """Feed one analysed frame's tracked detections; return the events it causes.

        Args:
            tracked: Detections with ``tracker_id`` (and ``data["class_name"]``).
            frame: The frame they came from (time, picture for snapshots).
            zones: For each detection, the zones it stands in.
            classes: The classifier's results for the detections ``wanted`` asked for, by index.
        """
        now = frame.capture_time
        classes = classes or {}
        for track in self._tracks.values():
            track.seen_now = False
        zones = zones if zones is not None else [[] for _ in range(len(tracked))]
        if len(tracked):
            assert tracked.confidence is not None
            assert tracked.tracker_id is not None
            rows = zip(
                tracked.xyxy,
                tracked.confidence,
                tracked.tracker_id,
                tracked.data["class_name"],
                zones,
                strict=True,
            )
            for i, (xyxy, score, track_id, label, where) in enumerate(rows):
                box = [round(float(v), 1) for v in xyxy]
                track = self._track_for(int(track_id), str(label), box, now)
                self._observe(track, str(label), box, float(score), where, frame)
                self._classified(track, classes.get(i))
        alerts = []
        for track in self._tracks.values():
            if not track.seen_now:
                track.scores.append(0.0)
                continue
            alert = self._decide(track, now)
            if alert is not None:
                alerts.append(alert)
        alerts.extend(self.expire(now))
        return alerts

    def _classified(self, track: _Track, result: Classification | None) -> None:
        sublabeler = self.sublabeler
        if sublabeler is None:
            return
        if result is None:
            track.vote.asked = False  # a crop asked for and not classified is asked for again
            return
        sublabeler.add(track.vote, result)
        track.sub_label, track.sub_label_score = sublabeler.sub_label(track.vote)

    def expire(self, now: float) -> list[Alert]:
        """End the tracks unseen for too long (call while a camera is down, too).

        Args:
            now: The capture time of the frame being judged, or the wall clock when no
                frame comes (``inf`` ends every track). An ``end`` is decided at ``now``,
                so that is its ``Alert.capture_time``: the latency metric then measures the
                daemon's own delay, not the ``max_disappeared`` it waited on purpose.
        """
        decided = min(now, time.time())
        alerts = []
        for track_id in [
            k for k, v in self._early.items() if now - v.last_time >= self.objects.max_disappeared
        ]:
            del self._early[track_id]  # cropped, then never updated (the step failed)
        for track_id, track in list(self._tracks.items()):
            limit = (
                self.objects.stationary_max_disappeared if track.stationary else self.objects.max_disappeared
            )
            if now - track.last_seen < limit:
                continue
            del self._tracks[track_id]
            for alias in [a for a, target in self._aliases.items() if target == track_id]:
                del self._aliases[alias]
            if track.event_id is not None:
                best = self._snapshot(track) if track.best_score > track.sent_best else None
                end = self._alert("end", track, track.last_seen, snapshot=best, end_time=track.last_seen)
                alerts.append(replace(end, capture_time=decided))
        return alerts

    # -- per track -------------------------------------------------------------
    def _track_for(self, track_id: int, label: str, box: list[float], now: float) -> _Track:
        known = self._tracks.get(self._aliases.get(track_id, track_id))
        if known is not None:
            return known
        for other in self._tracks.values():  # a parked object that ByteTrack lost and found again
            if (
                other.stationary
                and not other.seen_now
                and other.label == label
                and _iou(other.rest_box, box) >= self.objects.stationary_iou
            ):
                self._aliases[track_id] = other.track_id
                self._early.pop(track_id, None)
                return other
        history: deque[float] = deque(maxlen=self.objects.score_history)
        track = _Track(track_id, label, now, history, now, box, rest_box=box, still_since=now)
        track.vote = self._early.pop(track_id, track.vote)
        self._tracks[track_id] = track
        return track

    def _observe(
        self, track: _Track, label: str, box: list[float], score: float, where: list[str], frame: Frame
    ) -> None:
        if track.seen_now:  # two ids on one parked object in one frame: keep the first
            return
        now = frame.capture_time
        track.seen_now = True
        track.hits += 1
        track.last_seen, track.box, track.score, track.zones = now, box, score, where
        track.entered.extend(z for z in where if z not in track.entered)
        if track.event_id is None:
            track.label = label  # the label may settle while the track is unconfirmed
        rule = self._filter(track)
        good = score >= rule.min_score
        track.scores.append(score if good else 0.0)
        if good:
            track.top_score = max(track.top_score, score)
        if score > track.best_score:
            track.best_score, track.best_box, track.best_image = score, box, frame.keep_image()
        if _iou(track.rest_box, box) < self.objects.stationary_iou:
            track.rest_box, track.still_since, track.stationary = box, now, False
        elif now - track.still_since >= self.objects.stationary_after:
            track.stationary = True

    def _filter(self, track: _Track) -> FilterSettings:
        """The sub_label's filter where it has one, else the label's."""
        if track.sub_label is not None and track.sub_label in self.objects.filters:
            return self.objects.filters[track.sub_label]
        return self.objects.filter_for(track.label)

    def _decide(self, track: _Track, now: float) -> Alert | None:
        rule = self._filter(track)
        if track.event_id is None:
            if (
                (track.label not in self.objects.track and track.sub_label not in self.objects.track)
                or track.score < rule.min_score
                or track.hits < rule.min_frames
                or statistics.median(track.scores) < rule.threshold
                or (self.required_zones and not self.required_zones.intersection(track.entered))
            ):
                return None
            track.event_id = f"{track.start_time:.6f}-{secrets.token_hex(3)}"
            track.silenced = self._silence(track.shown, now)
            track.last_sent, track.sent_top, track.sent_zones = now, track.top_score, tuple(track.zones)
            track.sent_sub = track.sub_label
            return self._alert("new", track, now, snapshot=self._snapshot(track))
        if track.sub_label != track.sent_sub:  # the species changed: say so at once
            track.last_sent, track.sent_top, track.sent_zones = now, track.top_score, tuple(track.zones)
            track.sent_sub = track.sub_label
            return self._alert("update", track, now, snapshot=self._snapshot(track))
        if track.stationary or now - track.last_sent < self.objects.update_interval:
            return None
        better = track.top_score > track.sent_top
        if not better and tuple(track.zones) == track.sent_zones:
            return None
        track.last_sent, track.sent_top, track.sent_zones = now, track.top_score, tuple(track.zones)
        return self._alert("update", track, now, snapshot=self._snapshot(track) if better else None)

    def _silence(self, label: str, now: float) -> str | None:
        """Why a newly confirmed track stays silent, if it does; else record its `new`."""
        last = self._last_new.get(label)
        if last is not None and now - last < self.objects.cooldown:
            return "cooldown"
        cap = self.objects.max_events_per_minute
        while self._recent_news and now - self._recent_news[0] >= RATE_WINDOW:
            self._recent_news.popleft()
        if cap is not None and len(self._recent_news) >= cap:
            return "rate_limit"
        self._last_new[label] = now
        self._recent_news.append(now)
        return None

    def _alert(
        self,
        kind: EventType,
        track: _Track,
        frame_time: float,
        snapshot: bytes | None = None,
        end_time: float | None = None,
    ) -> Alert:
        assert track.event_id is not None
        event = Event(
            type=kind,
            event_id=track.event_id,
            camera=self.camera,
            label=track.label,
            sub_label=track.sub_label,
            sub_label_score=track.sub_label_score if track.sub_label is not None else None,
            category=self.objects.category_of(track.shown),
            score=round(track.score, 4),
            top_score=round(track.top_score, 4),
            box=track.box,
            track_id=track.track_id,
            start_time=track.start_time,
            end_time=end_time,
            frame_time=frame_time,
            current_zones=list(track.zones) if kind != "end" else [],
            entered_zones=list(track.entered),
            stationary=track.stationary,
            model=self.model,
            instance=self.instance,
            snapshot=self.topics.snapshot(self.camera, track.shown) if snapshot is not None else None,
        )
        return Alert(event, snapshot, frame_time, track.silenced)

    def _snapshot(self, track: _Track) -> bytes | None:
        """The track's best frame so far, annotated, as JPEG (None for silenced tracks)."""
        if track.best_image is None or track.silenced is not None:
            return None
        track.sent_best = track.best_score
        height, width = track.best_image.shape[:2]
        zones = [(name, to_pixels(points, width, height)) for name, points in self.zones.items()]
        detections = sv.Detections(
            xyxy=np.array([track.best_box], dtype=np.float32),
            confidence=np.array([track.best_score], dtype=np.float32),
            class_id=np.array([0]),
        )
        named = f"{track.sub_label} ({track.label})" if track.sub_label else track.label
        label = f"{named} {track.best_score:.2f}"
        scene = self._annotator.draw(track.best_image, detections, [label], zones)
        return encode_jpeg(scene)
