"""A stand-in decoder child for ``monitor bench``: pre-made frames on a clock, through the real hand-off.

It speaks the decoder child's protocol (``decoder.py``): it writes each frame
into the camera's shared-memory slots and sends ``FrameReady`` on the pipe,
so ``Source``, the slots, the newest-frame rule and the scheduler run
exactly as they do for cameras, but nothing is decoded. The bench then
measures the daemon's main process at a given resolution and frame rate, on
machines where decoding that many streams would need more cores than the
detector.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from monitor.decoder import Failed, Opened, Opening
from monitor.slots import Handoff, Slots

#: Distinct random frames a stand-in child cycles through.
POOL = 4


@dataclass(frozen=True, slots=True)
class SyntheticFeed:
    """What a stand-in child delivers.

    Attributes:
        width: Frame width (pixels).
        height: Frame height (pixels).
        phase: Seconds after the child's start of its first frame (spreads the streams' arrivals).
        seed: Seed of the random frames (``synthetic_frames``).
        count: Distinct frames it cycles through.
        keep_slots: Each slot keeps one pre-made frame (frame ``slot % count``), so after the
            first round nothing is written, whatever the parent holds: the bench's stand-ins
            then cost next to nothing. Off, frame ``seq % count`` is written whenever its slot
            holds another, as a decoder writes every frame (the hand-off tests).
    """

    width: int
    height: int
    phase: float = 0.0
    seed: int = 0
    count: int = POOL
    keep_slots: bool = False


def synthetic_frames(width: int, height: int, count: int = POOL, seed: int = 0) -> list[np.ndarray]:
    """``count`` random HxWx3 uint8 frames: what a stand-in child with this seed delivers, in turn."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def synthetic_main(feed: SyntheticFeed, fps: float, handoff: Handoff, conn: mpc.Connection) -> None:
    """Entry point of a stand-in child: a frame every ``1 / fps`` s into the slots, until killed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    shm = SharedMemory(name=handoff.shm_name)
    try:
        if feed.width * feed.height * 3 > handoff.frame_bytes:
            conn.send(Failed(f"a {feed.width}x{feed.height} frame does not fit the camera's slots"))
            code = 2
        else:
            _feed_loop(feed, fps, Slots(shm, handoff, conn), conn)
            code = 0
    except (BrokenPipeError, EOFError, OSError):
        code = 0  # the parent closed the pipe: it is stopping us
    finally:
        shm.close()
    os._exit(code)


def _feed_loop(feed: SyntheticFeed, fps: float, slots: Slots, conn: mpc.Connection) -> None:
    frames = synthetic_frames(feed.width, feed.height, feed.count, feed.seed)
    conn.send(Opening())
    conn.send(Opened(feed.width, feed.height, fps))
    period = 1.0 / fps
    next_due = time.monotonic() + feed.phase
    while True:
        delay = next_due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        # What a decoder child does with each due frame once decoded (the slot, the letterbox),
        # except that a slot already holding this pre-made frame is not written again. Chosen by
        # sequence number, a frame lands in a slot holding another each time the parent's hold
        # shifts the slots' rotation, and is written then; chosen by slot, never after the first round.
        index = (slots.free_slot() if feed.keep_slots else slots.seq) % len(frames)
        slots.publish(frames[index], key=index)
        # A child that fell behind (a busy machine) delivers at once, then keeps the clock.
        next_due = max(next_due + period, time.monotonic())
