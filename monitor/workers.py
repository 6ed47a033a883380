"""Tracking workers: each camera's masks, size filters, ByteTrack and zones in a process of its own.

ByteTrack is the largest per-frame cost after the detector, and it needs
only the detections: so with ``detect.workers: N`` it runs in N worker
processes, each camera always on the same one (``cameras % N`` in the order
they are first seen), while the main process keeps the alert rules, the
classifier, snapshots and publishing. A step sends each worker its cameras'
detections of the batch in one message and reads the results back in the
same order, so a camera's frames are tracked, then judged, in frame order.

A worker that dies (or does not answer within ``ANSWER_TIMEOUT``) is
killed and started again. Its cameras' trackers are lost with it: the step
ends their open tracks (their ``end`` events go out) before the new worker
tracks them from scratch, with track ids of a new range so that no id
comes back.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import select
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import supervision as sv

from monitor.camera import CameraPipeline
from monitor.detections import trusted
from monitor.pipe_reader import PipeReader

logger = logging.getLogger(__name__)

#: Seconds a worker may take to answer one batch before it is taken for hung.
ANSWER_TIMEOUT = 10.0
#: Seconds a new worker may take to start (its imports) on a busy machine.
START_TIMEOUT = 60.0
#: Each restart of a worker starts its cameras' track ids this much higher.
ID_RANGE = 1 << 32

_CTX = mp.get_context("forkserver")

#: A frame's detections on the wire: xyxy, confidence, class_id, class names.
Packed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def pack(detections: sv.Detections) -> Packed:
    """The arrays of ``detections`` the worker needs (cheaper to pickle than the object)."""
    confidence = detections.confidence if detections.confidence is not None else np.ones(len(detections))
    class_id = detections.class_id if detections.class_id is not None else np.zeros(len(detections), int)
    names = detections.data.get("class_name")  # absent where the tracker returned nothing
    names = np.asarray(names if names is not None else [""] * len(detections), dtype=object)
    return detections.xyxy, confidence, class_id, names


def unpack(packed: Packed, tracker_id: np.ndarray | None = None) -> sv.Detections:
    xyxy, confidence, class_id, names = packed
    return trusted(xyxy, confidence, class_id, names, tracker_id)


class Job(NamedTuple):
    """One frame for a worker: its camera, detections, capture time and size."""

    camera: str
    detections: Packed
    capture_time: float
    height: int
    width: int


class Located(NamedTuple):
    """A worker's answer for one frame: the tracked detections, their zones, the seconds it took."""

    detections: Packed
    tracker_id: np.ndarray
    zones: list[list[str]]
    seconds: float


#: Columns of the detections on the wire: x1, y1, x2, y2, confidence, class id, tracker id.
_COLUMNS = 7


def _concat(frames: Sequence[Packed], ids: Sequence[np.ndarray] = ()) -> tuple[list[int], bytes, list[str]]:
    """Many frames' detections as one table of bytes, a count per frame, and the names: one message.

    Pickling costs per array (about 5 microseconds each under load) and bytes next to
    nothing, so a batch's boxes, confidences, class ids and tracker ids go as one float64
    table (exact for float32 boxes and integer ids below 2**53), and the names as a list.
    """
    counts = [len(f[0]) for f in frames]
    table = np.empty((sum(counts), _COLUMNS), np.float64)
    if len(table):
        table[:, :4] = np.concatenate([f[0] for f in frames])
        table[:, 4] = np.concatenate([f[1] for f in frames])
        table[:, 5] = np.concatenate([f[2] for f in frames])
        table[:, 6] = np.concatenate(list(ids)) if ids else -1
    names = [str(n) for f in frames for n in f[3]]
    return counts, table.tobytes(), names


def _split(counts: list[int], table: bytes, names: list[str]) -> list[tuple[Packed, np.ndarray]]:
    """``_concat`` undone: each frame's arrays and tracker ids (-1 where none were sent)."""
    rows = np.frombuffer(table, np.float64).reshape(-1, _COLUMNS)
    xyxy = rows[:, :4].astype(np.float32)
    confidence = rows[:, 4].astype(np.float32)
    class_id = rows[:, 5].astype(np.int64)
    tracker_id = rows[:, 6].astype(np.int64)
    name_array = np.array(names, dtype=object)
    out = []
    start = 0
    for count in counts:
        end = start + count
        packed = (xyxy[start:end], confidence[start:end], class_id[start:end], name_array[start:end])
        out.append((packed, tracker_id[start:end]))
        start = end
    return out


