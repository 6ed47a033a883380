"""HTTP: the seed's /predict, /metrics for Prometheus, /healthz, /readyz and camera status.

FastAPI served by uvicorn on a thread of the daemon; the socket is bound
before the thread starts, so the port is known (and a taken port fails
start-up) at once. Uploaded pictures are checked (size, format, pixels)
in the HTTP worker threads, then queued for the daemon's detector, where
they share batches with the camera frames; a full queue answers 503 with
``Retry-After`` instead of slowing the cameras.

Slow and hostile clients (issue 17). A connection costs a file descriptor
until it closes, so what a client may hold is bounded here, not by its goodwill:

* ``http.max_connections``: a connection beyond it is answered 503 and closed
  inside ``accept`` (``_LimitedListener``, the listening socket handed to
  uvicorn), before anything is read; the count is of accepted sockets until
  they close. uvicorn's ``limit_concurrency`` is not used: it counts only when
  a request's headers are complete, so connections that send nothing, or half
  a header, are never refused by it; and a check in the protocol would come
  too late, since asyncio accepts up to ``backlog`` sockets a tick before any
  protocol sees one (a flood could still take every descriptor for a moment).
* ``http.read_timeout``: the whole request, headers and body, must arrive within
  it (from the connection's start, or from the first byte of a later request
  on a kept-alive one); else 408 and close. uvicorn (0.55, h11) has no header
  or body read timeout at all (``timeout_keep_alive`` runs only between
  requests), and h11 none either, so it lives in ``_DeadlineH11Protocol``, a
  subclass of uvicorn's ``H11Protocol`` passed as ``uvicorn.Config(http=...)``:
  one timer per connection, armed when a request starts, cancelled when h11
  has read the request to its end. It covers connections that send nothing,
  headers only, or part of a body, and a body still arriving after an early
  answer (413) is cut off the same way. WebSockets are off (``ws="none"``), so
  no upgrade leaves this protocol.
* When descriptors still run out, asyncio logs ``socket.accept() out of system
  resource`` on every retry (thousands a second, each with a traceback);
  ``monitor.logs`` lets one line a burst through.

Decoded pixels are bounded across concurrent uploads: a picture holds its
pixel count (width x height, from the header) against a budget of
``http.max_pixels`` while it is decoded and detected; one that does not fit
waits up to ``PIXEL_WAIT_SECONDS``, then gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import h11
import supervision as sv
import uvicorn
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.protocols.http.h11_impl import H11Protocol

from monitor.errors import MonitorError
from monitor.frames import CameraStatus
from monitor.metrics import Metrics
from monitor.predict import ImageError, PredictResponse, open_image, to_response
from monitor.scheduler import QueueFull
from monitor.settings import HttpSettings
from monitor.snapshots import Annotator, encode_jpeg, labels_of

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 3.0
RETRY_AFTER_SECONDS = 1
#: Most seconds an upload waits for room in the pixel budget before it is told 503.
PIXEL_WAIT_SECONDS = 5.0
#: Least seconds between two log lines about refused or timed-out connections.
BURST_LOG_INTERVAL = 60.0
#: What an event id looks like (``alerts``: ``f"{start_time:.6f}-{token_hex(3)}"``); anything
#: else is 404 before a file name is built from it.
EVENT_ID = re.compile(r"[0-9]{1,12}\.[0-9]{6}-[0-9a-f]{6}")

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


class _BurstLog:
    """One warning for a burst of like events: the first at once, then one a minute with a count.

    ``message``'s first ``%d`` is the count of events since the last line.
    Called from the server's event loop only.
    """

    def __init__(self, message: str) -> None:
        self._message = message
        self._count = 0
        self._last = -BURST_LOG_INTERVAL

    def note(self, *args: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= BURST_LOG_INTERVAL:
            logger.warning(self._message, self._count, *args)
            self._count, self._last = 0, now


def _raw_response(status: int, reason: str, detail: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers outside h11's cycle."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _LimitedListener(socket.socket):
    """The listening socket: at most ``max_connections`` accepted connections open at once.

    asyncio's accept loop takes up to ``backlog`` connections a tick before any
    protocol sees one, so a limit kept by the protocol would still let a flood
    take every descriptor for a moment (and the camera decoders, the spool or
    the snapshots fail to open theirs). Here the count is of accepted sockets
    until they are closed, and a connection over the limit is answered 503 and
    closed inside ``accept`` itself: its descriptor is free before the next.
    """

    #: Most connections refused in one ``accept`` call before the event loop gets a turn.
    REFUSE_BATCH = 256

    def __init__(self, sock: socket.socket, max_connections: int) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.max_connections = max_connections
        self.open = 0
        self._lock = threading.Lock()
        self._refused_log = _BurstLog(
            "http: %d connections refused (503) since the last such line: http.max_connections=%d"
        )
        detail = f"busy: {max_connections} connections are open; retry later"
        self._busy = _raw_response(503, "Service Unavailable", detail, RETRY_AFTER_SECONDS)

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(self.REFUSE_BATCH):
            fd, address = self._accept()  # type: ignore[attr-defined]  # what socket.accept calls
            with self._lock:
                admitted = self.open < self.max_connections
                if admitted:
                    self.open += 1
            if admitted:
                return _Connection(self, fd), address
            self._refuse(fd)
        raise BlockingIOError("connections refused; the event loop's turn")

    def _refuse(self, fd: int) -> None:
        self._refused_log.note(self.max_connections)
        with socket.socket(self.family, self.type, self.proto, fileno=fd) as refused:
            refused.setblocking(False)
            with suppress(OSError):  # the client may be gone already
                refused.send(self._busy)

    def closed_one(self) -> None:
        with self._lock:
            self.open -= 1


class _Connection(socket.socket):
    """An accepted connection; closing it frees its place under the listener's limit."""

    def __init__(self, listener: _LimitedListener, fd: int) -> None:
        super().__init__(listener.family, listener.type, listener.proto, fileno=fd)
        self._listener: _LimitedListener | None = listener

    def close(self) -> None:
        listener, self._listener = self._listener, None
        super().close()
        if listener is not None:
            listener.closed_one()


