"""``monitor bench``: the daemon's pipeline under a fixed load, measured, and a naive baseline.

The load is N streams at a fixed rate each, for ``duration`` seconds after a
warm-up:

* file streams: a clip played in real time and looped by the real ``Source``
  decoder children (one process each, shared memory, newest frame wins), so
  the numbers include decoding and the copy out of shared memory;
* ``synthetic`` streams: stand-in decoder children (``monitor.synthetic``)
  write pre-made random frames into the same shared-memory slots on a fixed
  clock, decoding nothing: the hand-off, the scheduler, the detector and the
  loop exactly as for cameras, without decoding's cost (on a GPU box with
  few cores, or for the main process's cost per frame).

Modules: ``options`` (what to measure), ``load`` (the streams, the clip's
frames, random weights), ``loop`` (the loop body and what it records),
``machine`` (CPU, memory, GPU, CPU time per process), ``naive`` (the
baselines), ``report`` (typed results, JSON and text), ``run`` (all of it).

Frames then go through the daemon's own stages: ``Scheduler.pick`` (round
robin over the cameras with a new frame, at most ``detect.max_batch``), one ``Detector.detect`` per batch, and
``CameraPipeline.process`` per frame (ByteTrack and the alert rules). Events
are counted, not published: there is no broker, spool or HTTP server here.

``compare_naive`` then runs, on the same frames (decoded once in-process,
scaled like the streams), Ultralytics' own loop: ``YOLO.predict`` per frame,
``YOLO.predict`` on lists of ``max_batch`` frames, and ``Detector.detect`` on
the same lists. Those are detector-only rates; the pipeline's rate is end to
end and is bounded by the offered rate unless frames were dropped.

A model given as an architecture (``yolov8s.yaml``) gets random weights, saved
once to a temporary ``.pt`` that both the detector and Ultralytics load: the
compute per frame is that of the real model, but few boxes survive NMS, so
tracking and alerts cost less than on trained weights.
"""

from monitor.bench.loop import STAGES
from monitor.bench.naive import compare_naive
from monitor.bench.options import BenchOptions
from monitor.bench.report import BenchReport
from monitor.bench.run import run_bench

__all__ = [
    "STAGES",
    "BenchOptions",
    "BenchReport",
    "compare_naive",
    "run_bench",
]
