"""The seed's /predict contract on the daemon's HTTP port, with real weights and a real photo."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import CLIP, PEOPLE_JPG, TEST_IMGSZ, TEST_LABELS, base_config, free_port, wait_until

pytestmark = pytest.mark.integration

TOKEN = "test-token-123"
MAX_UPLOAD = 300_000
MAX_PIXELS = 1_000_000
#: Seconds an upload may keep being told 503 (and retrying) during a burst before it counts as starved.
BURST_ANSWER_TIMEOUT = 30


@pytest.fixture(scope="module")
def server(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """`monitor serve` (no cameras, no MQTT) on the real weights, with a bearer token."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    config = {
        "model": {"path": str(weights), "imgsz": TEST_IMGSZ, "device": "cpu", "labels": TEST_LABELS},
        "http": {"port": port, "token": TOKEN, "max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS},
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    with (tmp / "serve.log").open("w") as log:
        command = [sys.executable, "-m", "monitor", "serve", "--config", str(path)]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    )

    def ready() -> bool:
        assert proc.poll() is None, (tmp / "serve.log").read_text()
        try:
            return client.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 120, "monitor serve to be ready", interval=0.2)
    yield client
    client.close()
    proc.terminate()
    assert proc.wait(10) == 0


def post(client: httpx.Client, data: bytes, name: str = "photo.jpg", path: str = "/predict", **params):
    return client.post(path, files={"file": (name, data, "application/octet-stream")}, params=params)


def jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def test_photo_of_people_returns_person_boxes_inside_the_image(server):
    response = post(server, PEOPLE_JPG.read_bytes())
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) >= 3
    for result in results:
        assert set(result) == {"label", "confidence", "boxes"}
        assert result["label"] == "person"
        assert 0.25 <= result["confidence"] <= 1
        assert round(result["confidence"], 2) == result["confidence"]
        x1, y1, x2, y2 = result["boxes"]
        assert 0 <= x1 < x2 <= 768
        assert 0 <= y1 < y2 <= 576


def test_seed_cases_black_square_and_background_crop_are_empty(server):
    photo = cv2.imread(str(PEOPLE_JPG))
    assert post(server, jpeg(np.zeros((10, 10, 3), np.uint8))).json() == {"results": []}
    assert post(server, jpeg(photo[0:30, 0:200])).json() == {"results": []}


def test_conf_parameter_filters_results(server):
    everything = post(server, PEOPLE_JPG.read_bytes(), conf=0.1).json()["results"]
    confident = post(server, PEOPLE_JPG.read_bytes(), conf=0.36).json()["results"]
    assert len(everything) > len(confident) > 0
    assert all(r["confidence"] >= 0.36 for r in confident)
    assert post(server, PEOPLE_JPG.read_bytes(), conf=1.5).status_code == 422


def test_annotated_picture_comes_back_as_jpeg(server):
    response = post(server, PEOPLE_JPG.read_bytes(), path="/predict_image")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (576, 768, 3)
    assert not np.array_equal(image, cv2.imread(str(PEOPLE_JPG)))  # boxes were drawn


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "status", "detail"),
    [
        (b"name,count\nelephant,3\n", 415, "not a picture"),
        (_gif(), 415, "unsupported format GIF"),
        (PEOPLE_JPG.read_bytes()[:20_000], 422, "corrupt or truncated JPEG"),
        (b"", 422, "empty"),
        (_png(1100, 1000), 413, "the limit is 1000000"),
        (b"\xff" * (MAX_UPLOAD + 1), 413, f"larger than {MAX_UPLOAD} bytes"),
    ],
    ids=["csv", "gif", "truncated-jpeg", "empty", "too-many-pixels", "too-many-bytes"],
)
def test_bad_uploads_get_a_clear_status_and_detail(server, data, status, detail):
    response = post(server, data)
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert post(server, PEOPLE_JPG.read_bytes()).status_code == 200  # nothing was disturbed


