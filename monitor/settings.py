"""Configuration: one ``Settings`` built once in ``cli.py`` and passed down.

Sources, highest priority first:

1. environment variables ``MONITOR_<SECTION>__<KEY>`` (``__`` nests),
2. secret files in ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``),
   named like the variables, e.g. ``monitor_mqtt__password``,
3. the YAML file given with ``--config``.

Unknown keys are errors everywhere. ``load_settings`` turns every problem
with what it reads (a file that is not UTF-8 or not YAML, nesting deeper than
any setting, a repeated key, a variable or credential file that is not the
JSON its key needs, pydantic's ``ValidationError``) into a ``ConfigError``
whose lines name each key path or variable and, where it came from the YAML
file, its line.
"""

from __future__ import annotations

import json
import os
import re
import types
import typing
import unicodedata
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from monitor.cluster import ClusterSettings
from monitor.errors import ConfigError

CAMERA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
ENV_PREFIX = "MONITOR_"
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
#: Longest label or zone name: each is an MQTT topic level or a metric label value.
NAME_MAX = 64
#: Unicode categories no topic level or label may hold: control characters, lone
#: surrogates (a variable that was not UTF-8), line and paragraph separators.
_NAME_BAD_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")
#: Deepest nesting of a configuration file: no setting needs more than 6 levels, and
#: PyYAML's composer recurses once per level (20,000 levels raise RecursionError).
MAX_DEPTH = 32


def _shown(value: str) -> str:
    """``value`` quoted for a message, cut short when long."""
    return repr(value) if len(value) <= NAME_MAX + 16 else repr(value[:NAME_MAX]) + "..."


def _topic_name(value: str) -> str:
    """A label or zone name that MQTT topics and Prometheus labels can carry, else ValueError."""
    bad = sorted({c for c in value if c in "+#/" or unicodedata.category(c) in _NAME_BAD_CATEGORIES})
    if not value.strip():
        reason = "it is empty"
    elif len(value) > NAME_MAX:
        reason = f"it has {len(value)} characters"
    elif bad:
        reason = "it contains " + ", ".join(repr(c) for c in bad)
    else:
        return value
    raise ValueError(
        f"{_shown(value)} cannot be an MQTT topic level or a metric label ({reason}): use 1-{NAME_MAX} "
        "characters without + # / or control characters (spaces, _, - and letters of any script are fine)"
    )


def _camera_name(value: str) -> str:
    if not CAMERA_NAME.match(value):
        raise ValueError(
            f"camera name {_shown(value)} must be 1-64 letters, digits, '_' or '-' "
            "(it is used in MQTT topics and metric labels)"
        )
    return value


#: A label (``objects.track``, ``model.labels`` values ...) or a zone name.
TopicName = Annotated[str, AfterValidator(_topic_name)]
CameraName = Annotated[str, AfterValidator(_camera_name)]


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
    max_age_ms: float | None = Field(
        2000.0,
        gt=0,
        description="Frames older than this when their turn comes are dropped, not detected late.",
    )


class FilterSettings(_Section):
    """When a tracked object becomes an alert."""

    min_score: float = Field(0.5, ge=0.0, le=1.0, description="Scores below this count as a miss (0).")
    threshold: float = Field(
        0.7, ge=0.0, le=1.0, description="Median of the track's recent scores needed to alert."
    )
    min_frames: int = Field(1, ge=1, description="Frames the track must have been seen in before `new`.")
    min_area: float = Field(
        0.0, ge=0, description="Smallest box: pixels, or a fraction of the frame when at most 1."
    )
    max_area: float | None = Field(
        None, gt=0, description="Largest box: pixels, or a fraction of the frame when at most 1."
    )

    def area_ok(self, box_area: float, frame_area: float) -> bool:
        """True when a box of ``box_area`` pixels passes min_area/max_area in a frame of ``frame_area``."""
        low = self.min_area * frame_area if self.min_area <= 1 else self.min_area
        if box_area < low:
            return False
        if self.max_area is None:
            return True
        high = self.max_area * frame_area if self.max_area <= 1 else self.max_area
        return box_area <= high


Category = Literal["wildlife", "person", "vehicle", "other"]

