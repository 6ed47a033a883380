"""The HTTP server: uvicorn on a thread of the daemon, safe against slow and hostile clients.

The socket is bound before the thread starts, so the port is known (and a
taken port fails start-up) at once. The application it serves is ``api.py``'s.

A connection costs a file descriptor until it closes, so what a client may
hold is bounded here, not by its goodwill:

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
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import threading
import time
from contextlib import suppress
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from monitor.errors import MonitorError
from monitor.settings import HttpSettings

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 3.0
#: Seconds a client refused as busy is asked to wait (``Retry-After``).
RETRY_AFTER_SECONDS = 1
#: Least seconds between two log lines about refused or timed-out connections.
BURST_LOG_INTERVAL = 60.0


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