def test_oversized_chunked_upload_is_refused_without_content_length(server):
    def body() -> Iterator[bytes]:
        for _ in range(MAX_UPLOAD // 10_000 + 2):
            yield b"x" * 10_000

    headers = {"content-type": "multipart/form-data; boundary=b"}
    response = server.post("/predict", content=body(), headers=headers)
    assert response.status_code == 413


def _request(server: httpx.Client, path: str, headers: dict[str, str]) -> httpx.Response:
    """``path`` on the server with exactly ``headers`` (not the client's own token)."""
    url = f"{server.base_url}{path}"
    if path.startswith("/predict"):
        return httpx.post(
            url, files={"file": ("p.jpg", PEOPLE_JPG.read_bytes())}, headers=headers, timeout=60
        )
    return httpx.get(url, headers=headers, timeout=30)


@pytest.mark.parametrize("path", ["/predict", "/api/cameras"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
    ids=["none", "wrong", "no-scheme", "basic"],
)
def test_guarded_endpoints_refuse_a_missing_or_wrong_token(server, path, headers):
    response = _request(server, path, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"] == "missing or wrong bearer token"
    assert TOKEN not in response.text


def test_guarded_endpoints_answer_the_right_token(server):
    right = {"Authorization": f"Bearer {TOKEN}"}
    predicted = _request(server, "/predict", right)
    assert predicted.status_code == 200
    assert {r["label"] for r in predicted.json()["results"]} == {"person"}
    cameras = _request(server, "/api/cameras", right)
    assert cameras.status_code == 200
    assert cameras.json() == {}  # `monitor serve` runs no cameras


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/docs"])
def test_probes_metrics_and_docs_need_no_token(server, path):
    response = _request(server, path, {})
    assert response.status_code == 200
    if path == "/metrics":
        assert "monitor_" in response.text
    if path == "/readyz":
        assert response.json()["ready"] is True


def test_upload_burst_never_starves_the_cameras(weights, tmp_path, broker, daemon_factory):
    cameras = {"a": {"url": str(CLIP)}, "b": {"url": str(CLIP)}}
    config = base_config(weights, tmp_path, broker.port, free_port(), cameras=cameras)
    config["model"]["imgsz"] = 320
    config["http"]["queue_size"] = 4
    daemon = daemon_factory(config)
    keys = [f'monitor_camera_frames_processed_total{{camera="{c}"}}' for c in ("a", "b")]
    wait_until(lambda: all(daemon.metrics()[k] > 0 for k in keys), 30, "both cameras processing")

    def rate(seconds: float) -> float:
        before, start = daemon.metrics(), time.monotonic()
        wait_until(lambda: time.monotonic() - start >= seconds, seconds + 5, "the window", interval=0.5)
        after = daemon.metrics()
        return sum(after[k] - before[k] for k in keys) / (time.monotonic() - start)

    baseline = rate(6)
    lock = threading.Lock()
    started = 0
    answers: list[httpx.Response] = []
    done = threading.Event()
    url = f"http://127.0.0.1:{daemon.http_port}/predict"

    def upload() -> None:
        """20 clients at once, each uploading again as soon as it is answered (after Retry-After on 503)."""
        nonlocal started
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                with lock:
                    started += 1
                r = client.post(url, files={"file": ("p.jpg", PEOPLE_JPG.read_bytes())})
                with lock:
                    answers.append(r)
                if r.status_code == 503:
                    done.wait(float(r.headers["retry-after"]))

    corrupt: list[httpx.Response] = []
    corrupt_answered = threading.Event()

    def upload_corrupt() -> None:
        """One truncated JPEG in the middle of the burst, retried as told while the queue is full."""
        deadline = time.monotonic() + BURST_ANSWER_TIMEOUT
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < deadline:
                r = client.post(url, files={"file": ("bad.jpg", PEOPLE_JPG.read_bytes()[:20_000])})
                corrupt.append(r)
                if r.status_code != 503:
                    corrupt_answered.set()
                    return
                time.sleep(float(r.headers["retry-after"]))  # what the server asked a client to do

    threads = [threading.Thread(target=upload) for _ in range(20)]
    threads.append(threading.Thread(target=upload_corrupt))
    for t in threads:
        t.start()
    during = rate(6)
    # The burst goes on until the corrupt upload has had its answer, so that answer came during it.
    corrupt_answered.wait(BURST_ANSWER_TIMEOUT)
    done.set()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()], "an upload got no answer within 60 s"
    assert started == len(answers) > 20, f"{started} uploads started, {len(answers)} answered"
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 200 in statuses
    busy = [r for r in answers if r.status_code == 503]
    assert busy, "20 clients on a queue of 4: some must be told to come back"
    for r in busy:
        assert r.headers["retry-after"] == "1"
        assert r.json()["detail"].startswith("busy: ")
        assert "retry later" in r.json()["detail"]
    for r in answers:
        if r.status_code == 200:
            assert {x["label"] for x in r.json()["results"]} == {"person"}
    assert corrupt, "the corrupt upload was never sent"
    assert corrupt[-1].status_code == 422, [r.status_code for r in corrupt]
    assert "corrupt or truncated JPEG" in corrupt[-1].json()["detail"]
    assert during >= 0.7 * baseline, f"cameras: {during:.2f} fps during the burst, {baseline:.2f} before"
    after = daemon.metrics()
    assert all(after[f'monitor_camera_up{{camera="{c}"}}'] == 1 for c in ("a", "b"))
