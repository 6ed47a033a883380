"""Credentials never reach a log line."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys

import pytest
from fastapi import FastAPI

from monitor.http_server import HttpServer
from monitor.logs import AcceptErrorFilter, configure_logging, redact
from monitor.settings import HttpSettings, LogSettings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/s1", "rtsp://***@10.0.0.5:554/s1"),
        ("open rtsp://user@cam/x failed", "open rtsp://***@cam/x failed"),
        (
            "http://cam/snap.jpg?user=admin&password=hunter2&ch=1",
            "http://cam/snap.jpg?user=***&password=***&ch=1",
        ),
        ("https://cam/live?token=abc.def", "https://cam/live?token=***"),
        ("rtsp://10.0.0.5/stream1", "rtsp://10.0.0.5/stream1"),
        # A raw "@" in the password: everything up to the last "@" of the authority goes.
        ("rtsp://admin:p@ss@10.0.0.5/x", "rtsp://***@10.0.0.5/x"),
        ("rtsp://admin:p@ss@cam", "rtsp://***@cam"),
        ("rtsp://admin:a:b%40c@cam:554/x", "rtsp://***@cam:554/x"),
        ("rtsp://u:x@@y@cam/live?ch=1#top", "rtsp://***@cam/live?ch=1#top"),
        # Two URLs on one line: each loses its own user info, the text between survives.
        (
            "rtsp://a:p@1@cam1/s and rtsp://b:p@2@cam2/s",
            "rtsp://***@cam1/s and rtsp://***@cam2/s",
        ),
        ("from rtsp://a:pw@cam1 to rtsp://cam2/s", "from rtsp://***@cam1 to rtsp://cam2/s"),
        # An "@" after the authority (path, query, fragment) is not user info.
        ("rtsp://cam/user@home/s", "rtsp://cam/user@home/s"),
        ("http://cam/snap?to=ops@example.org", "http://cam/snap?to=ops@example.org"),
        ("rtsp://cam:554/live mail ops@example.org", "rtsp://cam:554/live mail ops@example.org"),
        ("no url here", "no url here"),
    ],
)
def test_redact_removes_credentials(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_lines_are_redacted_in_both_formats(fmt, capsys):
    configure_logging(LogSettings(format=fmt))
    log = logging.getLogger("monitor.test")
    log.warning("cannot open %s", "rtsp://admin:hunter2@cam/1", extra={"camera": "gate"})
    try:
        raise OSError("rtsp://admin:hunter2@cam/1 refused")
    except OSError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert "hunter2" not in err
    assert "gate" in err
    assert "rtsp://***@cam/1" in err


def test_under_journald_lines_carry_their_priority_and_no_timestamp(capsys):
    configure_logging(LogSettings(), journald=True)
    log = logging.getLogger("monitor.test")
    log.info("camera online", extra={"camera": "gate"})
    log.warning("reconnecting")
    try:
        raise OSError("rtsp://admin:hunter2@cam/1 refused")
    except OSError:
        log.exception("decoder failed")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "<6>INFO monitor.test camera=gate: camera online"
    assert lines[1] == "<4>WARNING monitor.test: reconnecting"
    assert lines[2] == "<3>ERROR monitor.test: decoder failed"
    # The traceback's lines keep the record's priority, so `journalctl -p err` shows all of it.
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines[2:])
    assert "hunter2" not in "\n".join(lines)


def test_on_a_terminal_lines_start_with_the_time():
    configure_logging(LogSettings())
    handler = next(h for h in logging.getLogger().handlers if h.get_name() == "monitor-stderr")
    record = logging.LogRecord("monitor.x", logging.WARNING, __file__, 1, "slow", None, None)
    line = handler.format(record)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING monitor.x: slow$", line), line


def test_uvicorn_lines_come_out_as_json_through_our_handler(capsys):
    configure_logging(LogSettings(format="json"))
    settings = HttpSettings(port=0)
    with (
        HttpServer(settings, FastAPI()) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn logs "Invalid HTTP request received."
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]  # every line, uvicorn's too, is one JSON object
    assert {"level": "WARNING", "logger": "uvicorn.error", "message": "Invalid HTTP request received."} in [
        {k: e[k] for k in ("level", "logger", "message")} for e in entries
    ]


def _accept_error() -> logging.LogRecord:
    """The record asyncio's accept loop logs when the process is out of descriptors."""
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        exc_info = sys.exc_info()
    message = "socket.accept() out of system resource\nsocket: <asyncio.TransportSocket fd=6>"
    return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, exc_info)


def test_accept_errors_out_of_descriptors_give_one_line_per_burst():
    accept_filter = AcceptErrorFilter(quiet=10.0)
    first = _accept_error()
    assert accept_filter.filter(first)
    assert first.exc_info is None  # one line, no traceback
    assert first.getMessage().startswith("socket.accept() out of system resource ([Errno 24] Too many")
    assert "\n" not in first.getMessage()
    assert not any(accept_filter.filter(_accept_error()) for _ in range(5000))
    other = logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", None, None
    )
    assert accept_filter.filter(other)  # asyncio's other messages pass untouched
    assert other.getMessage() == "Task exception was never retrieved"


def test_a_new_burst_of_accept_errors_logs_again_with_the_count_left_out(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("monitor.logs.time.monotonic", lambda: now[0])
    accept_filter = AcceptErrorFilter(quiet=10.0)
    assert accept_filter.filter(_accept_error())
    for _ in range(30):  # a retry every second for 30 s: still one burst
        now[0] += 1.0
        assert not accept_filter.filter(_accept_error())
    now[0] += 10.0  # quiet long enough: the next error starts a new burst
    again = _accept_error()
    assert accept_filter.filter(again)
    assert "(30 were left out in the burst before)" in again.getMessage()


def test_configure_logging_installs_the_accept_filter_once():
    configure_logging(LogSettings())
    configure_logging(LogSettings(format="json"))
    filters = [f for f in logging.getLogger("asyncio").filters if isinstance(f, AcceptErrorFilter)]
    assert len(filters) == 1
