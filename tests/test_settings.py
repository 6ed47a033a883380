"""Configuration: YAML + environment + secret files, and `monitor check-config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.cli import main
from monitor.configfile import load_settings
from monitor.errors import ConfigError
from monitor.settings import ObjectsSettings

ROOT = Path(__file__).resolve().parent.parent

VALID = """\
model:
  path: /models/yolov8s.pt
  imgsz: 416
mqtt:
  host: broker.local
cameras:
  gate:
    url: rtsp://admin:hunter2@10.1.1.5/stream
    detect: {fps: 2, width: 1280, height: 720}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "monitor.yaml"
    path.write_text(text)
    return path


def test_valid_file_passes_check_config(tmp_path, capsys):
    assert main(["check-config", "--config", str(write(tmp_path, VALID))]) == 0
    assert "valid (1 camera(s): gate)" in capsys.readouterr().out


def test_example_config_passes_check_config(capsys):
    assert main(["check-config", "--config", str(ROOT / "config" / "monitor.example.yaml")]) == 0


def test_check_config_prints_every_error_with_its_path_and_line(tmp_path, capsys):
    text = VALID.replace("  imgsz: 416\n", "  imgsz: 416\n  colour: blue\n").replace("fps: 2", "fps: fast")
    code = main(["check-config", "--config", str(write(tmp_path, text))])
    err = capsys.readouterr().err
    assert code != 0
    assert "2 problem(s)" in err
    assert "model.colour (line 4): unknown key" in err
    assert "cameras.gate.detect.fps (line 10): Input should be a valid number" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {path: m.pt, imgsz: 300}\n", "model.imgsz (line 1): Value error, must be a multiple of 32"),
        ("model: {path: m.pt, device: gpu}\n", "model.device (line 1): Value error, expected auto, cpu"),
        ("{}\n", "model: required key is missing"),
        ("model: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("model: {path: m.pt}\ncameras: {'bad name': {url: x.mp4}}\n", "camera name 'bad name'"),
        ("model: {path: m.pt}\ncameras: {a: {url: 'ftp://x/y'}}\n", "unsupported scheme 'ftp'"),
        (
            "model: {path: m.pt}\ncameras: {a: {url: x.mp4, detect: {width: 640}}}\n",
            "set both width and height",
        ),
        ("model: {path: m.pt}\nmqtt: {password: s3cret}\n", "mqtt.password is set but mqtt.username is not"),
        ("model: {path: m.pt}\ndetect: {workers: -1}\n", "detect.workers (line 2): Input should be greater"),
        ("model: {path: m.pt}\ndetect: {workers: many}\n", "detect.workers (line 2): Input should be a"),
    ],
)
def test_invalid_values_are_reported_by_path(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_errors_never_echo_secret_values(tmp_path, capsys):
    text = VALID.replace("host: broker.local", "host: broker.local\n  password: hunter2-secret\n  port: x")
    assert main(["check-config", "--config", str(write(tmp_path, text))]) != 0
    assert "hunter2" not in capsys.readouterr().err


def test_environment_overrides_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("MONITOR_MQTT__HOST", "10.9.9.9")
    monkeypatch.setenv("MONITOR_MQTT__PORT", "8883")
    monkeypatch.setenv("MONITOR_CAMERAS__GATE__URL", "rtsp://cam.local/other")
    settings = load_settings(write(tmp_path, VALID))
    assert settings.mqtt.host == "10.9.9.9"
    assert settings.mqtt.port == 8883
    assert settings.cameras["gate"].url.get_secret_value() == "rtsp://cam.local/other"
    assert settings.cameras["gate"].detect.width == 1280  # the rest of the camera stays


def test_unknown_environment_key_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MONITOR_MQTT__HOSTNAME", "x")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, VALID))
    assert "mqtt.hostname: unknown key" in info.value.problems


def test_password_from_systemd_credentials_directory(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "monitor_mqtt__password").write_text("from-credential")
    text = VALID.replace("host: broker.local", "host: broker.local\n  username: monitor")
    settings = load_settings(write(tmp_path, text), secrets_dir=creds)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "from-credential"
    assert "from-credential" not in repr(settings)


def test_camera_url_is_hidden_in_repr(tmp_path):
    settings = load_settings(write(tmp_path, VALID))
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())


