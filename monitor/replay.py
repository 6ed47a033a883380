"""``monitor replay``: the camera pipeline on a video file, as fast as it goes.

Frames are taken at the camera's detect fps by their position in the video,
detected in batches of ``detect.max_batch``, then tracked and judged one by
one by the daemon's own ``PipelineStep`` and ``CameraPipeline``, so thresholds, zones,
masks, cooldowns and rate caps can be tuned on recorded footage without a
broker. Event times are seconds into the video.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import supervision as sv

from monitor.alerts import Alert
from monitor.camera import CameraPipeline
from monitor.classifier import load_classifier
from monitor.detector import Detector
from monitor.errors import SourceError
from monitor.frames import Frame
from monitor.metrics import Metrics
from monitor.pipeline import PipelineStep
from monitor.settings import CameraSettings, Settings
from monitor.topics import Topics

REPLAY_CAMERA = "replay"


@dataclass(frozen=True, slots=True)
class Summary:
    """What a replay saw.

    Attributes:
        tracks: ByteTrack ids seen.
        confirmed_tracks: ByteTrack ids that produced a ``new`` (sent, or suppressed by cooldown or
            rate cap).
        alerts_per_confirmed_track: Sent ``new`` events per confirmed track: 1.0 when every track
            alerts exactly once and none is silenced, above 1 when a track alerts twice.
    """

    video: str
    camera: str
    frames: int
    seconds: float
    tracks: int
    confirmed_tracks: int
    new: int
    update: int
    end: int
    suppressed: int
    alerts_per_confirmed_track: float


@dataclass
class Replay:
    """Events (in order) and the summary of one replay."""

    alerts: list[Alert]
    summary: Summary

    def to_json(self) -> str:
        """``{"events": [...], "summary": {...}}``; suppressed events carry ``"suppressed"``."""
        events = [
            {**a.event.model_dump(mode="json"), **({"suppressed": a.suppressed} if a.suppressed else {})}
            for a in self.alerts
        ]
        return json.dumps({"events": events, "summary": asdict(self.summary)}, indent=2)

    def timeline(self) -> str:
        """One line per event, then the summary."""
        lines = []
        for alert in self.alerts:
            e = alert.event
            zones = f"  zones {','.join(e.current_zones)}" if e.current_zones else ""
            quiet = f"  (suppressed: {alert.suppressed})" if alert.suppressed else ""
            lines.append(
                f"{e.frame_time:8.2f}s  {e.type:<6}  {e.label:<10} track {e.track_id:<4} "
                f"score {e.score:.2f} top {e.top_score:.2f}{zones}  {e.event_id}{quiet}"
            )
        s = self.summary
        lines += [
            "",
            f"{s.video} as camera {s.camera}: {s.frames} frames analysed over {s.seconds:.1f} s",
            f"tracks {s.tracks}, confirmed {s.confirmed_tracks}",
            f"events: new {s.new}, update {s.update}, end {s.end}; suppressed {s.suppressed}",
            f"alerts per confirmed track: {s.alerts_per_confirmed_track:.2f}",
        ]
        return "\n".join(lines)


def run_replay(
    video: Path, settings: Settings, camera: str | None = None, detector: Detector | None = None
) -> Replay:
    """Run the pipeline of ``camera`` (default: the first configured, else plain defaults) on ``video``.

    Raises:
        SourceError: The video cannot be read, or the camera is not configured.
    """
    if camera is not None and camera not in settings.cameras:
        raise SourceError(f"camera {camera!r} is not in the configuration (have: {sorted(settings.cameras)})")
    name = camera or next(iter(settings.cameras), REPLAY_CAMERA)
    if name == REPLAY_CAMERA and name not in settings.cameras:
        settings = settings.model_copy(update={"cameras": {name: CameraSettings(url=str(video))}})
    try:
        native_fps = sv.VideoInfo.from_video_path(str(video)).fps
    except Exception as exc:  # supervision raises a bare Exception for a file OpenCV cannot open
        raise SourceError(f"{video}: cannot open as a video") from exc
    native_fps = native_fps if 0 < native_fps < 1000 else 25.0
    detector = detector or Detector(settings.model, settings.detect.max_batch)
    pipeline = CameraPipeline(name, settings, detector.label, Topics(REPLAY_CAMERA), None)
    size = settings.cameras[name].detect
    period = 1.0 / settings.camera_fps(name)
    batch_size = settings.detect.max_batch
    alerts: list[Alert] = []
    pending: list[Frame] = []
    analysed = 0
    next_due = 0.0
    last_time = 0.0

    # The daemon's own step, on batches of consecutive frames of the one camera (in order).
    step = PipelineStep(
        detector,
        {name: pipeline},
        Metrics(),
        settings.model.conf,
        on_alerts=alerts.extend,
        classifier=load_classifier(settings),
    )

    def flush() -> None:
        step.run(pending)
        pending.clear()

    image: np.ndarray
    for index, image in enumerate(sv.get_video_frames_generator(str(video))):
        t = index / native_fps
        if t + 1e-9 < next_due:
            continue
        next_due = max(next_due + period, t)
        if size.width and size.height and image.shape[:2] != (size.height, size.width):
            image = cv2.resize(image, (size.width, size.height), interpolation=cv2.INTER_AREA)
        pending.append(Frame(name, analysed, t, np.ascontiguousarray(image)))
        analysed += 1
        last_time = t
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    alerts.extend(pipeline.rules.expire(float("inf")))
    if analysed == 0:
        raise SourceError(f"{video}: no frames could be decoded")
    counts = Counter(a.event.type for a in alerts if a.suppressed is None)
    # A ByteTrack id is confirmed once the rules confirmed it, sent or silenced: a suppressed `new`
    # is returned too. Counting ids (not event ids, which are minted one per `new`) lets a track
    # that alerts twice show up as more than one alert per confirmed track.
    confirmed = len({a.event.track_id for a in alerts if a.event.type == "new"})
    summary = Summary(
        video=str(video),
        camera=name,
        frames=analysed,
        seconds=last_time,
        tracks=len(pipeline.track_ids),
        confirmed_tracks=confirmed,
        new=counts["new"],
        update=counts["update"],
        end=counts["end"],
        suppressed=sum(1 for a in alerts if a.suppressed is not None),
        alerts_per_confirmed_track=counts["new"] / confirmed if confirmed else 0.0,
    )
    return Replay(alerts, summary)
