"""Clips and visits with real parts: GStreamer's RTSP server, Mosquitto, the real weights, ffprobe.

What a ranger relies on: the end of a person event names a clip that plays
in a browser (stream-copied H.264, moov first, seekable over HTTP Range), starts
before the first detection and covers the event with its pre- and post-roll;
the camera is still read over one RTSP session; a ``kill -9`` loses neither the
segments nor the events; retention holds the disk to its bound; a full disk
stops only the recording; and visits bundle the events into one notification.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import CLIP, base_config, free_port, start_rtsp_server, wait_until

pytestmark = pytest.mark.integration

TOKEN = "clip-test-token"
PRE, POST, SEGMENT, GAP = 3.0, 2.0, 2.0, 4.0
GOP = 1.0  # tests/data/vtest.mp4: a keyframe every second
CLIP_SECONDS = 30.0
RECORDING_MINUTES = 2
SOURCE_CODEC = "h264"


def record_config(
    weights: Path, tmp_path: Path, broker_port: int, url: str, root: Path | None = None, **record: Any
) -> dict[str, Any]:
    config = base_config(
        weights,
        tmp_path,
        broker_port,
        free_port(),
        record={
            "enabled": True,
            "path": str(root or tmp_path / "recordings"),
            "pre_capture": PRE,
            "post_capture": POST,
            "segment": SEGMENT,
            **record,
        },
        visits={"gap": GAP},
        cameras={
            "walk": {
                "url": url,
                # People walk through the left half; only there does a visit become an alert.
                "zones": {"left": {"coordinates": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]}},
                "alerts": [{"labels": ["person"], "zones": ["left"]}],
            }
        },
    )
    config["model"]["imgsz"] = 320
    config["objects"]["max_disappeared"] = 1.0
    config["http"]["token"] = TOKEN
    return config


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def decodes_cleanly(path: Path) -> bool:
    """FFmpeg decodes every frame of the file without an error."""
    run = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"], capture_output=True)
    return run.returncode == 0 and not run.stderr.strip()


def box_order(path: Path) -> list[str]:
    """The top-level MP4 boxes in file order."""
    data, order, at = path.read_bytes(), [], 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        order.append(data[at + 4 : at + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        if size < 8:
            break
        at += size
    return order


def messages(sub) -> list[dict[str, Any]]:
    """Every message received so far, as JSON."""
    sub.drain()
    return [json.loads(m.payload) for m in sub.seen]


def wait_json(sub, predicate, timeout: float, what: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(
        sub.wait_for(lambda m: predicate(json.loads(m.payload)), timeout, what).payload
    )
    return found


def test_a_person_event_on_an_rtsp_camera_gets_a_stream_copied_clip_with_pre_roll_over_one_session(
    weights, tmp_path, broker, subscriber_factory, daemon_factory
):
    clients = tmp_path / "clients.log"
    server = start_rtsp_server({"walk": CLIP}, extra=["--clients", str(clients)])
    try:
        events = subscriber_factory(broker.port, "test/events")
        reviews = subscriber_factory(broker.port, "test/reviews")
        daemon = daemon_factory(record_config(weights, tmp_path, broker.port, server.url("walk")))

        def whole(event: dict[str, Any]) -> bool:
            """An end whose clip span lies inside one of the server's sessions (each plays the 30 s file)."""
            if event["type"] != "end" or not event["clip"]:
                return False
            starts = [
                float(line.split()[2]) for line in clients.read_text().splitlines() if "connected" in line
            ]
            span = (event["start_time"] - PRE - GOP, event["end_time"] + POST)
            return any(s + 1 < span[0] and span[1] < s + CLIP_SECONDS for s in starts)

        end = wait_json(events, whole, 180, "an end with a clip of its whole span")
        first_new = next(e for e in messages(events) if e["event_id"] == end["event_id"])
        assert end["clip"] == f"/api/events/{end['event_id']}/clip.mp4"
        assert end["clip_error"] is None

        # Served over HTTP with the snapshots' token rule, and seekable (Range).
        assert get(daemon.http_port, end["clip"])[0] == 401
        status, headers, body = get(daemon.http_port, end["clip"], auth())
        assert status == 200
        assert headers["content-type"] == "video/mp4"
        status, headers, part = get(daemon.http_port, end["clip"], {**auth(), "Range": "bytes=100-199"})
        assert status == 206
        assert part == body[100:200]
        assert headers["content-range"] == f"bytes 100-199/{len(body)}"
        clip = tmp_path / "clip.mp4"
        clip.write_bytes(body)

        # Stream-copied, moov first, the event plus pre/post within one GOP, decodes to the end.
        info = ffprobe(clip)
        (stream,) = info["streams"]
        assert stream["codec_name"] == SOURCE_CODEC
        assert box_order(clip).index("moov") < box_order(clip).index("mdat")
        expected = end["end_time"] - end["start_time"] + PRE + POST
        duration = float(info["format"]["duration"])
        assert expected - GOP - 0.5 <= duration <= expected + GOP + 0.5, (duration, expected)
        assert decodes_cleanly(clip)
        assert abs(int(stream["nb_read_frames"]) - duration * 10) <= 2  # the source's 10 fps, every frame
        # Its first frame (creation_time: whole seconds, rounded down) is before the first detection.
        created = datetime.fromisoformat(info["format"]["tags"]["creation_time"].replace("Z", "+00:00"))
        assert created.timestamp() + 1 <= first_new["start_time"]
        samples = daemon.metrics()
        assert samples['monitor_clips_total{camera="walk"}'] >= 1
        assert samples["monitor_recording_bytes"] > 0

        # One visit for people walking together: fewer notifications than events.
        wait_json(reviews, lambda r: r["type"] == "new", 30, "a visit")
        assert daemon.terminate() == 0  # ends the open events and visits

        def settled(sub, key: str) -> bool:
            latest = {m[key]: m for m in messages(sub)}
            return bool(latest) and all(m["type"] == "end" for m in latest.values())

        wait_until(lambda: settled(events, "event_id"), 15, "every event's end")
        wait_until(lambda: settled(reviews, "visit_id"), 15, "every visit's end")
    finally:
        server.stop()

    # Still one RTSP session: the server never had two clients at once.
    live = [int(line.split()[1]) for line in clients.read_text().splitlines()]
    assert live
    assert max(live) == 1

    all_events, all_reviews = messages(events), messages(reviews)
    news = [e for e in all_events if e["type"] == "new"]
    visits = {r["visit_id"]: r for r in all_reviews}  # each visit's latest state
    assert 1 <= sum(r["type"] == "new" for r in all_reviews) <= len(news)
    assert all(visits[v]["type"] == "end" for v in visits)
    owner = [v for e in news for v in visits if e["event_id"] in visits[v]["event_ids"]]
    assert len(owner) == len(news)  # every event in exactly one visit
    assert sorted(i for v in visits.values() for i in v["event_ids"]) == sorted(e["event_id"] for e in news)
    last = {e["event_id"]: e for e in all_events}  # each event's latest state
    for visit in visits.values():
        entered = any("left" in last[i]["entered_zones"] for i in visit["event_ids"])
        assert visit["severity"] == ("alert" if entered else "detection")
        assert visit["clip"] is not None or visit["clip_error"]


