#!/usr/bin/python3
"""Serve H.264 MP4 files as RTSP cameras with GStreamer's rtsp-server.

Used by the test suite and by ``scripts/demo`` to stand in for field cameras.
It runs under Debian's system Python, which has PyGObject and the
``GstRtspServer`` typelib (packages ``python3-gi`` and
``gir1.2-gst-rtsp-server-1.0``); the project's virtual environment does not
need them.

Each ``--mount /name=FILE`` becomes ``rtsp://HOST:PORT/name``. Every client
gets its own session that plays the file from the start in real time (the
RTSP sink syncs on the pipeline clock) and ends with the file: a camera that
"reboots" at the end of the clip, which the daemon must ride over.

Prints ``READY <port>`` on stdout once it listens, so callers wait for that
line instead of sleeping. With ``--clients FILE`` it appends a line per RTSP
client connecting and closing (``connected N T`` / ``closed N T``: N clients
connected now, T the Unix time), so a test can check how many sessions a camera really takes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def _mount(spec: str) -> tuple[str, str]:
    path, sep, location = spec.partition("=")
    if not sep or not path.startswith("/") or not location:
        raise argparse.ArgumentTypeError(f"expected /name=FILE, got {spec!r}")
    return path, location


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--mount", type=_mount, action="append", required=True)
    parser.add_argument("--user", help="require this user (basic auth)")
    parser.add_argument("--password", help="password for --user")
    parser.add_argument("--clients", help="append a line per client connecting and closing to this file")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    for path, location in args.mount:
        factory = GstRtspServer.RTSPMediaFactory()
        escaped = location.replace("\\", "\\\\").replace('"', '\\"')
        factory.set_launch(
            f'( filesrc location="{escaped}" ! qtdemux ! h264parse '
            "! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
        factory.set_shared(False)
        if args.user:
            permissions = GstRtspServer.RTSPPermissions()
            permissions.add_permission_for_role("user", "media.factory.access", True)
            permissions.add_permission_for_role("user", "media.factory.construct", True)
            factory.set_permissions(permissions)
        mounts.add_factory(path, factory)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "user")
        basic = GstRtspServer.RTSPAuth.make_basic(args.user, args.password or "")
        auth.add_basic(basic, token)
        server.set_auth(auth)

    if args.clients:
        log = open(args.clients, "a", buffering=1)  # noqa: SIM115 (open while the server runs)
        live = [0]

        def closed(client: GstRtspServer.RTSPClient) -> None:
            live[0] -= 1
            log.write(f"closed {live[0]} {time.time():.3f}\n")

        def connected(server: GstRtspServer.RTSPServer, client: GstRtspServer.RTSPClient) -> None:
            live[0] += 1
            log.write(f"connected {live[0]} {time.time():.3f}\n")
            client.connect("closed", closed)

        server.connect("client-connected", connected)

    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