def test_unknown_environment_section_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MONITOR_CLUSTR__SHARD_COUNT", "2")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, VALID))
    assert info.value.problems == ["MONITOR_CLUSTR__SHARD_COUNT (environment): unknown key"]


COCO_ANIMALS = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"]
#: The seed model's wildlife classes that issue 6 names.
SEED_WILDLIFE = ["buffalo", "deer", "elephant", "gaur", "raccoon"]


@pytest.mark.parametrize(
    ("label", "category"),
    [
        *[(label, "wildlife") for label in COCO_ANIMALS + SEED_WILDLIFE],
        ("person", "person"),
        *[(label, "vehicle") for label in ("car", "truck", "bus", "motorcycle", "bicycle")],
        ("umbrella", "other"),
        ("Normal", "other"),
    ],
)
def test_default_category_table(label, category):
    assert ObjectsSettings().category_of(label) == category


def test_configured_category_wins_over_the_table():
    objects = ObjectsSettings(categories={"dog": "other", "umbrella": "person"})
    assert (objects.category_of("dog"), objects.category_of("umbrella")) == ("other", "person")
    assert objects.category_of("cat") == "wildlife"


def test_example_config_tracks_people_and_wildlife_by_default():
    settings = load_settings(ROOT / "config" / "monitor.example.yaml")
    tracked = settings.objects.track
    missing = [label for label in ["person", *COCO_ANIMALS, *SEED_WILDLIFE] if label not in tracked]
    assert missing == []
    assert "other" not in {settings.objects.category_of(label) for label in tracked}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("record: {pre_capture: soon}\n", "record.pre_capture (line 2): Value error, expected a duration"),
        ("record: {segment: 0.5s}\n", "record.segment (line 2): Input should be greater than or equal to 1"),
        ("record: {retention: {max_bytes: lots}}\n", "record.retention.max_bytes (line 2)"),
        ("record: {retention: {max_bytes: 10kB}}\n", "record.retention.max_bytes (line 2)"),
        ("record: {keep: forever}\n", "record.keep (line 2): unknown key"),
        ("visits: {gap: -1}\n", "visits.gap (line 2): Input should be greater than 0"),
        ("cameras: {a: {url: x.mp4, record: sometimes}}\n", "cameras.a.record (line 2)"),
        (
            "cameras: {a: {url: x.mp4, alerts: [{labels: [person], zones: [porch]}]}}\n",
            "alerts zones ['porch'] are not defined in zones []",
        ),
        ("cameras: {a: {url: x.mp4, alerts: [{labels: ['per+son']}]}}\n", "cameras.a.alerts.0.labels.0"),
    ],
)
def test_a_mangled_record_visits_or_alerts_section_is_reported_by_path(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "model: {path: m.pt}\n" + text))
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_record_settings_merge_camera_overrides_into_the_global_section(tmp_path):
    text = (
        "model: {path: m.pt}\n"
        "record: {pre_capture: 3s, retention: {max_bytes: 2GB}}\n"
        "cameras:\n"
        "  gate: {url: a.mp4, record: true}\n"
        "  yard:\n"
        "    url: b.mp4\n"
        "    record: {enabled: true, post_capture: 1m, retention: {days: 1, max_bytes: 500MiB}}\n"
        "  barn: {url: c.mp4}\n"
    )
    settings = load_settings(write(tmp_path, text))
    gate, yard = settings.record_for("gate"), settings.record_for("yard")
    assert settings.record_for("barn") is None  # recording is off by default
    assert gate is not None
    assert (gate.pre_capture, gate.post_capture, int(gate.retention.max_bytes)) == (3, 5, 2_000_000_000)
    assert yard is not None
    assert (yard.pre_capture, yard.post_capture, yard.retention.days) == (3, 60, 1)
    assert int(yard.retention.max_bytes) == 500 * 2**20
