"""Alert quality on real footage through `monitor replay` (the daemon's camera pipeline)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from monitor.alerts import Alert, Event
from monitor.cli import main
from monitor.detector import Detector
from monitor.replay import run_replay
from monitor.settings import Settings
from tests.conftest import CLIP, TEST_LABELS

IMGSZ = 320
FPS = 2.0
#: Thresholds for the test weights, which score people on this clip at 0.3-0.6.
PEOPLE = {
    "track": ["person"],
    "filters": {"person": {"min_score": 0.3, "threshold": 0.35}},
    "tracker": {"high_threshold": 0.35, "activation_threshold": 0.35},
    "update_interval": 3.0,
}


def settings(weights: Path, objects: dict | None = None, camera: dict | None = None) -> Settings:
    return Settings(
        model={"path": weights, "imgsz": IMGSZ, "device": "cpu", "labels": TEST_LABELS},
        detect={"fps": FPS, "max_batch": 8},
        objects=objects if objects is not None else PEOPLE,
        cameras={"walkway": {"url": str(CLIP), **(camera or {})}},
    )


@pytest.fixture(scope="module")
def detector(weights: Path) -> Detector:
    return Detector(settings(weights).model, settings(weights).detect.max_batch)


@pytest.fixture(scope="module")
def background_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The walkway with nobody on it: the per-pixel median of the clip, held for 10 s."""
    cap = cv2.VideoCapture(str(CLIP))
    frames = []
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % 6 == 0:
            frames.append(frame)
        index += 1
    cap.release()
    background = np.median(np.stack(frames), axis=0).astype(np.uint8)
    path = tmp_path_factory.mktemp("clips") / "empty.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (768, 576))
    for _ in range(100):
        writer.write(background)
    writer.release()
    return path


@pytest.fixture(scope="module")
def people(weights, detector):
    """The person clip at the test thresholds, no zones, no limits."""
    return run_replay(CLIP, settings(weights), detector=detector)


def assert_one_new_per_track_and_bounded_updates(alerts: list[Alert], update_interval: float) -> None:
    """Per ByteTrack id: one ``new`` first, one ``end`` last, and at most
    floor(duration / update_interval) + zone changes ``update``s in between."""
    by_track: dict[int, list[Event]] = defaultdict(list)
    for alert in alerts:
        by_track[alert.event.track_id].append(alert.event)
    assert by_track
    for track_id, events in by_track.items():
        kinds = [e.type for e in events]
        assert kinds.count("new") == 1, (track_id, kinds)
        assert kinds[0] == "new", (track_id, kinds)
        assert kinds[-1] == "end", (track_id, kinds)
        assert len({e.event_id for e in events}) == 1, (track_id, kinds)
        duration = events[-1].end_time - events[0].start_time
        live = events[:-1]  # `end` reports no current zones
        zone_changes = sum(a.current_zones != b.current_zones for a, b in itertools.pairwise(live))
        updates = kinds.count("update")
        bound = math.floor(duration / update_interval + 1e-9) + zone_changes
        assert updates <= bound, (track_id, updates, duration, zone_changes)


def test_people_alert_once_per_track_with_bounded_updates(people):
    result = people
    summary = result.summary
    assert summary.new >= 3
    assert summary.frames == pytest.approx(30 * FPS, abs=2)
    assert_one_new_per_track_and_bounded_updates(result.alerts, PEOPLE["update_interval"])
    assert summary.confirmed_tracks == len({a.event.track_id for a in result.alerts})
    assert summary.alerts_per_confirmed_track == summary.new / summary.confirmed_tracks == 1.0


@pytest.mark.parametrize("objects", [{}, PEOPLE], ids=["defaults", "people-thresholds"])
def test_empty_scene_gives_no_events(weights, detector, background_clip, people, objects):
    # PEOPLE is permissive enough to alert on every person in the walkway clip, so 0 events on the
    # same walkway without them is the model and rules telling people from background.
    assert people.summary.new >= 3
    result = run_replay(background_clip, settings(weights, objects=objects), detector=detector)
    assert result.summary.frames >= 15
    assert result.alerts == []


def test_required_zone_that_nobody_enters_gives_no_events(weights, detector):
    sky = {
        "zones": {"sky": {"coordinates": [[0, 0], [0.1, 0], [0.1, 0.05], [0, 0.05]]}},
        "required_zones": ["sky"],
    }
    result = run_replay(CLIP, settings(weights, camera=sky), detector=detector)
    assert result.summary.tracks > 0  # people were tracked...
    assert result.alerts == []  # ...but none stood in the zone


def test_zone_over_the_walkway_is_reported(weights, detector):
    ground = {"zones": {"walkway": {"coordinates": [[0, 0.3], [1, 0.3], [1, 1], [0, 1]]}}}
    result = run_replay(CLIP, settings(weights, camera=ground), detector=detector)
    assert any("walkway" in a.event.entered_zones for a in result.alerts)
    assert_one_new_per_track_and_bounded_updates(result.alerts, PEOPLE["update_interval"])


