"""The pipeline loop, the same in the daemon and ``monitor bench``: wait, watch, pick, run a step.

One ``turn``: wait on the decoders' pipes (and the upload queue's waker), read
only the cameras that sent something, let every camera's watchdog act (at
``LOOP_TICK``, not per frame), take the newest frame of each ready camera
(round robin, ``Scheduler``), wait up to ``detect.max_wait_ms`` for more to
fill the batch, add waiting uploads, and hand them to ``process`` (the
caller's ``PipelineStep``). The daemon adds reloads and publishing around it;
the bench adds its measurements. So the bench's numbers describe this code.
"""

from __future__ import annotations

import math
import select
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monitor.frames import Frame
from monitor.metrics import Metrics
from monitor.scheduler import Request, RequestQueue, Scheduler
from monitor.sources import Source

#: Longest the loop sleeps without a frame (watchdogs and stop checks run this often).
LOOP_TICK = 0.2


class Waiter:
    """``multiprocessing.connection.wait`` without its cost per call: one ``poll`` object, kept.

    ``mpc.wait`` builds a selector and registers every pipe at each call: with 64
    cameras that is most of a turn's cost. Here the pipes are registered again only
    when the set changes (a camera restarted, added or removed).
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, Any] = {}

    def wait(self, objects: Sequence[Any], timeout: float) -> list[Any]:
        """The ``objects`` (pipes, sockets) readable within ``timeout`` seconds (or closed)."""
        by_fd = {o.fileno(): o for o in objects}
        if by_fd.keys() != self._by_fd.keys():
            for fd in self._by_fd.keys() - by_fd.keys():
                self._poll.unregister(fd)
            for fd in by_fd.keys() - self._by_fd.keys():
                self._poll.register(fd, select.POLLIN)
        self._by_fd = by_fd  # the same number may be a new pipe now: poll goes by number
        milliseconds = math.ceil(timeout * 1000) if timeout > 0 else 0
        return [by_fd[fd] for fd, _ in self._poll.poll(milliseconds)]


class Loop:
    """The daemon's loop body, one ``turn`` at a time.

    Args:
        sources: The cameras, by name (read at every turn: the caller may change it).
        scheduler: Picks the frames of each batch.
        max_wait: ``detect.max_wait_ms`` in seconds: how long a batch waits to fill.
        process: Runs one batch: the frames and the uploads riding along.
        chores: Called with ``time.monotonic()`` after the batch, every ``LOOP_TICK``
            (expiring quiet tracks, the systemd watchdog).
        metrics: ``monitor_loop_iterations_total``.
        requests: Uploaded pictures waiting for a batch (none in the bench).
        upload_share: The most uploads in one batch.
    """

    def __init__(
        self,
        sources: Mapping[str, Source],
        scheduler: Scheduler,
        max_wait: float,
        process: Callable[[list[Frame], list[Request]], None],
        chores: Callable[[float], None],
        metrics: Metrics,
        requests: RequestQueue | None = None,
        upload_share: int = 0,
    ) -> None:
        self.sources = sources
        self.scheduler = scheduler
        self.max_wait = max_wait
        self._process = process
        self._chores = chores
        self._metrics = metrics
        self._requests = requests
        self._upload_share = upload_share
        self._last_chores = 0.0
        self._waiter = Waiter()
        self._fill_waiter = Waiter()

    def turn(self) -> None:
        """Wait (at most ``LOOP_TICK``) for frames or uploads, then run what is ready."""
        requests = self._requests
        sources = self.sources.values()
        by_connection = {s.connection: s for s in sources if s.connection is not None}
        waitables: list[Any] = list(by_connection)
        pending = requests is not None and requests.pending()
        # Frames or uploads left over from a full batch go next, without waiting.
        behind = pending or any(s.has_new_frame() for s in sources)
        wake = [requests.waker] if requests is not None else []
        for ready in self._waiter.wait([*waitables, *wake], timeout=0 if behind else LOOP_TICK):
            if ready in by_connection:  # only the cameras that sent something
                by_connection[ready].drain()
        now = time.monotonic()
        # Watchdogs, expiring tracks and systemd pings need not run at every frame's
        # wake-up (thousands a second with many cameras): LOOP_TICK is their pace.
        chores = now - self._last_chores >= LOOP_TICK
        if chores:
            self._last_chores = now
            for source in sources:
                source.check(now)
        frames = self.scheduler.pick(sources, reserve=1 if pending else 0)
        if frames and self.max_wait > 0:
            frames += self._fill(frames)
        uploads: list[Request] = []
        if requests is not None:
            uploads = requests.take(min(self._upload_share, self.scheduler.max_batch - len(frames)))
        if frames or uploads:
            self._process(frames, uploads)
        self._metrics.loop_iterations.inc()
        if chores:
            self._chores(now)

    def _fill(self, frames: list[Frame]) -> list[Frame]:
        """Wait up to ``max_wait`` after the oldest frame's capture for more cameras to fill the batch."""
        more: list[Frame] = []
        deadline = min(f.capture_time for f in frames) + self.max_wait
        while len(frames) + len(more) < self.scheduler.max_batch and (left := deadline - time.time()) > 0:
            # Afresh each time: a decoder that died meanwhile was restarted with a new pipe.
            by_connection: dict[Any, Source] = {
                s.connection: s for s in self.sources.values() if s.connection is not None
            }
            for ready in self._fill_waiter.wait(list(by_connection), timeout=left):
                by_connection[ready].drain()
            more += self.scheduler.pick(self.sources.values(), reserve=len(frames) + len(more))
        return more
