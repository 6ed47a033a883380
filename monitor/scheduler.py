"""The scheduler: which frames and uploaded pictures go into the next forward pass.

Decoders already deliver frames at each camera's detect fps, and keep only
the newest, so the scheduler takes every camera that has an unseen frame.
When more are ready than ``max_batch`` (overload), the cameras served least
recently go first: round robin, which gives every camera an equal share of
the detector up to what it asks for (max-min fairness). Oldest frame first
would not do: a fast camera's frame is always fresh (newer ones replace it),
so under overload it would lose every time to a slow camera.
A frame older than ``detect.max_age_ms`` when its turn comes is dropped and
counted rather than detected late.
Pictures uploaded to ``/predict`` wait in a bounded ``RequestQueue`` and ride
along in the same batches; while any waits, one place of each batch is kept
for them, so neither side can starve the other.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import supervision as sv

from monitor.frames import Frame


class FrameSource(Protocol):
    """What the scheduler needs of a camera: ``sources.Source``, or a stand-in in the bench and tests."""

    @property
    def name(self) -> str:
        """The camera's name."""
        ...

    def has_new_frame(self) -> bool:
        """True when a frame the detector has not taken is waiting."""
        ...

    def waiting_since(self) -> float:
        """Capture time (wall clock) of the waiting frame; ``inf`` when none waits."""
        ...

    def take(self, not_before: float | None = None) -> Frame | None:
        """The waiting frame, or None (none waits, or it was older than ``not_before`` and dropped)."""
        ...


class Scheduler:
    """Builds batches of at most ``max_batch`` frames: round robin over the cameras with a new frame.

    The cameras served least recently go first; among those served equally
    long ago, the one whose frame waited longest.
    """

    def __init__(self, max_batch: int, max_age: float | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.max_age = max_age
        self._turn = 0
        self._served: dict[str, int] = {}  # camera -> the turn it was last served

    def pick(self, sources: Iterable[FrameSource], reserve: int = 0) -> list[Frame]:
        """Take the newest frame of each ready camera, least recently served first.

        Args:
            sources: The cameras.
            reserve: Places of the batch to leave free (for waiting uploads).
        """
        ready = sorted(
            (s for s in sources if s.has_new_frame()),
            key=lambda s: (self._served.get(s.name, -1), s.waiting_since()),
        )
        frames: list[Frame] = []
        limit = max(0, self.max_batch - reserve)
        not_before = time.time() - self.max_age if self.max_age is not None else None
        for source in ready:
            if len(frames) == limit:
                break
            frame = source.take(not_before)
            self._turn += 1
            self._served[source.name] = self._turn  # a stale frame dropped counts as a turn too
            if frame is not None:
                frames.append(frame)
        return frames


@dataclass(slots=True)
class Request:
    """A picture sent to ``/predict``, waiting for a place in a batch.

    Attributes:
        image: HxWx3 uint8 BGR.
        conf: Lowest confidence the caller wants back.
        result: Set by the daemon loop to the picture's detections (or an error).
    """

    image: np.ndarray
    conf: float
    result: Future[sv.Detections] = field(default_factory=Future)


class QueueFull(Exception):
    """Every place in the request queue is taken."""


class RequestQueue:
    """Pictures from HTTP threads to the daemon loop, bounded; wakes the loop on arrival.

    Args:
        maxsize: Most requests waiting; ``submit`` raises ``QueueFull`` beyond.
    """

    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue[Request] = queue.Queue(maxsize)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    @property
    def waker(self) -> socket.socket:
        """Readable when a request arrived (for ``multiprocessing.connection.wait``)."""
        return self._wake_reader

    def submit(self, image: np.ndarray, conf: float) -> Future[sv.Detections]:
        """Queue a picture; its detections arrive on the returned future.

        Raises:
            QueueFull: ``maxsize`` requests are already waiting.
        """
        request = Request(image, conf)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} pictures are already waiting") from None
        with contextlib.suppress(BlockingIOError):  # a full buffer already means "wake up"
            self._wake_writer.send(b"\0")
        return request.result

    def take(self, limit: int) -> list[Request]:
        """Up to ``limit`` waiting requests, oldest first."""
        with contextlib.suppress(BlockingIOError):
            self._wake_reader.recv(4096)
        taken: list[Request] = []
        while len(taken) < limit:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return taken

    def pending(self) -> bool:
        """True when a request waits."""
        return not self._queue.empty()

    def close(self, reason: str) -> None:
        """Fail every waiting request and release the wake sockets."""
        for request in self.take(self._queue.maxsize):
            request.result.set_exception(RuntimeError(reason))
        self._wake_reader.close()
        self._wake_writer.close()