def closed_segments(root: Path) -> list[Path]:
    return sorted(p for p in (root / "walk" / "segments").glob("*-*.ts"))


def test_kill_9_mid_visit_keeps_the_segments_and_delivers_the_events_with_their_clips(
    weights, tmp_path, broker, subscriber_factory, daemon_factory
):
    root = tmp_path / "recordings"
    config = record_config(weights, tmp_path, broker.port, str(CLIP))
    config["visits"] = {"gap": 600}  # the visit stays open until the crash
    events = subscriber_factory(broker.port, "test/events")
    reviews = subscriber_factory(broker.port, "test/reviews")
    first = daemon_factory(config)
    visit = wait_json(reviews, lambda r: r["type"] == "new", 120, "a visit")
    wait_until(lambda: len(closed_segments(root)) >= 2, 30, "two closed segments")
    # systemd's way after a crash: SIGKILL to every process of the service at once.
    processes = [psutil.Process(first.proc.pid), *psutil.Process(first.proc.pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)
    opened = {e["event_id"] for e in messages(events) if e["type"] == "new"}
    ended_before = {e["event_id"] for e in messages(events) if e["type"] == "end"}

    segments = sorted((root / "walk" / "segments").glob("*.ts"))
    assert segments
    for segment in segments:  # every one plays, the one being written included
        info = ffprobe(segment)
        assert info["streams"][0]["codec_name"] == SOURCE_CODEC
        assert int(info["streams"][0]["nb_read_frames"]) > 0

    second = daemon_factory(config)
    left_open = opened - ended_before
    assert left_open, "the crash came mid-event"

    def ends() -> dict[str, dict[str, Any]]:
        return {e["event_id"]: e for e in messages(events) if e["type"] == "end"}

    wait_until(lambda: left_open <= set(ends()), 60, "the open events ended after the restart")
    for event_id in left_open:
        end = ends()[event_id]
        assert end["clip"] is not None or end["clip_error"], end
        if end["clip"] is not None:
            status, _, body = get(second.http_port, end["clip"], auth())
            assert status == 200
            clip = tmp_path / f"{event_id}.mp4"
            clip.write_bytes(body)
            assert decodes_cleanly(clip)
    visit_end = wait_json(
        reviews, lambda r: r["visit_id"] == visit["visit_id"] and r["type"] == "end", 60, "the visit's end"
    )
    assert visit_end["clip"] is not None or visit_end["clip_error"]
    assert set(visit["event_ids"]) <= set(visit_end["event_ids"])
    assert second.terminate() == 0


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_retention_holds_the_bytes_under_the_bound_and_deletes_the_oldest_clips_first(
    weights, tmp_path, broker, subscriber_factory, daemon_factory
):
    root = tmp_path / "recordings"
    bound = 3_000_000  # about 40 s of the clip's video: the ring and a few clips
    config = record_config(
        weights,
        tmp_path,
        broker.port,
        str(CLIP),
        pre_capture=1,
        post_capture=1,
        segment=1,
        retention={"max_bytes": bound},
    )
    both = subscriber_factory(broker.port, "test/+")  # events and reviews, in the order they were sent

    def clips_made() -> list[str]:
        """Ids of the events and visits whose end named a clip, in the order the ends were sent."""
        both.drain()
        ends = [json.loads(m.payload) for m in both.seen if m.topic in ("test/events", "test/reviews")]
        return [e.get("event_id") or e["visit_id"] for e in ends if e["type"] == "end" and e["clip"]]

    daemon = daemon_factory(config)
    started, peak = time.monotonic(), 0

    def minutes_of_clips() -> bool:
        """Two minutes of recording (the camera plays in real time) and at least eight clips."""
        nonlocal peak
        peak = max(peak, disk_bytes(root / "walk"))
        return time.monotonic() - started >= RECORDING_MINUTES * 60 and len(clips_made()) >= 8

    wait_until(minutes_of_clips, RECORDING_MINUTES * 60 + 180, "minutes of clips", interval=0.5)
    assert peak <= bound
    made = clips_made()
    kept = {p.stem for p in (root / "walk" / "clips").glob("*.mp4")}
    assert kept, "the newest clips are kept"
    assert len(kept) < len(made), "some clips were deleted"
    # The oldest went first: what is left is the newest clips made (and one being sent now).
    assert kept <= set(made[-len(kept) - 1 :]), (made, kept)
    assert daemon.terminate() == 0


def test_a_full_recording_disk_stops_recording_with_a_log_line_and_a_metric_while_alerts_go_on(
    weights, tmp_path, broker, subscriber_factory, small_disk, daemon_factory
):
    disk = small_disk(1024)  # 1 MiB: a few seconds of the clip's video
    config = record_config(weights, tmp_path, broker.port, str(CLIP), root=disk.path)
    events = subscriber_factory(broker.port, "test/events")
    daemon = daemon_factory(config)
    wait_until(lambda: "recording stopped: disk full" in daemon.log(), 120, "the log line")
    wait_until(
        lambda: daemon.metrics()["monitor_recording_segments_dropped_total"] >= 1, 30, "the dropped metric"
    )
    stopped = time.time()
    news_after = wait_json(
        events, lambda e: e["type"] == "new" and e["frame_time"] > stopped, 90, "an event after it"
    )
    assert news_after["camera"] == "walk"
    status, _, _ = get(daemon.http_port, "/readyz")
    assert status == 200
    assert daemon.terminate() == 0
    assert os.path.ismount(disk.path)


def test_a_recording_camera_with_a_wrong_password_says_unauthorized_and_never_shows_it(
    weights, tmp_path, broker, subscriber_factory, daemon_factory
):
    wrong = "wr0ng-s3cret-pw"
    server = start_rtsp_server({"walk": CLIP}, extra=["--user", "ranger", "--password", "right-pw"])
    try:
        url = f"rtsp://ranger:{wrong}@127.0.0.1:{server.port}/walk"
        config = record_config(weights, tmp_path, broker.port, url)
        config["cameras"]["walk"]["backoff_max"] = 1.0
        status = subscriber_factory(broker.port, "test/walk/status")
        daemon = daemon_factory(config)
        reported = wait_json(status, lambda s: s["reason"] == "unauthorized", 30, "the camera unauthorized")
        assert reported["state"] == "offline"
        _, _, metrics = get(daemon.http_port, "/metrics")
        assert daemon.terminate() == 0
    finally:
        server.stop()
    assert wrong not in daemon.log()
    assert wrong.encode() not in metrics
    assert not list((tmp_path / "recordings" / "walk" / "segments").glob("*.ts"))