#: Labels of COCO and of the seed's 18-class wildlife model, by category.
DEFAULT_CATEGORIES: dict[str, Category] = {
    "person": "person",
    **{
        label: "wildlife"
        for label in (
            # COCO's animals
            "bird",
            "cat",
            "dog",
            "horse",
            "sheep",
            "cow",
            "elephant",
            "bear",
            "zebra",
            "giraffe",
            # the seed model's wildlife classes
            "buffalo",
            "deer",
            "gaur",
            "raccoon",
            "boar",
            "wild_boar",
            "fox",
            "leopard",
            "tiger",
            "monkey",
            "peacock",
            "porcupine",
            "rabbit",
            "squirrel",
            "wolf",
            "hyena",
            "rhino",
            "antelope",
            "bison",
        )
    },
    **{label: "vehicle" for label in ("car", "truck", "bus", "motorcycle", "bicycle", "train", "boat")},
}


class TrackerSettings(_Section):
    """ByteTrack parameters (one tracker per camera)."""

    high_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Detections at or above this are matched first."
    )
    activation_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Unmatched detections at or above this start a track."
    )
    match_iou: float = Field(
        0.1, ge=0.0, le=1.0, description="Least IoU for a detection to continue a track."
    )
    lost_seconds: float = Field(2.0, gt=0, description="How long ByteTrack keeps a lost track.")
    min_frames: int = Field(2, ge=1, description="Consecutive frames before a track gets an id.")


class ObjectsSettings(_Section):
    """Which labels are tracked and when they alert."""

    track: list[TopicName] = Field(default_factory=lambda: ["person"], description="Labels that alert.")
    filters: dict[TopicName, FilterSettings] = Field(
        default_factory=dict, description="Per-label filters; labels not listed use the defaults."
    )
    score_history: int = Field(10, ge=1, le=100, description="Scores in the median window.")
    update_interval: float = Field(
        5.0, ge=0, description="Least seconds between two `update` events of one track."
    )
    max_disappeared: float = Field(
        2.0, gt=0, description="Seconds a track may be unseen before its `end` event."
    )
    tracker: TrackerSettings = Field(default_factory=TrackerSettings)
    categories: dict[TopicName, Category] = Field(
        default_factory=dict,
        description="Label -> wildlife | person | vehicle | other; added to the built-in table.",
    )
    cooldown: float = Field(
        0.0,
        ge=0,
        description="After a `new` of a label on a camera, others of that label stay silent this long.",
    )
    max_events_per_minute: int | None = Field(
        None, ge=1, description="Most `new` events per camera per minute; the rest stay silent."
    )
    stationary_after: float = Field(
        30.0, gt=0, description="Seconds without moving after which a track is stationary (no updates)."
    )
    stationary_iou: float = Field(
        0.85, gt=0, le=1, description="A box overlapping its resting place this much has not moved."
    )
    stationary_max_disappeared: float = Field(
        60.0, gt=0, description="Seconds a stationary object may be unseen before its `end` event."
    )

    def filter_for(self, label: str) -> FilterSettings:
        """The filter of ``label``, or the defaults."""
        return self.filters.get(label, _DEFAULT_FILTER)

    def category_of(self, label: str) -> Category:
        """The label's category (``other`` when nobody said)."""
        return self.categories.get(label) or DEFAULT_CATEGORIES.get(label, "other")

    def merged(self, override: CameraObjectsSettings | None) -> ObjectsSettings:
        """These settings with a camera's overrides applied (its filters replace per label)."""
        if override is None:
            return self
        updates: dict[str, Any] = {"filters": {**self.filters, **override.filters}}
        if override.track is not None:
            updates["track"] = override.track
        return self.model_copy(update=updates)


