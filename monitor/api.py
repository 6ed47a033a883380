"""HTTP: /metrics for Prometheus, /healthz, /readyz and camera status.

FastAPI served by uvicorn on a thread of the daemon; the socket is bound
before the thread starts, so the port is known (and a taken port fails
start-up) at once.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monitor.errors import MonitorError
from monitor.metrics import Metrics
from monitor.settings import HttpSettings
from monitor.sources import CameraStatus

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 3.0


@dataclass
class Health:
    """What /readyz and /api/cameras report; the daemon fills it in."""

    model_ready: bool = False
    mqtt_connected: Callable[[], bool] = lambda: False
    mqtt_error: Callable[[], str | None] = lambda: None
    cameras: Callable[[], list[CameraStatus]] = lambda: []
    extra: dict[str, Any] = field(default_factory=dict)


def create_app(metrics: Metrics, health: Health) -> FastAPI:
    """The daemon's HTTP application."""
    app = FastAPI(title="monitor", description="Field-camera monitoring daemon", version="0.1.0")

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
        }
        return JSONResponse(body, status_code=200 if health.model_ready else 503)

    @app.get("/api/cameras")
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
            sock = socket.create_server((self.settings.host, self.settings.port), reuse_port=False)
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
        logger.info("HTTP on http://%s:%d (/metrics, /healthz, /readyz)", self.settings.host, self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT + 1)
        if self._socket is not None:
            self._socket.close()
