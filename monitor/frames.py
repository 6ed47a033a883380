"""The values a camera hands to the rest of the daemon: frames and camera states.

Kept apart from ``sources.py`` (which starts the decoder processes) so that
the stages that only read these values (the scheduler, the alert rules, the
publisher, the HTTP API) do not import the process machinery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame on its way to the detector.

    Attributes:
        camera: Camera name.
        seq: Frame number within the current decoder run.
        capture_time: Wall-clock seconds when the frame left the decoder.
        image: HxWx3 uint8 BGR, in frame pixels (after the camera's scaling).
    """

    camera: str
    seq: int
    capture_time: float
    image: np.ndarray


class CameraState(str, enum.Enum):
    """What a camera is doing now."""

    STARTING = "starting"
    ONLINE = "online"
    STALLED = "stalled"
    OFFLINE = "offline"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """A camera's state, as published on ``<prefix>/<camera>/status``."""

    camera: str
    state: CameraState
    since: float
    reason: str | None
    reconnects: int
