"""Visits, stepped event by event with hand-made events, as the daemon feeds them."""

from __future__ import annotations

import random

import pytest

from monitor.events import Event, EventType
from monitor.objects_settings import Category
from monitor.record_settings import DEFAULT_ALERTS, AlertRule
from monitor.visits import Review, Visits, matches

GAP = 30.0
RULES = (AlertRule(labels=["person"]), AlertRule(labels=["wildlife"], zones=["waterhole"]))
CATEGORY: dict[str, Category] = {"person": "person", "car": "vehicle"}
CATEGORY.update({"deer": "wildlife", "red_deer": "wildlife"})


def ev(
    kind: EventType,
    eid: str,
    label: str = "person",
    start: float = 0.0,
    at: float | None = None,
    zones: tuple[str, ...] = (),
    sub_label: str | None = None,
    top: float = 0.8,
    snapshot: bool = True,
) -> Event:
    """An event of track ``eid`` on camera gate, reporting the frame at ``at`` (default: ``start``)."""
    at = start if at is None else at
    return Event(
        type=kind,
        event_id=eid,
        camera="gate",
        label=label,
        sub_label=sub_label,
        category=CATEGORY.get(sub_label or label, "other"),
        score=top,
        top_score=top,
        box=[0, 0, 10, 10],
        track_id=1,
        start_time=start,
        end_time=at if kind == "end" else None,
        frame_time=at,
        entered_zones=list(zones),
        model="m.pt@abc",
        instance="node-a",
        snapshot=f"p/gate/{eid}/snapshot" if snapshot else None,
    )


def types(reviews: list[Review]) -> list[str]:
    return [r.type for r in reviews]


def test_overlapping_people_make_one_visit_with_one_new():
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    steps = [
        (ev("new", "p1", start=0), ["new"]),
        (ev("new", "p2", start=2), []),  # same label, no zone: nothing to tell
        (ev("update", "p1", start=0, at=4, top=0.9), []),
        (ev("end", "p1", start=0, at=5), []),
        (ev("end", "p2", start=2, at=8), []),
    ]
    for event, expected in steps:
        assert types(visits.add(event)) == expected
    [end] = visits.expire(now=8 + GAP)
    assert (end.type, end.event_ids, end.labels) == ("end", ["p1", "p2"], ["person"])
    assert (end.start_time, end.end_time, end.severity) == (0, 8, "alert")


@pytest.mark.parametrize(
    ("delay", "expected"),
    [(10.0, ["update"]), (29.9, ["update"]), (30.0, ["end", "new"]), (31.0, ["end", "new"])],
)
def test_deer_after_person_joins_within_the_gap(delay, expected):
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    [first] = visits.add(ev("new", "p1", start=0))
    visits.add(ev("end", "p1", start=0, at=5))
    reviews = visits.add(ev("new", "d1", "deer", start=5 + delay))
    assert types(reviews) == expected
    if expected == ["update"]:
        assert reviews[0].visit_id == first.visit_id
        assert (reviews[0].labels, reviews[0].event_ids) == (["deer", "person"], ["p1", "d1"])
    else:
        assert (reviews[0].visit_id, reviews[0].event_ids, reviews[0].end_time) == (first.visit_id, ["p1"], 5)
        assert reviews[1].visit_id != first.visit_id
        assert (reviews[1].labels, reviews[1].event_ids) == (["deer"], ["d1"])


@pytest.mark.parametrize(
    ("event", "severity"),
    [
        (ev("new", "a", "person"), "alert"),
        (ev("new", "a", "person", zones=("road",)), "alert"),
        (ev("new", "a", "deer"), "detection"),
        (ev("new", "a", "deer", zones=("meadow",)), "detection"),
        (ev("new", "a", "deer", zones=("meadow", "waterhole")), "alert"),
        (ev("new", "a", "animal", zones=("waterhole",), sub_label="deer"), "alert"),  # by sub_label
        (ev("new", "a", "car", zones=("waterhole",)), "detection"),
    ],
)
def test_severity_comes_from_the_rules(event, severity):
    [review] = Visits("gate", RULES, GAP).add(event)
    assert review.severity == severity


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (AlertRule(), True),
        (AlertRule(labels=["deer"]), True),
        (AlertRule(labels=["red_deer"]), True),
        (AlertRule(labels=["wildlife"], zones=["waterhole"]), True),
        (AlertRule(labels=["wildlife"], zones=["road"]), False),
        (AlertRule(labels=["person", "vehicle"]), False),
    ],
)
def test_matches_label_sub_label_or_category_and_zone(rule, expected):
    event = ev("update", "a", "deer", zones=("meadow", "waterhole"), sub_label="red_deer")
    assert matches(rule, event) is expected


