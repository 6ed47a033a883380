"""The frame hand-off's shared memory: a camera's slots, the child's side and the parent's.

Each camera has one block of ``SLOTS`` slots, owned by the parent
(``sources.Source``). A slot holds a frame at its detect size and, beside
it, the frame letterboxed into the network's input (``monitor.letterbox``),
so the main process detects a frame without copying or resizing it.

The child (``Slots``) writes each frame into a free slot and announces it
with a ``FrameReady`` on its pipe. The parent (``SlotReader``) *holds* the
slot of the frame it takes: the frame reads its pixels in place until its
pipeline step releases it. No lock: a child killed while holding one would
freeze the daemon. The protocol is in ``Slots``.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection as mpc
import threading
import time
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NamedTuple

import numpy as np

from monitor.frames import Lease
from monitor.letterbox import Letterboxed, NetInput, Placement, letterbox_into

#: Slots per camera: the newest frame, the one the parent holds, and two for the child to
#: choose from (one of them may be the one the parent is about to hold; see ``Slots``).
SLOTS = 4


class FrameReady(NamedTuple):
    """A frame is in ``slot`` (a tuple: one goes down the pipe per frame, and tuples unpickle fast)."""

    seq: int
    slot: int
    capture_time: float
    height: int
    width: int


@dataclass(frozen=True, slots=True)
class Handoff:
    """One camera's shared memory, as the parent made it for its decoder children.

    Attributes:
        shm_name: The block of ``SLOTS`` slots.
        frame_bytes: Bytes of a slot's frame part; its letterbox follows.
        net: The network input the child letterboxes each frame into (None: it does not).
        latest_seq: ``RawValue('q')``: the newest frame's sequence number the child published.
        lease: ``RawValue('q')``: the slot the parent holds (-1: none); the child never writes it.
    """

    shm_name: str
    frame_bytes: int
    net: NetInput | None
    latest_seq: Any
    lease: Any

    @property
    def slot_bytes(self) -> int:
        return self.frame_bytes + (self.net.max_bytes if self.net is not None else 0)


_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier: a store before it is seen by the other process before a load after it.

    The slot hand-off is a Dekker pattern (each side stores, then loads what the
    other stored: the child its newest sequence number then the lease, the parent
    the lease then the newest number), and x86 lets a load pass an earlier store.
    Python has no fence; taking a lock does one (its atomic read-modify-write).
    """
    with _FENCE:
        pass


class Slots:
    """The child's side of the hand-off: each frame into a free slot, then ``FrameReady``.

    A slot is free unless it holds the newest frame published (the parent may be
    about to take it) or is the one the parent holds (``Handoff.lease``); of the
    free ones, the one written longest ago is used. The parent holds a frame only
    if, after storing its lease, the newest published frame is at most ``SLOTS - 3``
    newer (``SlotReader.hold``): a frame written meanwhile, under the old lease, went
    into an older slot than the held frame's, and every later one sees the lease.
    So a held frame's slot is never written while the parent reads it.
    """

    def __init__(self, shm: SharedMemory, handoff: Handoff, conn: mpc.Connection) -> None:
        self._shm = shm
        self._handoff = handoff
        self._slot_bytes = handoff.slot_bytes
        self._conn = conn
        self._written = [-1] * SLOTS  # the sequence number in each slot (-1: none of this child's)
        self._holds: list[object] = [None] * SLOTS  # the pre-made frame in each slot (``publish``'s key)
        self._newest = -1  # the slot of the newest frame published
        self._placements: dict[tuple[int, int], Placement] = {}
        self.seq = 0

    def free_slot(self) -> int:
        """The slot the next ``publish`` writes: neither the newest frame's nor the one the parent holds."""
        held = self._handoff.lease.value
        free = [s for s in range(SLOTS) if s not in (self._newest, held)]
        return min(free, key=self._written.__getitem__)

    def publish(self, image: np.ndarray, key: object = None) -> None:
        """Copy ``image`` (BGR, at most the frame's size) and its letterbox into a free slot; announce it.

        Args:
            image: The frame.
            key: Names a pre-made frame (the bench's stand-in child): a slot that already
                holds it, pixels and letterbox, is not written again.
        """
        seq = self.seq
        out_h, out_w = image.shape[:2]
        slot = self.free_slot()
        if key is None or self._holds[slot] != key:
            self._write(slot, image)
        self._holds[slot] = key
        capture_time = time.time()
        self._written[slot], self._newest = seq, slot
        fence()  # the pixels before the number
        self._handoff.latest_seq.value = seq
        fence()  # the number before the next frame's look at the lease
        self._conn.send(FrameReady(seq, slot, capture_time, out_h, out_w))
        self.seq = seq + 1

    def _write(self, slot: int, image: np.ndarray) -> None:
        out_h, out_w = image.shape[:2]
        start = slot * self._slot_bytes
        dest = np.ndarray((out_h, out_w, 3), np.uint8, self._shm.buf, start)
        np.copyto(dest, image)
        del dest
        net = self._handoff.net
        if net is not None:
            p = self._placements.get((out_h, out_w))
            if p is None:
                p = self._placements[(out_h, out_w)] = net.place(out_h, out_w)
            box = np.ndarray(
                (p.input_height, p.input_width, 3), np.uint8, self._shm.buf, start + self._handoff.frame_bytes
            )
            letterbox_into(image, box, p)
            del box


