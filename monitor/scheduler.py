"""The scheduler: which cameras' frames go into the next forward pass.

Decoders already deliver frames at each camera's detect fps, and keep only
the newest, so the scheduler takes every camera that has an unseen frame,
oldest first (no camera starves when more are ready than ``max_batch``).
"""

from __future__ import annotations

from collections.abc import Iterable

from monitor.sources import Frame, Source


class Scheduler:
    """Builds batches of at most ``max_batch`` frames, oldest capture first."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch

    def pick(self, sources: Iterable[Source]) -> list[Frame]:
        """Take the newest frame of each ready camera, oldest waiting first."""
        ready = sorted((s for s in sources if s.has_new_frame()), key=Source.waiting_since)
        frames: list[Frame] = []
        for source in ready:
            if len(frames) == self.max_batch:
                break
            frame = source.take()
            if frame is not None:
                frames.append(frame)
        return frames