def test_deer_entering_the_waterhole_raises_the_visit_to_alert():
    visits = Visits("gate", RULES, GAP)
    assert [r.severity for r in visits.add(ev("new", "d1", "deer"))] == ["detection"]
    [update] = visits.add(ev("update", "d1", "deer", at=3, zones=("waterhole",)))
    assert (update.type, update.severity, update.zones) == ("update", "alert", ["waterhole"])


def test_severity_never_drops():
    visits = Visits("gate", RULES, GAP)
    assert [r.severity for r in visits.add(ev("new", "p1", "person"))] == ["alert"]
    [update] = visits.add(ev("new", "c1", "car", start=1))  # a detection-only label joins
    assert (update.severity, update.labels) == ("alert", ["car", "person"])
    assert visits.add(ev("end", "p1", at=2)) == []
    assert visits.add(ev("update", "c1", "car", start=1, at=3)) == []
    assert visits.add(ev("end", "c1", "car", start=1, at=4)) == []
    [end] = visits.expire(now=4 + GAP)
    assert (end.type, end.severity) == ("end", "alert")


@pytest.mark.parametrize(
    ("event", "review"),
    [
        (ev("update", "p1", at=1, zones=("road",)), "update"),
        (ev("update", "p1", at=1, sub_label="postman"), "update"),
        (ev("update", "p1", at=1, zones=("road",), sub_label="postman"), "update"),  # one, not two
        (ev("update", "p1", at=1, top=0.99), None),
        (ev("end", "p1", at=1), None),
        (ev("end", "p1", at=1, zones=("road",)), "update"),
        (ev("new", "p1"), None),  # a repeated new is an update that changes nothing
    ],
)
def test_an_update_is_sent_only_when_labels_or_zones_grow(event, review):
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    visits.add(ev("new", "p1"))
    assert types(visits.add(event)) == ([review] if review else [])


def test_end_only_after_the_gap_and_once_all_events_ended():
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    visits.add(ev("new", "p1", start=0))
    visits.add(ev("new", "p2", start=5))
    visits.add(ev("end", "p1", start=0, at=10))
    assert visits.expire(now=1000) == []  # p2 is still live
    visits.add(ev("end", "p2", start=5, at=20))
    assert visits.expire(now=20 + GAP - 0.1) == []
    [end] = visits.expire(now=20 + GAP)
    assert (end.type, end.end_time, end.event_ids) == ("end", 20, ["p1", "p2"])
    assert (visits.expire(now=2000), visits.open, visits.close()) == ([], None, [])
    [new] = visits.add(ev("new", "d1", "deer", start=20 + GAP + 1))  # after the expired visit: a second one
    assert (new.type, new.event_ids, new.visit_id == end.visit_id) == ("new", ["d1"], False)


def test_close_ends_the_open_visit_at_its_last_known_time():
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    visits.add(ev("new", "p1", start=0))
    visits.add(ev("update", "p1", start=0, at=12))
    [end] = visits.close()
    assert (end.type, end.end_time, end.event_ids) == ("end", 12, ["p1"])
    assert visits.close() == []
    assert visits.add(ev("end", "p1", start=0, at=13)) == []  # its visit is over


@pytest.mark.parametrize("kind", ["update", "end"])
@pytest.mark.parametrize("with_visit", [False, True])
def test_unknown_event_ids_are_ignored(kind, with_visit):
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    if with_visit:
        visits.add(ev("new", "p1"))
    before = visits.open
    assert visits.add(ev(kind, "ghost", "deer", at=5, zones=("road",))) == []
    assert visits.open == before