class SlotReader:
    """The parent's side of the hand-off: the shared memory, and the slot of the frame it holds.

    Args:
        frame_bytes: Bytes of a slot's frame part (the camera's largest frame).
        net: The network input the children letterbox into, or None.
        context: The multiprocessing context the children start from (for the shared values).
    """

    def __init__(self, frame_bytes: int, net: NetInput | None, context: Any) -> None:
        self.frame_bytes = frame_bytes
        self.net = net
        self.slot_bytes = frame_bytes + (net.max_bytes if net is not None else 0)
        self.shm: SharedMemory | None = None
        self.latest_seq: Any = None
        self._context = context
        self._lease_slot: Any = None  # the slot held for ``_held`` (the child writes any other)
        self._held: Lease | None = None  # the newest frame taken, until its step releases it
        # Views of each slot, by (slot, height, width): a frame size is one per camera, mostly.
        self._views: dict[tuple[int, int, int], tuple[np.ndarray, Letterboxed | None]] = {}

    def handoff(self) -> Handoff:
        """What a new child gets; the block is made on first use (raises ``OSError`` when it cannot)."""
        if self.shm is None:
            self.shm = SharedMemory(create=True, size=SLOTS * self.slot_bytes)
        if self.latest_seq is None:
            self.latest_seq = self._context.RawValue("q", -1)
            self._lease_slot = self._context.RawValue("q", -1)
        return Handoff(self.shm.name, self.frame_bytes, self.net, self.latest_seq, self._lease_slot)

    def hold(self, ready: FrameReady) -> Lease | None:
        """Hold ``ready``'s slot and view its frame there; None when the child may have written it since.

        The frame held before, if still unreleased, is copied out first: its slot is given back.
        """
        assert self.shm is not None
        assert self.latest_seq is not None
        if self._held is not None:
            if self._held.in_slot:
                self._held.detach()  # still in a step (a camera twice in one batch)
            self._held = None
        self._lease_slot.value = ready.slot
        fence()  # the lease before the look at the newest number (see ``Slots``)
        if self.latest_seq.value > ready.seq + SLOTS - 3:
            self._lease_slot.value = -1
            return None
        key = (ready.slot, ready.height, ready.width)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = self._view(*key)
        self._held = Lease(*views)
        return self._held

    def _view(self, slot: int, height: int, width: int) -> tuple[np.ndarray, Letterboxed | None]:
        """Read-only views of a slot's frame and of its letterbox, which the child wrote next to it.

        Made once per slot and frame size, then kept: a frame taken reuses them.
        """
        assert self.shm is not None
        offset = slot * self.slot_bytes
        image = np.ndarray((height, width, 3), np.uint8, self.shm.buf, offset)
        image.flags.writeable = False
        net = self.net
        if net is None:
            return image, None
        p = net.place(height, width)
        box = np.ndarray(
            (p.input_height, p.input_width, 3), np.uint8, self.shm.buf, offset + self.frame_bytes
        )
        box.flags.writeable = False
        return image, Letterboxed(box, p, net)

    def close(self) -> None:
        """Free the shared memory (a frame still in use keeps a copy). Idempotent."""
        if self._held is not None:
            self._held.detach()
            self._held = None
        self._views.clear()
        if self.shm is not None:
            shm, self.shm = self.shm, None
            shm.unlink()
            with contextlib.suppress(BufferError):  # a view of a slot is still referenced: freed with it
                shm.close()
