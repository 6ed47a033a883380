"""The ``mqtt`` section: protocol and TLS choices, and errors that name the key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.configfile import load_settings
from monitor.errors import ConfigError


def write_config(tmp_path: Path, mqtt_yaml: str) -> Path:
    path = tmp_path / "monitor.yaml"
    path.write_text(f"model: {{path: m.pt}}\nmqtt:\n{mqtt_yaml}")
    return path


def test_mqtt_protocol_and_tls_settings(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")
    settings = load_settings(
        write_config(tmp_path, f"  protocol: 5\n  tls: {{enabled: true, ca_file: {ca}}}\n")
    )
    assert settings.mqtt.protocol == "5"
    assert settings.mqtt.tls.ca_file == ca
    assert load_settings(write_config(tmp_path, "  port: 1883\n")).mqtt.protocol == "3.1.1"


@pytest.mark.parametrize(
    ("mqtt_yaml", "expected"),
    [
        ("  protocol: 4\n", "mqtt.protocol (line 3): Input should be '3.1.1' or '5'"),
        (
            "  tls: {enabled: true, ca_file: /nonexistent/ca.crt}\n",
            "mqtt.tls.ca_file (line 3): Value error, '/nonexistent/ca.crt' does not exist",
        ),
        ("  tls: {cert_file: CA}\n", "mqtt.tls (line 3): Value error, set both cert_file and key_file"),
        ("  tls: {enabled: true, ca_file: DIR}\n", "is not a file"),
    ],
)
def test_bad_mqtt_settings_name_the_key(tmp_path, mqtt_yaml, expected):
    (tmp_path / "ca.crt").write_text("x")
    mqtt_yaml = mqtt_yaml.replace("CA", str(tmp_path / "ca.crt")).replace("DIR", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_settings(write_config(tmp_path, mqtt_yaml))
    assert any(expected in p for p in info.value.problems), info.value.problems
