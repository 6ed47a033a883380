"""Running as a system service: systemd notify/watchdog, SIGHUP reload, the unit file."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from monitor.cli import main
from monitor.configfile import load_settings
from monitor.daemon import Daemon
from monitor.errors import PublishError
from monitor.frames import CameraState
from monitor.notify import STALL_GRACE, pipeline_healthy
from monitor.sources import Source
from tests.conftest import CLIP, base_config, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "monitor.service"


@pytest.mark.parametrize(
    ("online", "since_processed", "healthy"),
    [(0, 999.0, True), (2, 1.0, True), (2, 9.0, True), (2, 11.0, False), (1, 60.0, False)],
)
def test_watchdog_is_withheld_when_online_cameras_go_unprocessed(online, since_processed, healthy):
    now = 1000.0
    assert pipeline_healthy(now, online, now - since_processed, interval=2.0) is healthy


def test_watchdog_ping_stops_while_an_online_cameras_frames_go_unprocessed(weights, tmp_path):
    # The loop is alive (it calls watchdog.tick) but the detector has not returned for a
    # minute: the process runs, the pipeline does not, and systemd must get no ping.
    config_path = tmp_path / "monitor.yaml"
    config = base_config(weights, tmp_path, free_port(), free_port(), cameras={"a": {"url": str(CLIP)}})
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.setblocking(False)  # sd_notify is one sendto: a ping is queued before tick returns

        def pings() -> list[bytes]:
            received = []
            while True:
                try:
                    received.append(notify.recv(4096))
                except BlockingIOError:
                    return received

        daemon = Daemon(settings, notify_socket=str(notify_path), watchdog_interval=0.5)
        with Source("a", settings.cameras["a"], settings.camera_fps("a"), daemon.metrics) as source:
            daemon.sources["a"] = source

            def online() -> bool:
                source.drain()
                return source.state is CameraState.ONLINE

            wait_until(online, 30, "camera a online")
            now = time.monotonic()
            daemon.watchdog.last_processed = now - STALL_GRACE - 1
            for tick in range(3):  # several loop ticks, each past the watchdog interval
                daemon.watchdog.tick(now + tick, online=1, cameras=1)
            assert pings() == []
            daemon.watchdog.processed(4, now + 3)  # a batch of frames went through
            daemon.watchdog.tick(now + 3, online=1, cameras=1)
            (ping,) = pings()
            assert ping.startswith(b"WATCHDOG=1\nSTATUS=1/1 cameras online")


def received_until_silent(sock: socket.socket, quiet: float) -> list[bytes]:
    """Every datagram until none arrives for ``quiet`` seconds."""
    sock.settimeout(quiet)
    received = []
    while True:
        try:
            received.append(sock.recv(4096))
        except TimeoutError:
            return received


@pytest.mark.integration
def test_notify_ready_then_watchdog_which_stops_when_the_loop_stalls(
    weights, tmp_path, broker, daemon_factory
):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(120)
    http_port = free_port()
    config = base_config(weights, tmp_path, broker.port, http_port, cameras={"a": {"url": str(CLIP)}})
    # What the daemon shows at the moment READY=1 arrives (daemon_factory itself waits for
    # /readyz, so the datagram must be read while it starts, not after).
    at_ready: dict[str, object] = {}

    def read_ready() -> None:
        try:
            at_ready["message"] = notify.recv(4096)
        except TimeoutError:
            return
        try:
            url = f"http://127.0.0.1:{http_port}/readyz"
            with urllib.request.urlopen(url, timeout=5) as response:
                at_ready["readyz"] = response.status
        except urllib.error.HTTPError as exc:
            at_ready["readyz"] = exc.code
        except OSError as exc:
            at_ready["readyz"] = repr(exc)  # not even listening
        at_ready["log"] = (tmp_path / "monitor-0.log").read_text(errors="replace")

    reader = threading.Thread(target=read_ready)
    reader.start()
    daemon = daemon_factory(
        config, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    )
    reader.join(30)
    try:
        assert at_ready.get("message") == b"READY=1"
        # Sent only once the model is loaded and warmed up (a first batch ran through it).
        assert at_ready["readyz"] == 200
        assert "warm-up took" in str(at_ready["log"])
        notify.settimeout(30)
        pings = [notify.recv(4096) for _ in range(3)]
        assert all(p.startswith(b"WATCHDOG=1\nSTATUS=") for p in pings)
        assert re.search(rb"STATUS=\d+/1 cameras online, [0-9.]+ frames/s", pings[-1])
        # A frozen process (SIGSTOP) pings no more, and pings again once it runs: the pings
        # come from the daemon's own loop, not from elsewhere. (A loop that runs while the
        # pipeline stalls is the test above.)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            queued = received_until_silent(notify, quiet=3.0)  # pings sent just before the stop
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        # WATCHDOG_USEC=1 s gives a 0.5 s ping interval: 3 s of silence is 6 missed pings.
        assert len(queued) <= 2
        notify.settimeout(10)
        assert notify.recv(4096).startswith(b"WATCHDOG=1")  # alive again
    finally:
        notify.close()
    assert daemon.terminate() == 0


@pytest.mark.gpu
@pytest.mark.integration
def test_gpu_memory_is_exported_without_systemd(weights, tmp_path, broker, daemon_factory):
    config = base_config(weights, tmp_path, broker.port, free_port())
    config["model"]["device"] = "cuda:0"
    daemon = daemon_factory(config)  # no NOTIFY_SOCKET, no WATCHDOG_USEC
    assert daemon.metrics()["monitor_gpu_memory_bytes"] > 0
    assert daemon.terminate() == 0


@pytest.mark.integration
def test_sighup_adds_and_removes_cameras_without_touching_the_others(
    weights, tmp_path, broker, daemon_factory
):
    cameras = {"keep": {"url": str(CLIP)}, "old": {"url": str(CLIP)}}
    config = base_config(weights, tmp_path, broker.port, free_port(), cameras=cameras)
    daemon = daemon_factory(config)
    config_path = tmp_path / "monitor-0.yaml"

    def processed(name: str) -> float:
        return daemon.metrics().get(f'monitor_camera_frames_processed_total{{camera="{name}"}}', 0.0)

    def cameras() -> dict[str, dict[str, object]]:
        url = f"http://127.0.0.1:{daemon.http_port}/api/cameras"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer: dict[str, dict[str, object]] = json.load(response)
        return answer

    wait_until(lambda: processed("keep") > 0 and processed("old") > 0, 30, "both cameras processing")
    wait_until(lambda: cameras()["keep"]["state"] == "online", 30, "camera keep online")
    keep_since = cameras()["keep"]["since"]
    config["cameras"] = {"keep": {"url": str(CLIP)}, "new": {"url": str(CLIP)}}
    # Keys read only at start: the reload keeps the running values and says so.
    config["detect"]["max_batch"] = 4
    config["log"]["level"] = "INFO"
    config_path.write_text(yaml.safe_dump(config))
    keep_seen = [processed("keep")]

    def keep_going_and_new_started() -> bool:
        # A restarted camera starts its counter again from 0 (or has none for a moment).
        keep_seen.append(processed("keep"))
        return processed("new") > 0

    def keep_gained() -> bool:
        keep_seen.append(processed("keep"))
        return keep_seen[-1] > keep_seen[0]

    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(keep_going_and_new_started, 30, "the new camera's frames", interval=0.2)
    wait_until(keep_gained, 15, "camera keep going on", interval=0.2)
    assert keep_seen == sorted(keep_seen), f"camera keep's processed counter went back: {keep_seen}"
    assert cameras()["keep"] == {"state": "online", "since": keep_since, "reason": None, "reconnects": 0}
    metrics = daemon.metrics()
    assert 'monitor_camera_frames_processed_total{camera="old"}' not in metrics
    assert "old" not in cameras()
    assert "changes to log, detect.max_batch take effect after a restart" in daemon.log()

    # An invalid configuration is refused; the running one stays.
    config_path.write_text("cameras: {broken: {url: 42, colour: red}}\n")
    keep_before, new_before = processed("keep"), processed("new")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload rejected" in daemon.log(), 10, "the rejection in the log")
    wait_until(
        lambda: processed("keep") > keep_before and processed("new") > new_before, 15, "both cameras going on"
    )
    assert daemon.terminate() == 0


def start_monitor(
    tmp_path: Path, config: dict[str, object], command: str = "run", open_files: tuple[int, int] | None = None
) -> tuple[subprocess.Popen[str], Path]:
    """``monitor <command>`` as a subprocess logging to a file; ``open_files``: its RLIMIT_NOFILE."""
    config_path = tmp_path / "monitor.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "monitor.log"
    args = ["-m", "monitor", command, "--config", str(config_path)]
    if open_files is not None:  # set in a parent that then becomes monitor: no preexec_fn in a test process
        setup = f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, {open_files}); "
        args = ["-c", setup + "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, text=True, env=env
        )
    return proc, log_path


def first_log_line(proc: subprocess.Popen[str], log_path: Path) -> str:
    def line() -> str:
        assert proc.poll() is None, f"exited with {proc.returncode}: {log_path.read_text()[-3000:]}"
        text = log_path.read_text()
        return text.split("\n", 1)[0] if "\n" in text else ""

    return str(wait_until(line, 60, "the first log line", interval=0.02))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_stop_signal_during_start_up_is_a_clean_stop(weights, tmp_path, sig):
    config = base_config(weights, tmp_path, free_port(), free_port(), cameras={"a": {"url": str(CLIP)}})
    proc, log_path = start_monitor(tmp_path, config)
    try:
        first_log_line(proc, log_path)  # printed before torch is imported and the model loaded
        proc.send_signal(sig)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert f"{sig.name} received: shutting down" in log
    assert "stopped before start-up finished" in log
    assert "warm-up took" not in log  # it stopped instead of starting, then stopping


@pytest.mark.parametrize("command", ["run", "serve"])
def test_the_soft_open_files_limit_is_raised_to_the_hard_one(weights, tmp_path, command):
    _, hard_now = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 4096 if hard_now == resource.RLIM_INFINITY else min(hard_now, 4096)
    soft = min(256, hard // 2)  # below whatever hard limit this machine allows
    config = base_config(weights, tmp_path, free_port(), free_port())
    proc, log_path = start_monitor(tmp_path, config, command, open_files=(soft, hard))
    try:
        line = first_log_line(proc, log_path)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (row,) = (r for r in limits.splitlines() if r.startswith("Max open files"))
    assert row.split()[3:5] == [str(hard), str(hard)]  # soft, hard
    assert f"open files limit {hard})" in line


@pytest.mark.parametrize(
    ("running", "code", "line"),
    [(True, 1, "failed while running: spool: disk full"), (False, 3, "start-up failed: spool: disk full")],
)
def test_a_failure_after_start_up_is_not_reported_as_a_start_up_failure(
    weights, tmp_path, monkeypatch, capsys, running, code, line
):
    def run(self: Daemon, stop: threading.Event, reload: object = None, load: object = None) -> None:
        self.running = running  # what Daemon.run sets once READY=1 went out
        raise PublishError("spool: disk full")

    monkeypatch.setattr(Daemon, "run", run)
    config_path = tmp_path / "monitor.yaml"
    config_path.write_text(yaml.safe_dump(base_config(weights, tmp_path, free_port(), free_port())))
    assert main(["run", "--config", str(config_path)]) == code
    err = capsys.readouterr().err
    assert line in err
    assert ("start-up failed" in err) is not running


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` of a unit file (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"continuation lines are not parsed here: {line}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert equals, f"not a directive: {line}"
        assert current is not None, f"a directive before any [section]: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_file_has_the_issues_directives_and_loads_the_mqtt_password(tmp_path):
    service = unit_directives(UNIT.read_text())["Service"]

    def only(key: str) -> str:
        assert key in service, f"{key}= is missing"
        assert len(service[key]) == 1, f"{key}= is set {len(service[key])} times: {service[key]}"
        return service[key][0]

    expected = {
        "Type": "notify",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "StateDirectory": "monitor",
        "ConfigurationDirectory": "monitor",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",  # empty: no capability at all
        "DevicePolicy": "closed",
    }
    assert {key: only(key) for key in expected} == expected
    assert service.get("DynamicUser") == ["yes"] or "User" in service
    # CUDA needs the NVIDIA devices: the group (nvidia0..N, modeset, caps) and the fixed nodes.
    assert {"char-nvidia* rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"} <= set(service["DeviceAllow"])
    for breaks_cuda in ("PrivateDevices", "MemoryDenyWriteExecute"):
        assert breaks_cuda not in service

    # The MQTT password credential, by a name the daemon reads from $CREDENTIALS_DIRECTORY. Without a
    # path it comes from systemd's credential store and is skipped when absent: the unit still starts.
    (credential,) = (c for c in service["LoadCredential"] if c.startswith("monitor_mqtt__"))
    assert ":" not in credential, (
        f"a LoadCredential= path fails the start when the file is missing: {credential}"
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / credential).write_text("s3cret")
    config = base_config(Path("model.pt"), tmp_path, 1883, 8080)
    config["mqtt"]["username"] = "monitor"
    config_path = tmp_path / "monitor.yaml"
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path, secrets_dir=credentials)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "s3cret"


def test_unit_file_verifies_and_its_exposure_is_the_one_documented(tmp_path):
    # verify checks that ExecStart exists: point it at a stand-in with the same name.
    fake_root = tmp_path / "opt" / "monitor" / ".venv" / "bin"
    fake_root.mkdir(parents=True)
    (fake_root / "monitor").write_text("#!/bin/sh\n")
    (fake_root / "monitor").chmod(0o755)
    unit = tmp_path / "monitor.service"
    unit.write_text(UNIT.read_text().replace("/opt/monitor", str(tmp_path / "opt" / "monitor")))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == "", verify.stderr  # no warning about an unknown or ignored directive
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout + security.stderr)
    assert match, security.stdout[-2000:]
    assert float(match.group(1)) <= 4.0
    documented = re.findall(
        r"overall exposure of \*\*([0-9.]+) \(OK\)\*\*", (UNIT.parent / "README.md").read_text()
    )
    assert documented == [match.group(1)]  # the number the README states is the one measured