def test_mask_over_the_whole_frame_gives_no_events(weights, detector):
    mask = {"masks": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}
    result = run_replay(CLIP, settings(weights, camera=mask), detector=detector)
    assert result.summary.tracks == 0
    assert result.alerts == []


@pytest.mark.parametrize(
    "limit", [{"cooldown": 20.0}, {"max_events_per_minute": 2}], ids=["cooldown", "rate"]
)
def test_suppressed_count_equals_the_events_not_sent(weights, detector, people, limit):
    free = people.summary
    limited = run_replay(CLIP, settings(weights, objects={**PEOPLE, **limit}), detector=detector).summary
    assert limited.suppressed > 0
    sent = limited.new + limited.update + limited.end
    assert sent + limited.suppressed == free.new + free.update + free.end


@pytest.fixture(scope="module")
def replay_config(weights, tmp_path_factory) -> Path:
    """A config file for `monitor replay` on the person clip at the test thresholds, 1 fps."""
    config = {
        "model": {"path": str(weights), "imgsz": IMGSZ, "device": "cpu", "labels": TEST_LABELS},
        "detect": {"fps": 1},
        "objects": PEOPLE,
        "cameras": {"walkway": {"url": str(CLIP)}},
    }
    path = tmp_path_factory.mktemp("replay") / "replay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def json_replay(replay_config) -> dict:
    """What `monitor replay CLIP --config ... --json` printed, parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["replay", str(CLIP), "--config", str(replay_config), "--json"]) == 0
    return json.loads(out.getvalue())


def test_replay_command_prints_json_summary(json_replay):
    body = json_replay
    keys = {"tracks", "confirmed_tracks", "new", "update", "end", "suppressed", "alerts_per_confirmed_track"}
    assert keys <= set(body["summary"])
    assert body["summary"]["new"] == sum(e["type"] == "new" for e in body["events"])
    assert body["summary"]["new"] > 0


TIMELINE = re.compile(
    r"^ *(?P<time>\d+\.\d\d)s  (?P<type>new|update|end) +(?P<label>\S+) +track (?P<track>\d+) +"
    r"score (?P<score>\d\.\d\d) top (?P<top>\d\.\d\d)(?:  zones \S+)?  (?P<event_id>\S+)$"
)
SUMMARY = re.compile(
    r"^(?P<video>.+) as camera (?P<camera>\S+): (?P<frames>\d+) frames analysed over (?P<seconds>[\d.]+) s\n"
    r"tracks (?P<tracks>\d+), confirmed (?P<confirmed_tracks>\d+)\n"
    r"events: new (?P<new>\d+), update (?P<update>\d+), end (?P<end>\d+); suppressed (?P<suppressed>\d+)\n"
    r"alerts per confirmed track: (?P<alerts_per_confirmed_track>\d+\.\d\d)$"
)


def test_replay_command_prints_the_timeline_and_summary_of_the_json_run(replay_config, json_replay, capsys):
    assert main(["replay", str(CLIP), "--config", str(replay_config)]) == 0
    timeline, _, summary = capsys.readouterr().out.rstrip("\n").partition("\n\n")
    events = json_replay["events"]
    assert events
    lines = [TIMELINE.match(line) for line in timeline.splitlines()]
    assert all(lines), timeline
    printed = [
        (float(m["time"]), m["type"], m["label"], int(m["track"]), float(m["score"]), float(m["top"]))
        for m in lines
    ]
    expected = [
        (
            round(e["frame_time"], 2),
            e["type"],
            e["label"],
            e["track_id"],
            round(e["score"], 2),
            round(e["top_score"], 2),
        )
        for e in events
    ]
    assert printed == expected
    # Event ids are minted afresh per run, but group the events the same way in both.
    text_ids = [m["event_id"] for m in lines]
    json_ids = [e["event_id"] for e in events]
    assert len(set(zip(text_ids, json_ids, strict=True))) == len(set(text_ids)) == len(set(json_ids))
    match = SUMMARY.match(summary)
    assert match, summary
    s = json_replay["summary"]
    assert match["video"] == s["video"] == str(CLIP)
    assert match["camera"] == s["camera"] == "walkway"
    assert float(match["seconds"]) == pytest.approx(s["seconds"], abs=0.05)
    for key in ("frames", "tracks", "confirmed_tracks", "new", "update", "end", "suppressed"):
        assert int(match[key]) == s[key], key
    assert float(match["alerts_per_confirmed_track"]) == pytest.approx(
        s["alerts_per_confirmed_track"], abs=0.005
    )
    kinds = [m["type"] for m in lines]
    assert (kinds.count("new"), kinds.count("update"), kinds.count("end")) == (
        s["new"],
        s["update"],
        s["end"],
    )
