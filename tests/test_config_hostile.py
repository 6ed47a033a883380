"""Broken or hostile configuration: refused as invalid (exit 2, a rejected reload), never a crash."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest
import yaml

from monitor.cli import main
from monitor.configfile import load_settings
from monitor.errors import ConfigError
from tests.conftest import CLIP, base_config, free_port, wait_until

MINIMAL = "model: {path: m.pt}\n"
DEEP_LISTS = MINIMAL.encode() + b"x: " + b"[" * 20_000 + b"]" * 20_000 + b"\n"
DEEP_MAPPINGS = MINIMAL.encode() + b"x: " + b"{a: " * 20_000 + b"}" * 20_000 + b"\n"
READ_INT = "(line 1, column 28): not valid YAML: cannot read this int: "
NOT_UTF8 = MINIMAL.encode() + b'mqtt: {host: "caf\xe9"}\n'  # Latin-1, as an old editor saves it


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "monitor.yaml"
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().err


# -- the file's content ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (NOT_UTF8, "(line 2): not UTF-8 at byte 37 (0xe9)"),
        (DEEP_LISTS, "(line 2, column 35): refused: nested deeper than 32 levels"),
        (DEEP_MAPPINGS, "(line 2, column 125): refused: nested deeper than 32 levels"),
        (MINIMAL.encode() + b"\x00\n", "(line 2): not valid YAML: character U+0000 is not allowed"),
        ("model: {path: m.pt, imgsz: 2020-02-30}\n", "(line 1, column 28): not valid YAML: cannot read this"),
        (
            "model: {path: m.pt, imgsz: !!int many}\n",
            READ_INT + "invalid literal for int()",
        ),
        (
            "model: {path: m.pt, imgsz: " + "9" * 5000 + "}\n",
            READ_INT + "Exceeds the limit",
        ),
    ],
    ids=["latin-1", "lists-20000-deep", "mappings-20000-deep", "nul", "no-such-date", "bad-int", "huge-int"],
)
def test_unreadable_file_content_is_an_invalid_configuration(tmp_path, capsys, content, expected):
    path = write(tmp_path, content)
    code, err = check_config(path, capsys)
    assert (code, "Traceback" in err) == (2, False), err[-2000:]
    assert f"{path} {expected}" in err
    with pytest.raises(ConfigError):
        load_settings(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + "cameras:\n  gate: {url: a.mp4}\n  yard: {url: b.mp4}\n  gate: {url: c.mp4}\n",
            ["cameras.gate (lines 3 and 5): repeated key"],
        ),
        ("model: {path: m.pt}\nmodel: {path: n.pt}\n", ["model (lines 1 and 2): repeated key"]),
        (
            "model: {path: m.pt}\nobjects:\n  filters:\n    person: {min_score: 0.2, min_score: 0.9}\n",
            ["objects.filters.person.min_score (line 4, twice): repeated key"],
        ),
        (
            "model: {path: m.pt}\ncameras:\n  gate:\n    url: a.mp4\n    masks: [[[0, 0], [1, 0], [1, 1]]]\n"
            "    zones: {door: {coordinates: [[0, 0], [1, 0], [1, 1]]}, door: {coordinates: []}}\n"
            "    url: b.mp4\n",
            ["cameras.gate.zones.door (line 6, twice): repeated key", "cameras.gate.url (lines 4 and 7)"],
        ),
    ],
    ids=["camera", "section", "nested", "two-in-one-camera"],
)
def test_a_repeated_key_is_refused_with_both_lines(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert len(info.value.problems) == len(expected), info.value.problems
    for problem, start in zip(info.value.problems, expected, strict=True):
        assert problem.startswith(start), info.value.problems


def test_check_config_reports_every_bad_camera_name(tmp_path, capsys):
    text = MINIMAL + "cameras:\n  ok: {url: a.mp4}\n  'front door': {url: a.mp4}\n  gate/2: {url: a.mp4}\n"
    text += "  'yard+': {url: a.mp4}\n"
    code, err = check_config(write(tmp_path, text), capsys)
    assert code == 2
    assert "3 problem(s)" in err
    for line, name in ((4, "front door"), (5, "gate/2"), (6, "yard+")):
        assert f"cameras.{name} (line {line}): Value error, camera name '{name}' must be 1-64 letters" in err


# -- names that become topic levels and metric labels --------------------------------------------

CAMERA = "cameras:\n  gate:\n    url: a.mp4\n"
TRIANGLE = "{coordinates: [[0, 0], [1, 0], [1, 1]]}"


BAD_NAMES = [
    ("model: {path: m.pt, labels: {Normal: per+son}}\n", "model.labels.Normal (line 1)"),
    ("model: {path: m.pt, labels: {Normal: ''}}\n", "model.labels.Normal (line 1)"),
    ("model: {path: m.pt, labels: {Normal: '   '}}\n", "model.labels.Normal (line 1)"),
    (MINIMAL + "objects: {track: [person, 'deer/stag']}\n", "objects.track.1 (line 2)"),
    (MINIMAL + "objects: {track: ['#']}\n", "objects.track.0 (line 2)"),
    (MINIMAL + 'objects: {track: ["tab\\there"]}\n', "objects.track.0 (line 2)"),
    (MINIMAL + "objects: {filters: {'a+b': {min_score: 0.2}}}\n", "objects.filters.a+b (line 2)"),
    (MINIMAL + 'objects: {categories: {"nul\\0": other}}\n', "objects.categories.nul\0 (line 2)"),
    (MINIMAL + f"objects: {{track: [{'x' * 65}]}}\n", "objects.track.0 (line 2)"),
    (MINIMAL + CAMERA + "    objects: {track: [a/b]}\n", "cameras.gate.objects.track.0 (line 5)"),
    (MINIMAL + CAMERA + "    objects: {filters: {'#': {}}}\n", "cameras.gate.objects.filters.# (line 5)"),
    (MINIMAL + CAMERA + f"    zones: {{'z+1': {TRIANGLE}}}\n", "cameras.gate.zones.z+1 (line 5)"),
    (
        MINIMAL + CAMERA + f"    zones: {{'z/1': {TRIANGLE}}}\n    required_zones: ['z/1']\n",
        "cameras.gate.required_zones.0 (line 6)",
    ),
    (
        MINIMAL + CAMERA + "    zones: {door: {coordinates: [[0, 0], [1, 0], [1, 1]], objects: ['+']}}\n",
        "cameras.gate.zones.door.objects.0 (line 5)",
    ),
]


@pytest.mark.parametrize(("text", "where"), BAD_NAMES, ids=[where for _, where in BAD_NAMES])
def test_names_that_topics_and_metrics_cannot_carry_are_refused(tmp_path, text, where):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    (problem,) = (p for p in info.value.problems if p.startswith(where))
    assert "cannot be an MQTT topic level or a metric label" in problem
    assert "use 1-64 characters without + # / or control characters" in problem


@pytest.mark.parametrize("name", ["person", "wild boar", "wild_boar", "red-deer", "élan", "鹿", "x" * 64])
def test_ordinary_names_are_accepted_everywhere(tmp_path, name):
    quoted = json.dumps(name)
    text = (
        f"model: {{path: m.pt, labels: {{Normal: {quoted}}}}}\n"
        f"objects: {{track: [{quoted}], filters: {{{quoted}: {{}}}}, categories: {{{quoted}: wildlife}}}}\n"
        f"cameras:\n  gate:\n    url: a.mp4\n"
        f"    objects: {{track: [{quoted}], filters: {{{quoted}: {{}}}}}}\n"
        f"    zones: {{{quoted}: {{coordinates: [[0, 0], [1, 0], [1, 1]], objects: [{quoted}]}}}}\n"
        f"    required_zones: [{quoted}]\n"
    )
    settings = load_settings(write(tmp_path, text))
    assert settings.model.labels["Normal"] == name
    assert list(settings.cameras["gate"].zones) == [name]


# -- the environment and credential files --------------------------------------------------------

UPPER = MINIMAL + "cameras:\n  Gate:\n    url: rtsp://10.1.1.5/old\n    detect: {fps: 2}\n"


def test_environment_camera_key_sets_the_files_camera_of_that_name_in_any_case(tmp_path, monkeypatch):
    monkeypatch.setenv("MONITOR_CAMERAS__GATE__URL", "rtsp://admin:s3cret@10.1.1.5/new")
    settings = load_settings(write(tmp_path, UPPER))
    assert list(settings.cameras) == ["Gate"]  # not a second camera "gate"
    assert settings.cameras["Gate"].url.get_secret_value() == "rtsp://admin:s3cret@10.1.1.5/new"
    assert settings.cameras["Gate"].detect.fps == 2


def test_credential_file_camera_key_sets_the_files_camera_of_that_name_in_any_case(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "monitor_cameras__gate__url").write_text("rtsp://admin:s3cret@10.1.1.5/new\n")
    settings = load_settings(write(tmp_path, UPPER), secrets_dir=creds)
    assert list(settings.cameras) == ["Gate"]
    assert settings.cameras["Gate"].url.get_secret_value() == "rtsp://admin:s3cret@10.1.1.5/new"


def test_environment_camera_key_matching_two_cameras_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MONITOR_CAMERAS__GATE__URL", "rtsp://10.1.1.5/new")
    text = UPPER + "  gate:\n    url: rtsp://10.1.1.6/other\n"
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert info.value.problems == [
        "cameras.gate (environment or credential file): matches cameras Gate, gate of the file, "
        "whose names differ only in case; rename one (variable names carry no case)"
    ]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "MONITOR_CAMERAS",
            "notjson",
            'MONITOR_CAMERAS (environment): expected a JSON object such as {"<name>": ...}, '
            "or one variable per entry (MONITOR_CAMERAS__<NAME>); got text that is not JSON",
        ),
        (
            "MONITOR_OBJECTS__TRACK",
            "person",
            'MONITOR_OBJECTS__TRACK (environment): expected a JSON list such as ["person", "deer"]; '
            "got text that is not JSON (Expecting value at character 0)",
        ),
        (
            "MONITOR_MODEL__LABELS",
            "{Normal: person}",
            "MONITOR_MODEL__LABELS (environment): expected a JSON object",
        ),
        (
            "monitor_objects__track",
            "person",
            '/monitor_objects__track (credential file): expected a JSON list such as ["person", "deer"]',
        ),
        (
            "monitor_cameras__gate",
            '{"url": "rtsp://admin:hunter2@10.1.1.5/x"',
            '/monitor_cameras__gate (credential file): expected a JSON object such as {"url": ...}, '
            "or one variable per key (monitor_cameras__gate__url)",
        ),
    ],
)
def test_a_variable_or_credential_file_that_is_not_json_is_an_invalid_configuration(
    tmp_path, monkeypatch, capsys, command, name, value, expected
):
    if name.startswith("MONITOR_"):
        monkeypatch.setenv(name, value)
    else:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / name).write_text(value)
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    path = write(tmp_path, MINIMAL + "cameras: {gate: {url: a.mp4}}\n")
    code = main([command, "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert expected in err
    assert "Traceback" not in err
    assert "hunter2" not in err  # the text is never shown: it may hold a password


# -- a reload with such a file -------------------------------------------------------------------


@pytest.mark.integration
def test_reload_with_an_unreadable_file_keeps_the_daemon_and_its_cameras(
    weights, tmp_path, broker, daemon_factory
):
    config = base_config(weights, tmp_path, broker.port, free_port(), cameras={"keep": {"url": str(CLIP)}})
    daemon = daemon_factory(config)
    config_path = tmp_path / "monitor-0.yaml"

    def processed() -> float:
        return daemon.metrics().get('monitor_camera_frames_processed_total{camera="keep"}', 0.0)

    def cameras() -> list[str]:
        url = f"http://127.0.0.1:{daemon.http_port}/api/cameras"
        with urllib.request.urlopen(url, timeout=5) as response:
            return sorted(json.load(response))

    wait_until(lambda: processed() > 0, 30, "camera keep processing")
    good = yaml.safe_dump(config).encode()
    hostile = {
        "not UTF-8 at byte": good + b"# caf\xe9\n",
        "nested deeper than 32 levels": good + b"x: " + b"[" * 20_000 + b"]" * 20_000 + b"\n",
        "repeated key": good + b"cameras: {other: {url: x.mp4}}\n",
    }
    for rejected, (message, content) in enumerate(hostile.items(), start=1):
        config_path.write_bytes(content)
        before = processed()
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda n=rejected: daemon.log().count("reload rejected") >= n, 15, f"rejection {rejected}")
        assert message in daemon.log().split("reload rejected")[-1]
        assert daemon.proc.poll() is None, daemon.log()[-3000:]
        wait_until(lambda b=before: processed() > b, 15, "camera keep going on")
        assert cameras() == ["keep"]
    assert daemon.terminate() == 0
