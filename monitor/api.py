"""HTTP: the seed's /predict, /metrics for Prometheus, /healthz, /readyz and camera status.

FastAPI served by uvicorn on a thread of the daemon; the socket is bound
before the thread starts, so the port is known (and a taken port fails
start-up) at once. Uploaded pictures are checked (size, format, pixels)
in the HTTP worker threads, then queued for the daemon's detector, where
they share batches with the camera frames; a full queue answers 503 with
``Retry-After`` instead of slowing the cameras.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Annotated, Any

import supervision as sv
import uvicorn
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.errors import MonitorError
from monitor.metrics import Metrics
from monitor.predict import ImageError, PredictResponse, decode_image, to_response
from monitor.scheduler import QueueFull
from monitor.settings import HttpSettings
from monitor.snapshots import Annotator, encode_jpeg, labels_of
from monitor.sources import CameraStatus

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 3.0
RETRY_AFTER_SECONDS = 1

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# Module level: FastAPI resolves these (string) annotations in the module's namespace.
Conf = Annotated[float, Query(ge=0.0, le=1.0, description="Lowest confidence returned.")]
Upload = Annotated[UploadFile, File(description="A JPEG, PNG, BMP, WEBP, TIFF or HEIF picture.")]


@dataclass
class Health:
    """What /readyz, /api/cameras and /predict reach; the daemon fills it in."""

    model_ready: bool = False
    mqtt_connected: Callable[[], bool] = lambda: False
    mqtt_error: Callable[[], str | None] = lambda: None
    cameras: Callable[[], list[CameraStatus]] = lambda: []
    predict: Callable[[Any, float], Future[sv.Detections]] | None = None
    snapshot: Callable[[str], bytes | None] = lambda event_id: None
    #: What works in a reduced way right now, and why: ``{"spool": "disk full: ...", ...}``.
    degraded: Callable[[], dict[str, str]] = lambda: {}


class _UploadLimit:
    """ASGI middleware: 413 for request bodies over the limit, before anything parses them.

    A declared ``Content-Length`` is checked at once (the server enforces it);
    a body sent without one is read here up to the limit, then replayed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = f'{{"detail":"upload larger than {self.max_bytes} bytes"}}'.encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(metrics: Metrics, health: Health, settings: HttpSettings) -> FastAPI:
    """The daemon's HTTP application."""
    app = FastAPI(
        title="monitor",
        description="Field-camera monitoring daemon: detection on uploaded pictures, health, metrics.",
        version="0.1.0",
    )
    app.add_middleware(_UploadLimit, max_bytes=settings.max_upload_bytes)
    token = settings.token.get_secret_value() if settings.token else None
    local = threading.local()  # supervision annotators are not thread-safe

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    # Uploads in flight (decoding, queued or in a batch): beyond this, 503 at once,
    # before any decoding, so a burst costs the cameras almost nothing.
    admission = threading.BoundedSemaphore(settings.queue_size)

    def detect(file: UploadFile, conf: float) -> tuple[Any, sv.Detections]:
        if health.predict is None or not health.model_ready:
            raise HTTPException(503, "the model is not loaded yet", headers={"Retry-After": "5"})
        if not admission.acquire(blocking=False):
            raise HTTPException(
                503,
                f"busy: {settings.queue_size} pictures are already in progress; retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            return _detect(file, conf)
        finally:
            admission.release()

    def _detect(file: UploadFile, conf: float) -> tuple[Any, sv.Detections]:
        assert health.predict is not None
        try:
            image = decode_image(file.file.read(), settings.max_pixels)
        except ImageError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        try:
            future = health.predict(image, conf)
        except QueueFull as exc:
            raise HTTPException(
                503, f"busy: {exc}; retry later", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            ) from None
        try:
            detections = future.result(timeout=settings.request_timeout)
        except FutureTimeout:
            future.cancel()
            raise HTTPException(504, f"no result within {settings.request_timeout:g} s") from None
        except RuntimeError as exc:  # the daemon is stopping
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None
        return image, detections

    @app.post("/predict", response_model=PredictResponse, dependencies=guarded)
    def predict(file: Upload, conf: Conf = 0.25) -> PredictResponse:
        """Detect objects in one picture (the seed project's contract)."""
        _, detections = detect(file, conf)
        return to_response(detections)

    @app.post(
        "/predict_image",
        dependencies=guarded,
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def predict_image(file: Upload, conf: Conf = 0.25) -> Response:
        """Detect objects in one picture; return it annotated, as JPEG."""
        image, detections = detect(file, conf)
        if not hasattr(local, "annotator"):
            local.annotator = Annotator()
        scene = local.annotator.draw(image, detections, labels_of(detections))
        return Response(encode_jpeg(scene), media_type="image/jpeg")

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Alive: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready once the model is loaded and warmed up; says what is missing otherwise."""
        body = {
            "ready": health.model_ready,
            "model": "ready" if health.model_ready else "loading",
            "mqtt": "connected" if health.mqtt_connected() else (health.mqtt_error() or "connecting"),
            "degraded": health.degraded(),
        }
        return JSONResponse(body, status_code=200 if health.model_ready else 503)

    @app.get(
        "/api/events/{event_id}/snapshot.jpg",
        dependencies=guarded,
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {}},
    )
    def event_snapshot(event_id: str) -> Response:
        """The best annotated frame of an event (kept for the latest snapshots.max_count events)."""
        jpeg = health.snapshot(event_id)
        if jpeg is None:
            raise HTTPException(404, f"no snapshot for event {event_id!r}")
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/api/cameras", dependencies=guarded)
    def cameras() -> dict[str, Any]:
        """Each camera's state, reason and reconnect count."""
        return {
            s.camera: {
                "state": s.state.value,
                "since": s.since,
                "reason": s.reason,
                "reconnects": s.reconnects,
            }
            for s in health.cameras()
        }

    return app


class HttpServer:
    """Runs the app on a background thread; a context manager."""

    def __init__(self, settings: HttpSettings, app: FastAPI) -> None:
        self.settings = settings
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT),
        )
        self._server = uvicorn.Server(config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = settings.port

    def __enter__(self) -> HttpServer:
        try:
            sock = socket.create_server((self.settings.host, self.settings.port))
        except OSError as exc:
            raise MonitorError(
                f"http: cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror or exc}"
            ) from exc
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="monitor-http", daemon=True
        )
        self._thread.start()
        host = self.settings.host
        logger.info("HTTP on http://%s:%d (/predict, /metrics, /healthz, /readyz)", host, self.port)
        if self.settings.token is None and not _is_loopback(host):
            logger.warning("http.host %s is reachable from the network and http.token is not set", host)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT + 1)
        if self._socket is not None:
            self._socket.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
