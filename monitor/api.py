"""HTTP: the seed's /predict, /metrics for Prometheus, /healthz, /readyz and camera status.

FastAPI served by uvicorn on a thread of the daemon; the socket is bound
before the thread starts, so the port is known (and a taken port fails
start-up) at once. Uploaded pictures are checked (size, format, pixels)
in the HTTP worker threads, then queued for the daemon's detector, where
they share batches with the camera frames; a full queue answers 503 with
``Retry-After`` instead of slowing the cameras.

The server around the app (a bounded number of connections, a deadline for
reading each request) is ``http_server.py``.

Decoded pixels are bounded across concurrent uploads: a picture holds its
pixel count (width x height, from the header) against a budget of
``http.max_pixels`` while it is decoded and detected; one that does not fit
waits up to ``PIXEL_WAIT_SECONDS``, then gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import supervision as sv
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.frames import CameraStatus
from monitor.http_server import RETRY_AFTER_SECONDS
from monitor.metrics import Metrics
from monitor.predict import ImageError, PredictResponse, open_image, to_response
from monitor.scheduler import QueueFull
from monitor.settings import HttpSettings
from monitor.snapshots import EVENT_ID, Annotator, encode_jpeg, labels_of

logger = logging.getLogger(__name__)

#: Most seconds an upload waits for room in the pixel budget before it is told 503.
PIXEL_WAIT_SECONDS = 5.0

T = TypeVar("T")

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
    #: The MP4 file of an event's or a visit's clip, by its id (``monitor.recorder``).
    clip: Callable[[str], Path | None] = lambda clip_id: None
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


class _PixelBudget:
    """Pixels of the uploads being decoded and detected, counted against one budget.

    ``hold`` waits (up to ``wait`` seconds) until the picture fits, then counts it
    until the block ends; a picture larger than the whole budget counts as the
    whole budget, so it runs alone instead of never.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._room = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, wait: float) -> Iterator[None]:
        """Count ``pixels`` while the block runs.

        Raises:
            HTTPException: 503 with ``Retry-After`` when they did not fit within ``wait`` seconds.
        """
        pixels = min(pixels, self.total)
        with self._room:
            if not self._room.wait_for(lambda: self._used + pixels <= self.total, wait):
                raise HTTPException(
                    503,
                    f"busy: {self._used} pixels of other uploads are being decoded, {pixels} more do not "
                    f"fit in {self.total}; retry later",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self._used += pixels
        try:
            yield
        finally:
            with self._room:
                self._used -= pixels
                self._room.notify_all()


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
        # RFC 7235: the scheme is case-insensitive ("bearer", "BEARER"); the token is not,
        # and is compared in constant time.
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip(" ").encode()
        if scheme.lower() != "bearer" or not secrets.compare_digest(given, token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    # Uploads in flight (decoding, queued or in a batch): beyond this, 503 at once,
    # before any decoding, so a burst costs the cameras almost nothing.
    admission = threading.BoundedSemaphore(settings.queue_size)
    # Decoded pixels in flight, whatever the number of uploads: a 143 kB PNG can
    # declare 49 million of them (about 340 MB while decoding).
    pixels = _PixelBudget(settings.max_pixels)

    def detect(file: UploadFile, conf: float, finish: Callable[[Any, sv.Detections], T]) -> T:
        """Decode, detect, then ``finish(image, detections)``, with the pixels held throughout."""
        if health.predict is None or not health.model_ready:
            raise HTTPException(503, "the model is not loaded yet", headers={"Retry-After": "5"})
        if not admission.acquire(blocking=False):
            raise HTTPException(
                503,
                f"busy: {settings.queue_size} pictures are already in progress; retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        try:
            data = file.file.read()
            try:
                with open_image(data, settings.max_pixels) as upload:
                    del data
                    with pixels.hold(upload.pixels, min(PIXEL_WAIT_SECONDS, settings.request_timeout)):
                        image = upload.decode()
                        result = finish(image, _detect(image, conf))
                        del image  # freed before its pixels leave the budget
                        return result
            except ImageError as exc:
                raise HTTPException(exc.status, str(exc)) from None
        finally:
            admission.release()

    def _detect(image: Any, conf: float) -> sv.Detections:
        assert health.predict is not None
        try:
            future = health.predict(image, conf)
        except QueueFull as exc:
            raise HTTPException(
                503, f"busy: {exc}; retry later", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
            ) from None
        try:
            return future.result(timeout=settings.request_timeout)
        except FutureTimeout:
            future.cancel()
            raise HTTPException(504, f"no result within {settings.request_timeout:g} s") from None
        except RuntimeError as exc:  # the daemon is stopping
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None

    @app.post("/predict", response_model=PredictResponse, dependencies=guarded)
    def predict(file: Upload, conf: Conf = 0.25) -> PredictResponse:
        """Detect objects in one picture (the seed project's contract)."""
        return detect(file, conf, lambda image, detections: to_response(detections))

    @app.post(
        "/predict_image",
        dependencies=guarded,
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    def predict_image(file: Upload, conf: Conf = 0.25) -> Response:
        """Detect objects in one picture; return it annotated, as JPEG."""

        def annotate(image: Any, detections: sv.Detections) -> bytes:
            if not hasattr(local, "annotator"):
                local.annotator = Annotator()
            return encode_jpeg(local.annotator.draw(image, detections, labels_of(detections)))

        return Response(detect(file, conf, annotate), media_type="image/jpeg")

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
        if not EVENT_ID.fullmatch(event_id):
            shown = event_id if len(event_id) <= 40 else f"{event_id[:40]}... ({len(event_id)} characters)"
            raise HTTPException(
                404, f"no snapshot for event {shown!r}: event ids look like 1712345678.123456-a1b2c3"
            )
        jpeg = health.snapshot(event_id)
        if jpeg is None:
            raise HTTPException(404, f"no snapshot for event {event_id!r}")
        return Response(jpeg, media_type="image/jpeg")

    def clip(kind: str, clip_id: str) -> FileResponse:
        path = health.clip(clip_id) if EVENT_ID.fullmatch(clip_id) else None
        if path is None:
            shown = clip_id if len(clip_id) <= 40 else f"{clip_id[:40]}... ({len(clip_id)} characters)"
            raise HTTPException(404, f"no clip for {kind} {shown!r} (yet: it is cut after the end)")
        # Starlette answers Range requests (206) itself: browsers and phones seek in the clip.
        return FileResponse(
            path, media_type="video/mp4", filename=f"{clip_id}.mp4", content_disposition_type="inline"
        )

    clip_responses: dict[int | str, dict[str, Any]] = {200: {"content": {"video/mp4": {}}}, 206: {}, 404: {}}

    @app.get("/api/events/{event_id}/clip.mp4", dependencies=guarded, responses=clip_responses)
    def event_clip(event_id: str) -> FileResponse:
        """The event's MP4 clip with pre- and post-roll, stream-copied (recording cameras)."""
        return clip("event", event_id)

    @app.get("/api/reviews/{visit_id}/clip.mp4", dependencies=guarded, responses=clip_responses)
    def review_clip(visit_id: str) -> FileResponse:
        """The visit's MP4 clip, from before its first event to after its last one."""
        return clip("visit", visit_id)

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
