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

import gc
import math
import select
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from monitor.frames import Frame
from monitor.metrics import Metrics
from monitor.scheduler import Request, RequestQueue, Scheduler
from monitor.sources import Source, pipe_changes

#: Longest the loop sleeps without a frame (watchdogs and stop checks run this often).
LOOP_TICK = 0.2


@contextmanager
def settled_heap() -> Iterator[None]:
    """Startup's objects out of the garbage collector's sight while the loop runs (``gc.freeze``).

    A full collection walks every object the process holds: with torch, ultralytics
    and the model loaded, about 280,000, which takes 0.2 s of the main process's CPU
    on the dev box, a stop during which no camera's frame is read. Collected once and
    then frozen, the startup objects are not walked again; what the loop makes is
    collected as usual. They are given back to the collector when the loop ends.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Waiter:
    """``multiprocessing.connection.wait`` without its cost per call: one ``poll`` object, kept.

    ``mpc.wait`` builds a selector and registers every pipe at each call: with 64
    cameras that is most of a turn's cost. Here the pipes are registered again only
    when the caller hands a new list (a camera restarted, added or removed): the
    same list object, the same pipes.
    """

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, Any] = {}
        self._objects: Sequence[Any] | None = None

    def wait(self, objects: Sequence[Any], timeout: float) -> list[Any]:
        """The ``objects`` (pipes, sockets) readable within ``timeout`` seconds (or closed)."""
        if objects is not self._objects:
            self._objects = objects
            by_fd = {o.fileno(): o for o in objects}
            for fd in self._by_fd.keys() - by_fd.keys():
                self._poll.unregister(fd)
            for fd in by_fd.keys() - self._by_fd.keys():
                self._poll.register(fd, select.POLLIN)
            self._by_fd = by_fd  # the same number may be a new pipe now: poll goes by number
        by_fd = self._by_fd
        milliseconds = math.ceil(timeout * 1000) if timeout > 0 else 0
        return [by_fd[fd] for fd, _ in self._poll.poll(milliseconds)]


class Loop:
    """The daemon's loop body, one ``turn`` at a time.

    A turn's own cost does not grow with the cameras: the pipes to wait on are
    gathered again only when one opened or closed (``sources.pipe_changes``), and
    only the cameras that sent a frame are looked at for the batch.

    Args:
        sources: The cameras, by name (the caller may change it: a camera added or
            removed starts or stops its decoder, which the loop sees).
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
        self._pipes_seen: tuple[int, int] | None = None
        self._by_connection: dict[Any, Source] = {}
        self._pipes: list[Any] = []  # the cameras' pipes (``_fill`` waits on these)
        self._waitables: list[Any] = []  # and the upload queue's waker (``turn``)
        # The cameras with a frame not taken yet, in the order they sent it (a set that keeps order).
        self._ready: dict[Source, None] = {}

    def _connections(self) -> dict[Any, Source]:
        """Each running camera's pipe; gathered again only when a pipe opened or closed."""
        seen = (pipe_changes(), len(self.sources))
        if seen != self._pipes_seen:
            self._pipes_seen = seen
            self._by_connection = {s.connection: s for s in self.sources.values() if s.connection is not None}
            self._pipes = list(self._by_connection)
            wake = [self._requests.waker] if self._requests is not None else []
            self._waitables = [*self._pipes, *wake]
            running = set(self._by_connection.values())
            self._ready = {s: None for s in self._ready if s in running}
        return self._by_connection

    def _read(self, ready: Sequence[Any], by_connection: Mapping[Any, Source]) -> None:
        """Drain the cameras whose pipes are readable; note those with a new frame."""
        for connection in ready:
            source = by_connection.get(connection)  # not the upload queue's waker
            if source is not None:
                source.drain(readable=True)
                if source.has_new_frame():
                    self._ready[source] = None

    def _pick(self, reserve: int) -> list[Frame]:
        """The scheduler's batch from the cameras with a new frame; the others stay noted."""
        candidates = [s for s in self._ready if s.has_new_frame()]
        frames = self.scheduler.pick(candidates, reserve=reserve) if candidates else []
        self._ready = {s: None for s in candidates if s.has_new_frame()}
        return frames

    def turn(self) -> None:
        """Wait (at most ``LOOP_TICK``) for frames or uploads, then run what is ready."""
        requests = self._requests
        by_connection = self._connections()
        pending = requests is not None and requests.pending()
        # Frames or uploads left over from a full batch go next, without waiting.
        behind = pending or any(s.has_new_frame() for s in self._ready)
        self._read(self._waiter.wait(self._waitables, timeout=0 if behind else LOOP_TICK), by_connection)
        now = time.monotonic()
        # Watchdogs, expiring tracks and systemd pings need not run at every frame's
        # wake-up (thousands a second with many cameras): LOOP_TICK is their pace.
        chores = now - self._last_chores >= LOOP_TICK
        if chores:
            self._last_chores = now
            for source in self.sources.values():
                source.check(now)
        frames = self._pick(reserve=1 if pending else 0)
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
            by_connection = self._connections()
            self._read(self._fill_waiter.wait(self._pipes, timeout=left), by_connection)
            more += self._pick(reserve=len(frames) + len(more))
        return more
