"""The values a camera hands to the rest of the daemon: frames and camera states.

Kept apart from ``sources.py`` (which starts the decoder processes) so that
the stages that only read these values (the scheduler, the alert rules, the
publisher, the HTTP API) do not import the process machinery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from monitor.letterbox import Letterboxed


class Lease:
    """A frame's pixels while they are still in its decoder's shared-memory slot.

    The decoder child writes no frame into a slot its parent holds (``Source``
    keeps one slot per camera held: its newest frame taken), so these views stay
    intact without a copy until ``release``. ``detach`` copies them out first
    when the slot is about to be given back while the frame is still in use.
    """

    __slots__ = ("_image", "_in_slot", "_kept", "_net")

    def __init__(self, image: np.ndarray, net: Letterboxed | None) -> None:
        self._image: np.ndarray | None = image
        self._net = net
        self._in_slot = True
        self._kept: np.ndarray | None = None

    def keep(self) -> np.ndarray:
        """A copy of the pixels of their own, made once however many tracks keep this frame."""
        if self._kept is None:
            self._kept = self.image.copy()
        return self._kept

    @property
    def image(self) -> np.ndarray:
        """The full-resolution pixels (a read-only view of the slot until detached)."""
        if self._image is None:
            raise RuntimeError("the frame's pixels were released after its pipeline step")
        return self._image

    @property
    def net(self) -> Letterboxed | None:
        """The letterboxed network input the decoder child made, if any."""
        return self._net

    @property
    def in_slot(self) -> bool:
        """True while the pixels are views of the slot (not yet detached or released)."""
        return self._in_slot

    def detach(self) -> None:
        """Copy the pixels out of the slot (the slot is about to be written again)."""
        if self._image is not None:
            self._image = self._image.copy()
        if self._net is not None:
            self._net = replace(self._net, image=self._net.image.copy())
        self._in_slot = False

    def release(self) -> None:
        """The frame's step is over: let go of the pixels (the slot may be written again)."""
        self._image = self._net = self._kept = None
        self._in_slot = False


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame on its way to the detector.

    Attributes:
        camera: Camera name.
        seq: Frame number within the current decoder run.
        capture_time: Wall-clock seconds when the frame left the decoder.
        pixels: HxWx3 uint8 BGR in frame pixels (after the camera's scaling): an array of its
            own, or, for a camera's frame, a ``Lease`` on its decoder's slot.
    """

    camera: str
    seq: int
    capture_time: float
    pixels: np.ndarray | Lease

    @property
    def image(self) -> np.ndarray:
        """The full-resolution pixels. A camera's frame reads them in place, until ``release``."""
        pixels = self.pixels
        return pixels if isinstance(pixels, np.ndarray) else pixels.image

    @property
    def net(self) -> Letterboxed | None:
        """The frame already letterboxed into the network input by its decoder child, if it was."""
        return None if isinstance(self.pixels, np.ndarray) else self.pixels.net

    def keep_image(self) -> np.ndarray:
        """The full-resolution pixels in memory of their own, for use after the frame's step (snapshots)."""
        pixels = self.pixels
        return pixels if isinstance(pixels, np.ndarray) else pixels.keep()

    def release(self) -> None:
        """End of the frame's step: its decoder may write into its slot again (``image`` then raises)."""
        if isinstance(self.pixels, Lease):
            self.pixels.release()


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