class _DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request.

    The subclass made by ``deadline_protocol`` sets ``read_timeout``.
    """

    read_timeout = 30.0
    _timeout_log = _BurstLog(
        "http: %d connections closed (408) since the last such line: no whole request within "
        "http.read_timeout=%g s"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm()  # a request starts (or goes on): its deadline runs
        super().data_received(data)
        self._disarm_if_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request may already have begun (uvicorn handled the buffered bytes).
        started = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        )
        if started and not self.transport.is_closing():
            self._arm()
        self._disarm_if_read()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_if_read(self) -> None:
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request was read to its end (or the connection failed)

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self._timeout_log.note(self.read_timeout)
        # An early answer (413, say) may already be out while the body still trickles in.
        answered = (
            self.cycle is not None and self.cycle.response_started and self.conn.their_state is not h11.IDLE
        )
        if not answered:
            detail = f"the request was not received within {self.read_timeout:g} s"
            self.transport.write(_raw_response(408, "Request Timeout", detail))
        if self.cycle is not None and not self.cycle.response_complete:
            # The app's receive() now returns http.disconnect, and what it sends is dropped.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


def deadline_protocol(read_timeout: float) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this read timeout."""

    class DeadlineH11Protocol(_DeadlineH11Protocol):
        pass

    DeadlineH11Protocol.read_timeout = read_timeout
    return DeadlineH11Protocol


class HttpServer:
    """Runs the app on a background thread; a context manager."""

    def __init__(self, settings: HttpSettings, app: FastAPI) -> None:
        self.settings = settings
        config = uvicorn.Config(
            app,
            http=deadline_protocol(settings.read_timeout),
            ws="none",
            # No handlers of uvicorn's own: its records propagate to the root logger, so they get
            # monitor.logs' formatter (text or JSON) and its redaction like every other line.
            log_config=None,
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
        self._socket = _LimitedListener(sock, self.settings.max_connections)
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="monitor-http", daemon=True
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
