"""Logging for journald and terminals, with credentials scrubbed from every line.

Every record goes through ``redact`` after formatting, so a URL with
``user:pass@`` or a ``?password=`` query that slips into a message, an
argument or a traceback never reaches the log. Records carry the camera name
(``extra={"camera": name}``) where one applies; cameras are never identified
by URL.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from logging.handlers import SysLogHandler
from typing import Any

from monitor.settings import LogSettings

# User info runs to the LAST "@" of the authority: cameras' passwords often hold a raw "@"
# ("admin:p@ss@host"), and stopping at the first one would leak the rest. The authority ends
# at "/", "?", "#" or whitespace, so the match never reaches into a path, a query or the
# next URL on the line.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#]+@")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:user(?:name)?|pass(?:word|wd)?|pwd|token|access_token|auth|key|api_?key|secret|sig(?:nature)?)=)[^&;\s\"']+"
)


def redact(text: str) -> str:
    """Remove credentials from ``text``: URL user info and secret query parameters.

    >>> redact("rtsp://admin:hunter2@10.0.0.5/stream?token=abc&ch=1")
    'rtsp://***@10.0.0.5/stream?token=***&ch=1'
    >>> redact("rtsp://admin:p@ss@10.0.0.5/stream")
    'rtsp://***@10.0.0.5/stream'
    """
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


class _RedactingFormatter(logging.Formatter):
    """key=value text; under journald every line starts with its ``<priority>`` (sd-daemon(3)).

    journald stores each line of a record (a traceback, say) as its own entry, so each
    gets the record's priority: ``journalctl -p err`` then shows whole tracebacks.
    """

    def __init__(self, fmt: str, journald: bool) -> None:
        super().__init__(fmt)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        camera = getattr(record, "camera", None)
        record.camera_kv = f" camera={camera}" if camera else ""
        text = redact(super().format(record))
        if not self._journald:
            return text
        # The logging module's own level -> syslog priority table (4 warning, 3 error ...).
        priority = SysLogHandler.priority_names[SysLogHandler.priority_map.get(record.levelname, "warning")]
        prefix = f"<{priority}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        camera = getattr(record, "camera", None)
        if camera:
            entry["camera"] = camera
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


#: Name of the handler ``configure_logging`` installs (it replaces any earlier one).
HANDLER_NAME = "monitor-stderr"
#: uvicorn's loggers: their records go through our handler like everyone's (``api.HttpServer``
#: gives uvicorn no log configuration of its own).
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
#: Seconds without an accept error that end a burst of them (asyncio retries every second).
ACCEPT_BURST_QUIET = 10.0


class AcceptErrorFilter(logging.Filter):
    """One line for a burst of asyncio's ``socket.accept() out of system resource``.

    When the process is out of file descriptors, asyncio's accept loop logs that
    error, with a traceback, on each of up to ``backlog`` (2048 in uvicorn) tries
    per event-loop tick, and again every second: megabytes a minute. The first
    record of a burst goes through, shortened to one line that says how many of
    the last burst were left out; the rest are dropped until none came for
    ``quiet`` seconds.
    """

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, quiet: float = ACCEPT_BURST_QUIET) -> None:
        super().__init__()
        self.quiet = quiet
        self._last = -quiet
        self._dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.MESSAGE):
            return True
        now = time.monotonic()
        with self._lock:
            in_burst = now - self._last < self.quiet
            self._last = now
            if in_burst:
                self._dropped += 1
                return False
            dropped, self._dropped = self._dropped, 0
        reason = record.exc_info[1] if record.exc_info else None
        record.msg = (
            "%s (%s): new connections wait; more such lines are left out until none came "
            "for %g s (%d were left out in the burst before)"
        )
        record.args = (self.MESSAGE, reason, self.quiet, dropped)
        record.exc_info = record.exc_text = None
        return True


def configure_logging(settings: LogSettings, journald: bool = False) -> None:
    """Send the package's logs to stderr.

    Args:
        settings: Level and format.
        journald: True under systemd (``$JOURNAL_STREAM`` set): journald stamps
            each line itself, so the text format leaves the time out and starts
            each line with its syslog priority instead (``journalctl -p warning``).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    if settings.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        stamp = "" if journald else "%(asctime)s "
        handler.setFormatter(
            _RedactingFormatter(f"{stamp}%(levelname)s %(name)s%(camera_kv)s: %(message)s", journald)
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("monitor").setLevel(settings.level)
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        for old in list(uvicorn_logger.handlers):
            uvicorn_logger.removeHandler(old)
        uvicorn_logger.propagate = True
    asyncio_logger = logging.getLogger("asyncio")
    for old_filter in [f for f in asyncio_logger.filters if isinstance(f, AcceptErrorFilter)]:
        asyncio_logger.removeFilter(old_filter)
    asyncio_logger.addFilter(AcceptErrorFilter())