class CameraObjectsSettings(_Section):
    """Per-camera overrides of ``objects``."""

    track: list[TopicName] | None = Field(None, description="Replaces objects.track for this camera.")
    filters: dict[TopicName, FilterSettings] = Field(
        default_factory=dict, description="Replace objects.filters per label for this camera."
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


_DEFAULT_FILTER = FilterSettings()


class TlsSettings(_Section):
    """TLS to the broker (paho's ``tls_set``); the files are checked even while it is disabled."""

    enabled: bool = Field(False, description="Connect with TLS (the broker's TLS listener, often 8883).")
    ca_file: Path | None = Field(
        None, description="PEM file of the CA(s) that signed the broker's certificate; none: the system's."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM), with key_file.")
    key_file: Path | None = Field(None, description="Private key (PEM, unencrypted) of cert_file.")
    insecure: bool = Field(
        False,
        description="Skip the check that the certificate names mqtt.host (the chain is still verified).",
    )

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            problem = "is not a file" if value.exists() else "does not exist"
            raise ValueError(f"{str(value)!r} {problem}")
        try:
            value.open("rb").close()
        except OSError as exc:
            raise ValueError(f"{str(value)!r} cannot be read: {exc.strerror or exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(
                "set both cert_file and key_file (a client certificate needs its key), or neither"
            )
        return self


class MqttSettings(_Section):
    """The broker alerts go to."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("monitor", min_length=1, description="Every topic starts with this.")
    client_id: str = Field("monitor", min_length=1, max_length=128)
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between MQTT pings.")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version.")
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as a number.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if any(c in value for c in "#+\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError(f"must not contain # + or NUL nor start or end with /, got {value!r}")
        return value

    @model_validator(mode="after")
    def _password_needs_user(self) -> MqttSettings:
        if self.password is not None and not self.username:
            raise ValueError("mqtt.password is set but mqtt.username is not")
        return self


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

    @field_validator("masks")
    @classmethod
    def _masks(cls, value: list[list[Point]]) -> list[list[Point]]:
        return [_polygon(points) for points in value]

    @model_validator(mode="after")
    def _required_zones_exist(self) -> CameraSettings:
        unknown = sorted(set(self.required_zones) - set(self.zones))
        if unknown:
            raise ValueError(f"required_zones {unknown} are not defined in zones {sorted(self.zones)}")
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


_YAML_DATA: ContextVar[dict[str, Any]] = ContextVar("_YAML_DATA", default={})  # noqa: B039
_SECRETS_DIR: ContextVar[Path | None] = ContextVar("_SECRETS_DIR", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file's mapping, parsed by ``load_settings`` (lowest priority)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _YAML_DATA.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_YAML_DATA.get())


@dataclass(frozen=True, slots=True)
class _Entry:
    """One variable or credential file that pydantic-settings reads.

    Attributes:
        origin: Where it came from, for messages (``MONITOR_CAMERAS (environment)``).
        name: The variable's or the file's name.
        keys: Its key path after the prefix, in lower case (``cameras__gate__url``).
        value: The variable's text, or the credential file.
    """

    origin: str
    name: str
    keys: str
    value: str | Path

    def text(self) -> str:
        """The text pydantic-settings parses (a file's, stripped, as it does)."""
        if isinstance(self.value, str):
            return self.value
        return self.value.read_bytes().decode("utf-8").strip()


def _environment_entries() -> list[_Entry]:
    return [
        _Entry(f"{name} (environment)", name, name[len(ENV_PREFIX) :].lower(), value)
        for name, value in sorted(os.environ.items())
        if name.upper().startswith(ENV_PREFIX)
    ]


def _secret_entries(secrets_dir: Path | None) -> list[_Entry]:
    if secrets_dir is None or not secrets_dir.is_dir():
        return []
    return [
        _Entry(f"{file} (credential file)", file.name, file.name[len(ENV_PREFIX) :].lower(), file)
        for file in sorted(secrets_dir.iterdir())
        if file.name.upper().startswith(ENV_PREFIX) and file.is_file()
    ]


class _MatchedSource(PydanticBaseSettingsSource):
    """The environment or the credential files, as pydantic-settings reads them, made safe.

    Camera keys are matched to the file's cameras without regard to case
    (pydantic-settings lower-cases variable names, so ``MONITOR_CAMERAS__GATE__URL``
    would otherwise make a second camera ``gate`` beside the file's ``Gate``), and a
    value that is not the JSON its key needs becomes a ``ConfigError`` naming the
    variable or file, instead of pydantic-settings' ``SettingsError``.

    Args:
        settings_cls: ``Settings``.
        make: Builds the wrapped source (reading credential files can fail, so it is built here).
        entries: The variables or files it reads, to name the one at fault.
    """

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        make: Callable[[], PydanticBaseSettingsSource],
        entries: list[_Entry],
    ) -> None:
        super().__init__(settings_cls)
        self._make = make
        self._entries = entries

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        # Checked first: pydantic-settings raises for some of these and, for others (a nested
        # credential file), passes the text on, to be refused as if the YAML file were at fault.
        problems = _explain(self._entries)
        if problems:
            raise ConfigError(problems)
        try:
            source = self._make()
            source._set_current_state(self.current_state)
            source._set_settings_sources_data(self.settings_sources_data)
            data = source()
        except (SettingsError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError([f"environment or credential files: {exc}"]) from exc
        cameras = data.get("cameras")
        if isinstance(cameras, dict):
            data["cameras"] = _match_cameras(cameras, _YAML_DATA.get().get("cameras"))
        return data


def _match_cameras(cameras: dict[str, Any], configured: Any) -> dict[str, Any]:
    """``cameras`` with each key renamed to the file's camera of that name in any case."""
    names = [name for name in configured if isinstance(name, str)] if isinstance(configured, dict) else []
    matched: dict[str, Any] = {}
    for key, value in cameras.items():
        # Variable names have no case: with Gate and gate in the file, MONITOR_CAMERAS__GATE
        # could mean either, even though pydantic-settings hands it over as "gate".
        same = [name for name in names if name.casefold() == key.casefold()]
        target = key
        if key not in names or len(same) > 1:
            if len(same) > 1:
                raise ConfigError(
                    [
                        f"cameras.{key} (environment or credential file): matches cameras "
                        f"{', '.join(same)} of the file, whose names differ only in case; rename one "
                        "(variable names carry no case)"
                    ]
                )
            target = same[0] if same else key
        if isinstance(matched.get(target), dict) and isinstance(value, dict):
            value = {**matched[target], **value}
        matched[target] = value
    return matched


def _explain(entries: list[_Entry]) -> list[str]:
    """One line per variable or file that is not the JSON (or the UTF-8) its key needs."""
    problems = []
    for entry in entries:
        origin = entry.origin
        try:
            text = entry.text()
        except UnicodeDecodeError as err:
            problems.append(f"{origin}: not UTF-8 at byte {err.start}")
            continue
        except OSError:
            continue
        expected = _expected_json(entry.keys.split("__"), entry.name)
        if expected is None:
            continue
        try:
            json.loads(text)
        except ValueError as err:
            # The text itself is never shown: it may hold a camera's password.
            why = f"{err.msg} at character {err.pos}" if isinstance(err, json.JSONDecodeError) else str(err)
            problems.append(f"{origin}: expected {expected}; got text that is not JSON ({why})")
    return problems


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``X | None`` and of ``Annotated[X, ...]``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _expected_json(keys: list[str], name: str) -> str | None:
    """What a variable for key path ``keys`` must hold when pydantic-settings reads it as JSON, or None."""
    annotation: Any = Settings
    for key in keys:
        annotation = _unwrap(annotation)
        if _is_model(annotation):
            field = annotation.model_fields.get(key)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap(annotation)
    origin = get_origin(annotation)
    case = str.upper if name.isupper() else str.lower  # files are named in lower case
    if origin in (list, tuple, set):
        item = _unwrap(get_args(annotation)[0]) if get_args(annotation) else None
        return 'a JSON list such as ["person", "deer"]' if item is str else "a JSON list"
    if _is_model(annotation):
        first = next(iter(annotation.model_fields))
        return f'a JSON object such as {{"{first}": ...}}, or one variable per key ({name}__{case(first)})'
    if origin is dict:
        entry = case("<name>")
        return f'a JSON object such as {{"<name>": ...}}, or one variable per entry ({name}__{entry})'
    return None


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
    log: LogSettings = Field(default_factory=LogSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
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
        secrets_dir = _SECRETS_DIR.get()
        secrets = _MatchedSource(
            settings_cls,
            lambda: NestedSecretsSettingsSource(
                file_secret_settings,
                secrets_dir=secrets_dir,
                secrets_dir_missing="ok",
                secrets_nested_delimiter="__",
            ),
            _secret_entries(secrets_dir),
        )
        environment = _MatchedSource(settings_cls, lambda: env_settings, _environment_entries())
        return (init_settings, environment, secrets, _YamlSource(settings_cls))

    def camera_fps(self, name: str) -> float:
        """The detect fps of camera ``name``."""
        return self.cameras[name].detect.fps or self.detect.fps


class _TooDeep(yaml.YAMLError):
    """The file nests deeper than ``MAX_DEPTH``."""

    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")
        self.problem_mark = mark


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that refuses nesting deeper than ``MAX_DEPTH`` and names the line of a bad scalar.

    PyYAML's composer recurses once per level (20,000 levels raise ``RecursionError``),
    and its constructors raise bare ``ValueError`` for ``2020-02-30`` or an int of 5,000
    digits; both would escape as something other than a ``YAMLError``.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self._depth >= MAX_DEPTH:
            raise _TooDeep(self.peek_event().start_mark)  # type: ignore[no-untyped-call]
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {node.tag.rsplit(':', 1)[-1]}: {exc}", node.start_mark
            ) from exc


def _parse(path: Path, raw: bytes) -> tuple[Any, yaml.Node | None]:
    """The file's data and its node tree (for line numbers), or ConfigError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [f"{path} (line {line}): not UTF-8 at byte {exc.start} (0x{raw[exc.start]:02x}); save as UTF-8"]
        ) from exc
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # the reader checks every character here
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            [f"{path} (line {line}): not valid YAML: character U+{exc.character:04X} is not allowed"]
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "refused" if isinstance(exc, _TooDeep) else "not valid YAML"
        raise ConfigError([f"{path} ({where}): {kind}: {problem}"]) from exc
    finally:
        if loader is not None:
            loader.dispose()
    repeated = _repeated_keys(root)
    if repeated:
        raise ConfigError(repeated)
    return data, root


def _repeated_keys(root: yaml.Node | None) -> list[str]:
    """A line per key that a mapping repeats (YAML would keep only the last), in file order."""
    found: list[tuple[int, str]] = []
    seen: set[int] = set()
    # A stack, not recursion: through aliases a tree can be deeper than its text.
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    first = lines.get((key.tag, key.value))
                    if first is None:
                        lines[(key.tag, key.value)] = line
                    else:
                        where = f"line {line}, twice" if first == line else f"lines {first} and {line}"
                        found.append((line, f"{child} ({where}): repeated key; say it once"))
                stack.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}.{i}") for i, item in enumerate(node.value))
    return [message for _, message in sorted(found)]


def load_settings(path: Path, secrets_dir: Path | None = None, **overrides: Any) -> Settings:
    """Build ``Settings`` from a YAML file, the environment and secret files.

    Args:
        path: The YAML configuration file.
        secrets_dir: Where secret files live (systemd's ``$CREDENTIALS_DIRECTORY``).
        **overrides: Values that win over every source (used by tests and the CLI).

    Raises:
        ConfigError: With one line per problem, naming its key path (or variable, or file).
            Nothing else: a reload that raised anything else would end the daemon.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    data, root = _parse(path, raw)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    # pydantic-settings ignores variables whose first part names no section; we do not.
    sections = set(Settings.model_fields)
    stray = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in sections
    )
    if stray:
        raise ConfigError([f"{name} (environment): unknown key" for name in stray])
    yaml_token = _YAML_DATA.set(data)
    secrets_token = _SECRETS_DIR.set(secrets_dir)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError([_describe(err, root) for err in exc.errors()]) from exc
    finally:
        _YAML_DATA.reset(yaml_token)
        _SECRETS_DIR.reset(secrets_token)


def _describe(err: Any, root: yaml.Node | None) -> str:
    loc = [str(p) for p in err["loc"]]
    if loc and loc[-1] == "[key]":  # a bad dict key (a camera or zone name): the key is the place
        loc.pop()
    path = ".".join(loc) or "(top level)"
    # A missing key points at its parent section; anything else only at itself
    # (an unknown key from the environment is not on any line of the file).
    line = _yaml_line(root, loc, partial=err["type"] == "missing")
    where = f" (line {line})" if line else ""
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{path}{where}: {message}"


def _yaml_line(node: yaml.Node | None, loc: list[str], partial: bool) -> int | None:
    """The 1-based line of the key at ``loc``; with ``partial``, of its deepest ancestor in the file."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == key), None)
            if pair is None:
                return line if partial else None
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
            line = node.start_mark.line + 1
        else:
            return line if partial else None
    return line
