"""The settings model: ``Settings`` and its sections, built once in ``cli.py`` and passed down.

Each section is a frozen pydantic model that refuses unknown keys; validators
check names (cameras, labels, zones: each becomes an MQTT topic level and a
metric label value), choices and ranges, with messages that say what was
expected. Import the types from here.

This module knows no files: ``monitor.configfile.load_settings`` parses the
YAML file and builds ``Settings`` from it, the environment and credential
files, turning every problem into a ``ConfigError`` with key paths and lines;
``Settings.settings_customise_sources`` takes its sources from
``monitor.settings_sources``, which knows no settings class.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from monitor import settings_sources
from monitor.classifier_settings import CameraClassifierSettings, ClassifierSettings, Seconds
from monitor.cluster import ClusterSettings
from monitor.mqtt_settings import MqttSettings, TlsSettings
from monitor.names import CameraName, TopicName
from monitor.objects_settings import (
    DEFAULT_CATEGORIES,
    CameraObjectsSettings,
    Category,
    FilterSettings,
    ObjectsSettings,
    TrackerSettings,
)
from monitor.record_settings import (
    DEFAULT_ALERTS,
    AlertRule,
    CameraRecordSettings,
    RecordSettings,
    RetentionSettings,
    VisitSettings,
)
from monitor.settings_sources import ENV_PREFIX

__all__ = [
    "DEFAULT_ALERTS",
    "DEFAULT_CATEGORIES",
    "DEVICE",
    "STREAM_SCHEMES",
    "AlertRule",
    "CameraClassifierSettings",
    "CameraDetectSettings",
    "CameraName",
    "CameraObjectsSettings",
    "CameraRecordSettings",
    "CameraSettings",
    "Category",
    "ClassifierSettings",
    "DetectSettings",
    "FilterSettings",
    "HttpSettings",
    "LogSettings",
    "ModelSettings",
    "MqttSettings",
    "ObjectsSettings",
    "Point",
    "RecordSettings",
    "RetentionSettings",
    "Seconds",
    "Settings",
    "SnapshotSettings",
    "SpoolSettings",
    "TlsSettings",
    "TopicName",
    "TrackerSettings",
    "VisitSettings",
    "ZoneSettings",
]

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(_Section):
    """The detection model."""

    path: Path = Field(
        description="Weights: .pt, or an Ultralytics export (.onnx, _openvino_model/, .engine)."
    )
    imgsz: int = Field(640, ge=32, le=4096, description="Inference size (long side), multiple of 32.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    backend: Literal["auto", "torch", "openvino", "onnx"] = Field(
        "auto",
        description="auto: torch on CUDA, else OpenVINO (exported once, cached beside the weights).",
    )
    compile: bool = Field(
        False,
        description="torch.compile with CUDA graphs at fixed batch buckets (torch on CUDA only); "
        "warm-up compiles every bucket up to detect.max_batch before readiness.",
    )
    conf: float = Field(0.25, ge=0.0, le=1.0, description="Detector confidence floor (before tracking).")
    iou: float = Field(0.7, gt=0.0, le=1.0, description="NMS IoU threshold.")
    max_det: int = Field(300, ge=1, description="Most detections kept per frame.")
    labels: dict[str, TopicName] = Field(
        default_factory=dict, description="Rename or merge model classes: {model_name: new_name}."
    )

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be a multiple of 32 (the model's stride), got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.match(value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class DetectSettings(_Section):
    """How often and how many frames go through the model."""

    fps: float = Field(5.0, gt=0, le=120, description="Default frames per second analysed per camera.")
    max_batch: int = Field(16, ge=1, le=1024, description="Most frames in one forward pass.")
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="Wait this long for more cameras to fill a batch (GPU: 5-10 ms)."
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Tracking worker processes (ByteTrack, masks, zones); 0: in the main process.",
    )
    max_age_ms: float | None = Field(
        2000.0,
        gt=0,
        description="Frames older than this when their turn comes are dropped, not detected late.",
    )


Point = tuple[float, float]


def _polygon(points: list[Point]) -> list[Point]:
    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    if any(x < 0 or y < 0 for x, y in points):
        raise ValueError("coordinates must not be negative")
    fractions = [x <= 1 and y <= 1 for x, y in points]
    if any(fractions) and not all(fractions):
        raise ValueError("give every point in pixels, or every point as fractions of the frame (0..1)")
    return points


class ZoneSettings(_Section):
    """A named area of a camera's picture."""

    coordinates: list[Point] = Field(
        description="Polygon corners [[x, y], ...]: pixels, or fractions of the frame when all are <= 1."
    )
    objects: list[TopicName] | None = Field(
        None, description="Labels that count in this zone (default: all)."
    )

    @field_validator("coordinates")
    @classmethod
    def _coordinates(cls, value: list[Point]) -> list[Point]:
        return _polygon(value)