def _to_wire(jobs: Sequence[Job]) -> tuple[Any, ...]:
    """A batch of jobs as one message for a worker."""
    heads = [(j.camera, j.capture_time, j.height, j.width) for j in jobs]
    return ("jobs", heads, *_concat([j.detections for j in jobs]))


def _answers_to_wire(answers: Sequence[Located]) -> tuple[Any, ...]:
    zones = [a.zones for a in answers]
    seconds = [a.seconds for a in answers]
    return (zones, seconds, *_concat([a.detections for a in answers], [a.tracker_id for a in answers]))


def _answers_from_wire(message: tuple[Any, ...]) -> list[Located]:
    zones, seconds, *arrays = message
    return [
        Located(packed, ids, z, s)
        for (packed, ids), z, s in zip(_split(*arrays), zones, seconds, strict=True)
    ]


def worker_main(conn: mpc.Connection, index: int = 0) -> None:
    """Entry point of a tracking worker: ``("add", spec)`` builds a camera; a list of ``Job`` is answered."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _name_process(f"monitor-track{index}")
    cameras: dict[str, CameraPipeline] = {}
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message[0] == "add":
            spec = message[1]
            cameras[spec[0]] = CameraPipeline(*spec)
            continue
        _, heads, *arrays = message
        answers = []
        for (camera, capture_time, height, width), (packed, _) in zip(heads, _split(*arrays), strict=True):
            started = time.perf_counter()
            tracked, zones = cameras[camera].locate(unpack(packed), capture_time, height, width)
            ids = tracked.tracker_id if tracked.tracker_id is not None else np.full(len(tracked), -1)
            answers.append(Located(pack(tracked), ids, zones, time.perf_counter() - started))
        conn.send(_answers_to_wire(answers))
    os._exit(0)


class _Worker:
    """One worker process and the cameras it tracks."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.generation = -1
        self.cameras: dict[str, CameraPipeline] = {}  # name -> the main side's pipeline it copies
        self.proc: Any = None
        self.conn: mpc.Connection | None = None
        self._poll: select.poll | None = None  # on ``conn``: ``Connection.poll`` builds a selector a call
        self._reader: PipeReader | None = None  # the answers, one read each (``Connection.recv``: two)
        self._answers: list[Any] = []

    def start(self) -> None:
        parent, child = _CTX.Pipe()
        self.proc = _CTX.Process(
            target=worker_main, args=(child, self.index), name=f"monitor-track{self.index}"
        )
        self.proc.daemon = True
        self.proc.start()
        child.close()
        self.conn = parent
        self._poll = select.poll()
        self._poll.register(parent.fileno(), select.POLLIN)
        self.generation += 1
        try:  # its imports done, it answers at once from then on
            if not parent.poll(START_TIMEOUT) or parent.recv() != "ready":
                raise OSError("did not start")
            for pipeline in self.cameras.values():
                parent.send(("add", pipeline.spec))
            self._reader, self._answers = PipeReader(parent.fileno()), []
        except (EOFError, OSError) as exc:
            logger.error("tracking worker %d: %s", self.index, exc)  # the next batch restarts it

    def answer(self, timeout: float) -> Any:
        """The worker's next message, or None when none came within ``timeout`` seconds.

        Raises:
            EOFError: The worker's end closed (it died).
            OSError: Reading failed.
        """
        poll, reader = self._poll, self._reader
        if poll is None or reader is None:
            raise EOFError
        deadline = time.monotonic() + timeout
        while not self._answers:
            left = deadline - time.monotonic()
            if left <= 0 or not poll.poll(math.ceil(left * 1000)):
                return None
            self._answers += reader.read()[0]  # a large answer may come in several reads
        return self._answers.pop(0)

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
            self._poll = self._reader = None
        if self.proc is not None:
            self.proc.join(1.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.proc = None


class TrackingWorkers:
    """Worker processes that ``PipelineStep`` hands each frame's tracking to.

    Args:
        count: How many worker processes.
        restarts: Counts restarts (``monitor_tracker_restarts_total``), if given.
    """

    def __init__(self, count: int, restarts: Callable[[], None] | None = None) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self._workers = [_Worker(i) for i in range(count)]
        self._assigned: dict[str, _Worker] = {}
        self._restarts = restarts

    def __enter__(self) -> TrackingWorkers:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()

    def pids(self) -> list[int]:
        """The workers' process ids (for tests and the bench)."""
        return [w.proc.pid for w in self._workers if w.proc is not None]

    def _worker_for(self, name: str, pipeline: CameraPipeline) -> _Worker:
        worker = self._assigned.get(name)
        if worker is None:
            worker = self._assigned[name] = self._workers[len(self._assigned) % len(self._workers)]
        if worker.cameras.get(name) is not pipeline:  # new, or rebuilt by a reload
            worker.cameras[name] = pipeline
            self._send(worker, ("add", pipeline.spec))
        return worker

    def _send(self, worker: _Worker, message: object) -> bool:
        try:
            assert worker.conn is not None
            # Plain pickle: multiprocessing's own copies its table of reducers at every call.
            worker.conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        except (OSError, AssertionError):
            return False
        return True

    def locate(
        self, jobs: Sequence[tuple[CameraPipeline, Job]], on_restart: Callable[[list[str]], None]
    ) -> list[tuple[sv.Detections, list[list[str]], float]]:
        """Track each job's frame on its camera's worker; the answers in the jobs' order.

        Args:
            jobs: Each frame's camera (the main side's pipeline) and what the worker needs.
            on_restart: Called with the cameras of a worker that failed, once it runs
                again and before their frames are tracked: the caller ends their tracks.
        """
        by_worker: dict[_Worker, list[int]] = {}
        for n, (pipeline, job) in enumerate(jobs):
            by_worker.setdefault(self._worker_for(job.camera, pipeline), []).append(n)
        answers: list[Any] = [None] * len(jobs)
        sent = {}
        for worker, numbers in by_worker.items():
            batch = sent[worker] = _to_wire([jobs[n][1] for n in numbers])
            if not self._send(worker, batch):
                self._restart(worker, "its pipe broke", on_restart)
                self._send(worker, batch)
        for worker, numbers in by_worker.items():
            located = self._receive(worker, on_restart)
            if located is None:  # it died with the batch: once more on the new one
                self._send(worker, sent[worker])
                located = self._receive(worker, on_restart) or []
            for n, answer in zip(numbers, located, strict=False):
                answers[n] = answer
        out: list[tuple[sv.Detections, list[list[str]], float]] = []
        for (_, job), answer in zip(jobs, answers, strict=True):
            if answer is None:  # a worker failed twice in a row: the frame counts as empty
                out.append((unpack(_empty()), [], 0.0))
                continue
            worker = self._assigned[job.camera]
            ids = answer.tracker_id + worker.generation * ID_RANGE
            out.append((unpack(answer.detections, ids), answer.zones, answer.seconds))
        return out

    def _receive(self, worker: _Worker, on_restart: Callable[[list[str]], None]) -> list[Located] | None:
        """The worker's answer, or None after restarting a worker that died or hung."""
        try:
            answer = worker.answer(ANSWER_TIMEOUT)
            if answer is not None:
                return _answers_from_wire(answer)
            reason = f"no answer in {ANSWER_TIMEOUT:g} s"
        except (EOFError, OSError):
            code = worker.proc.exitcode if worker.proc is not None else None
            reason = f"it exited (code {code})" if code is not None else "its pipe closed"
        self._restart(worker, reason, on_restart)
        return None

    def _restart(self, worker: _Worker, reason: str, on_restart: Callable[[list[str]], None]) -> None:
        logger.error(
            "tracking worker %d failed (%s); restarting it, the open tracks of its %d camera(s) end",
            worker.index,
            reason,
            len(worker.cameras),
        )
        worker.stop()
        worker.start()
        if self._restarts is not None:
            self._restarts()
        on_restart(sorted(worker.cameras))


def _name_process(name: str) -> None:
    """What ``ps`` and ``top`` show for this process (Linux, 15 bytes): an operator sees which it is."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _empty() -> Packed:
    return (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int), np.zeros(0, object))
