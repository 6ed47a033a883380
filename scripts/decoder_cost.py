"""Measure one camera decoder process: CPU and memory at a given resolution.

Makes an H.264 clip of the sample footage scaled to WIDTHxHEIGHT at FPS with
ffmpeg, plays it through a real ``monitor.sources.Source`` (the decoder child
converts every frame: detect fps = clip fps) for SECONDS and reads the child's
CPU time and peak RSS from /proc. Usage:

    .venv/bin/python scripts/decoder_cost.py 1920 1080 [--fps 15] [--seconds 20]
"""

from __future__ import annotations

import argparse
import multiprocessing.connection as mpc
import os
import subprocess
import tempfile
import time
from pathlib import Path

from monitor.metrics import Metrics
from monitor.settings import CameraSettings
from monitor.sources import Source

SOURCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "vtest.mp4"


def _proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and peak RSS bytes of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return ticks / os.sysconf("SC_CLK_TCK"), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("width", type=int)
    parser.add_argument("height", type=int)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-stream_loop",
                "2",
                "-i",
                str(SOURCE),
                "-vf",
                f"scale={args.width}:{args.height},fps={args.fps:g}",
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-g",
                str(int(args.fps * 2)),
                "-bf",
                "0",
                "-an",
                str(clip),
            ],
            check=True,
        )
        source = Source("bench", CameraSettings(url=str(clip)), args.fps, Metrics())
        with source:
            taken = 0
            start = time.monotonic()
            cpu0 = None
            while time.monotonic() - start < args.seconds:
                conn = source.connection
                mpc.wait([conn] if conn else [], 0.2)
                source.drain()
                source.check(time.monotonic())
                if source.take() is not None:
                    taken += 1
                    if cpu0 is None:
                        cpu0, t0 = _proc_stats(source._proc.pid)[0], time.monotonic()
            cpu1, peak = _proc_stats(source._proc.pid)
            wall = time.monotonic() - t0
        print(
            f"{args.width}x{args.height} @ {args.fps:g} fps: {taken / args.seconds:.1f} frames/s delivered, "
            f"decoder CPU {100 * (cpu1 - cpu0) / wall:.0f}% of one core, peak RSS {peak / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