class HttpSettings(_Section):
    """The HTTP server: /metrics, /healthz, /readyz, /predict, /api."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port (tests).")
    token: SecretStr | None = Field(
        None, description="If set, /predict* and /api/* need `Authorization: Bearer <token>`."
    )
    max_upload_bytes: int = Field(20_000_000, ge=1024, description="Larger uploads get 413.")
    max_pixels: int = Field(50_000_000, ge=1, description="Pictures with more pixels get 413.")
    queue_size: int = Field(8, ge=1, le=1024, description="Uploads waiting for the detector; more get 503.")
    request_timeout: float = Field(30.0, gt=0, description="Most seconds an upload waits for its result.")
    max_connections: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most HTTP connections open at once; more are answered 503 and closed at once.",
    )
    read_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Most seconds a client may take to send a whole request (headers and body); "
        "slower ones get 408 and are closed.",
    )


class SpoolSettings(_Section):
    """The on-disk queue of events not yet acknowledged by the broker."""

    path: Path = Field(
        Path("monitor-spool.db"), description="SQLite file; relative to the working directory."
    )
    max_events: int = Field(
        10_000,
        ge=1,
        description="Most messages (events and snapshots) kept; when full, the oldest are dropped.",
    )
    max_age: float = Field(
        7 * 24 * 3600.0, gt=0, description="Seconds a message is kept; older ones are dropped."
    )
    synchronous: Literal["auto", "full", "normal"] = Field(
        "auto",
        description="full: every event survives a power cut (one fsync each, ~+4 ms p99 on a slow disk); "
        "normal: a daemon crash only; auto: normal while the broker is connected, full while not.",
    )


class SnapshotSettings(_Section):
    """Where event snapshots are kept for /api/events/{event_id}/snapshot.jpg."""

    path: Path = Field(Path("snapshots"), description="Folder; relative to the working directory.")
    max_count: int = Field(1000, ge=1, description="Most snapshots kept; the oldest are deleted first.")


class LogSettings(_Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class CameraDetectSettings(_Section):
    """Per-camera detection size and rate."""

    fps: float | None = Field(None, gt=0, le=120, description="Defaults to detect.fps.")
    width: int | None = Field(None, ge=16, le=7680, description="Frames are scaled to this width.")
    height: int | None = Field(None, ge=16, le=4320, description="Frames are scaled to this height.")

    @model_validator(mode="after")
    def _both_or_neither(self) -> CameraDetectSettings:
        if (self.width is None) != (self.height is None):
            raise ValueError("set both width and height, or neither (keep the native size)")
        return self


class CameraSettings(_Section):
    """One camera."""

    url: SecretStr = Field(description="rtsp://, rtsps://, http(s):// or a file path (played in a loop).")
    enabled: bool = True
    detect: CameraDetectSettings = Field(default_factory=CameraDetectSettings)
    stall_timeout: float = Field(10.0, gt=0, description="No frame for this long: restart the decoder.")
    open_timeout: float = Field(10.0, gt=0, description="Most seconds to open the stream.")
    backoff_max: float = Field(
        60.0, gt=0, description="Longest wait between reconnects (starts at 1 s, doubles, +/-20% jitter)."
    )
    decoder: Literal["auto", "cpu", "nvdec"] = Field(
        "auto",
        description=(
            "cpu: FFmpeg through OpenCV; nvdec: the GPU's video decoder through PyNvVideoCodec "
            "(the nvdec extra), falling back to cpu with a log line; auto: nvdec when PyNvVideoCodec "
            "is installed and works for the stream, else cpu."
        ),
    )
    objects: CameraObjectsSettings | None = Field(None, description="Overrides of objects.track/filters.")
    zones: dict[TopicName, ZoneSettings] = Field(
        default_factory=dict, description="Named areas; events list them."
    )
    required_zones: list[TopicName] = Field(
        default_factory=list, description="If set, only objects that entered one of these zones alert."
    )
    masks: list[list[Point]] = Field(
        default_factory=list, description="Polygons where nothing is ever detected (trees in the wind)."
    )
    classifier: CameraClassifierSettings | None = Field(
        None, description="Changes to the classifier for this camera; false turns it off here."
    )
    record: CameraRecordSettings | None = Field(
        None, description="Changes to record for this camera; true turns recording on here."
    )
    alerts: list[AlertRule] | None = Field(
        None,
        description="Rules that make a visit an alert (else a detection); default: person, wildlife.",
    )

    @field_validator("masks")
    @classmethod
    def _masks(cls, value: list[list[Point]]) -> list[list[Point]]:
        return [_polygon(points) for points in value]

    @model_validator(mode="after")
    def _required_zones_exist(self) -> CameraSettings:
        unknown = sorted(set(self.required_zones) - set(self.zones))
        if unknown:
            raise ValueError(f"required_zones {unknown} are not defined in zones {sorted(self.zones)}")
        unknown = sorted({z for rule in self.alerts or () for z in rule.zones} - set(self.zones))
        if unknown:
            raise ValueError(f"alerts zones {unknown} are not defined in zones {sorted(self.zones)}")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value().strip()
        if not url:
            raise ValueError("must not be empty")
        if "://" in url and not url.lower().startswith(STREAM_SCHEMES):
            scheme = url.split("://", 1)[0]
            raise ValueError(
                f"unsupported scheme {scheme!r}: expected rtsp, rtsps, http, https or a file path"
            )
        return SecretStr(url)

    @property
    def is_file(self) -> bool:
        """True when the URL is a local file, which is played in real time and looped."""
        return "://" not in self.url.get_secret_value()


class Settings(BaseSettings):
    """Everything the daemon is configured with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    model: ModelSettings
    detect: DetectSettings = Field(default_factory=DetectSettings)
    objects: ObjectsSettings = Field(default_factory=ObjectsSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
    record: RecordSettings = Field(default_factory=RecordSettings)
    visits: VisitSettings = Field(default_factory=VisitSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    classifier: ClassifierSettings | None = Field(
        None, description="Species (finer class) on crops of tracked objects; none: the detector's labels."
    )
    # Each bad name is its own problem (a validator over the whole dict would stop at the first).
    cameras: dict[CameraName, CameraSettings] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The sources live in monitor.settings_sources, which knows no settings class.
        return settings_sources.sources(settings_cls, init_settings, env_settings, file_secret_settings)

    @model_validator(mode="after")
    def _classifier_to_override(self) -> Settings:
        if self.classifier is None:
            lonely = sorted(
                n for n, c in self.cameras.items() if c.classifier is not None and c.classifier.enabled
            )
            if lonely:
                raise ValueError(f"cameras {lonely} change the classifier, but no classifier section is set")
        return self

    def classifier_for(self, name: str) -> ClassifierSettings | None:
        """The classifier as camera ``name`` uses it, or None when it has none."""
        if self.classifier is None:
            return None
        return self.classifier.merged(self.cameras[name].classifier)

    def record_for(self, name: str) -> RecordSettings | None:
        """Recording as camera ``name`` uses it, or None when it does not record."""
        camera = self.cameras[name].record
        merged = camera.merge(self.record) if camera is not None else self.record
        return merged if merged.enabled else None

    def alerts_for(self, name: str) -> tuple[AlertRule, ...]:
        """The rules that make a visit of camera ``name`` an alert."""
        rules = self.cameras[name].alerts
        return DEFAULT_ALERTS if rules is None else tuple(rules)

    def camera_fps(self, name: str) -> float:
        """The detect fps of camera ``name``."""
        return self.cameras[name].detect.fps or self.detect.fps