@pytest.mark.parametrize(
    ("events", "snapshot"),
    [
        ([("a", 0.6, True), ("b", 0.9, True)], "/api/events/b/snapshot.jpg"),
        ([("a", 0.6, True), ("b", 0.9, False)], "/api/events/a/snapshot.jpg"),
        ([("a", 0.7, True), ("b", 0.7, True)], "/api/events/a/snapshot.jpg"),  # tie: the first
        ([("a", 0.6, False), ("b", 0.9, False)], None),
    ],
)
def test_snapshot_is_of_the_best_event_that_has_one(events, snapshot):
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    for i, (eid, top, has) in enumerate(events):
        visits.add(ev("new", eid, start=i, top=top, snapshot=has))
    assert (visits.open.snapshot if visits.open else "no visit") == snapshot
    assert visits.close()[0].snapshot == snapshot


def test_a_later_snapshot_and_score_count():
    visits = Visits("gate", DEFAULT_ALERTS, GAP)
    visits.add(ev("new", "a", top=0.6))
    visits.add(ev("new", "b", start=1, top=0.5, snapshot=False))
    visits.add(ev("update", "b", start=1, at=2, top=0.95))
    assert visits.close()[0].snapshot == "/api/events/b/snapshot.jpg"


@pytest.mark.parametrize("seed", range(5))
def test_random_sequences_keep_the_review_protocol(seed):
    rng = random.Random(seed)
    visits = Visits("gate", RULES, GAP)
    reviews: list[Review] = []
    clock, event_news = 0.0, 0
    live: dict[str, tuple[str, float, tuple[str, ...]]] = {}
    for n in range(200):
        clock += rng.choice([1.0, 5.0, 20.0, 45.0])  # 45 > GAP: some quiet spells split visits
        choice = rng.random()
        if choice < 0.3 or not live:
            eid, label = f"e{n}", rng.choice(list(CATEGORY))
            live[eid] = (label, clock, ())
            event_news += 1
            reviews += visits.add(ev("new", eid, label, start=clock))
        else:
            eid = rng.choice(sorted(live))
            label, start, zones = live[eid]
            zones += (rng.choice(["road", "waterhole"]),) if rng.random() < 0.3 else ()
            kind: EventType = "end" if choice > 0.55 else "update"
            live[eid] = (label, start, zones)
            reviews += visits.add(ev(kind, eid, label, start=start, at=clock, zones=zones))
            if kind == "end":
                del live[eid]
        if rng.random() < 0.2:
            reviews += visits.expire(now=clock)
    reviews += visits.close()
    assert 1 <= types(reviews).count("new") <= event_news
    by_visit: dict[str, list[Review]] = {}
    for review in reviews:
        by_visit.setdefault(review.visit_id, []).append(review)
    for visit in by_visit.values():
        assert types(visit) == ["new"] + ["update"] * (len(visit) - 2) + ["end"]
        ranks = [0 if r.severity == "detection" else 1 for r in visit]
        assert ranks == sorted(ranks)  # severity never drops
    ends = [eid for r in reviews if r.type == "end" for eid in r.event_ids]
    assert sorted(ends) == sorted({e for r in reviews for e in r.event_ids})  # each event in one visit


def test_review_json_round_trip():
    visits = Visits("gate", RULES, GAP)
    visits.add(ev("new", "d1", "deer", zones=("waterhole",)))
    [end] = visits.close()
    end = end.model_copy(update={"clip": "/api/reviews/x/clip.mp4"})
    assert Review.model_validate_json(end.model_dump_json()) == end
    assert end.instance == "node-a"
    assert all(f.description for f in Review.model_fields.values())


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="gap: expected seconds > 0, got 0"):
        Visits("gate", RULES, 0)
    with pytest.raises(ValueError, match="event: expected camera 'gate', got 'yard'"):
        Visits("gate", RULES, GAP).add(ev("new", "a").model_copy(update={"camera": "yard"}))
