"""Sharding: which of N daemons runs which camera.

Past one machine, cameras are split over ``cluster.shard_count`` daemons (a
Kubernetes StatefulSet, one GPU each) that share one MQTT broker and one
Prometheus. Each daemon learns its shard index from its host name, the
StatefulSet pod name ``monitor-<ordinal>`` (or from ``cluster.shard_index``),
and runs only the cameras it owns.

Ownership uses rendezvous (highest-random-weight) hashing with bounded
loads: every shard scores every camera with a stable hash of
``camera NUL shard``; cameras are placed one by one (in an order given by
their own hash) on their highest-scoring shard that is not full, a shard
holding at most an even share, rounded up. Why this and not
``hash(camera) % count``:

* No coordination. Each daemon computes the same answer from the camera
  names (all daemons read the same configuration) and the shard count alone:
  no leader, no lease, no shared state. Two daemons can never both run a
  camera, and none is left out, as long as they agree on the count.
* Little movement. Going from N to N + 1 shards moves a camera mostly when
  the new shard outscores its old owner, about 1/(N + 1) of the cameras (the
  load bound moves a few more: at most 1.26/(N + 1) for N up to 8 on a
  400-camera fleet); with a modulo,
  about N/(N + 1) of them would move, restarting their decoders and ending
  their open tracks.
* Balance. Plain rendezvous hashing is balanced only on average: 400 cameras
  over 7 shards end up more than 1.5x apart about a third of the time. The
  load bound makes every split even to one camera.

The hash is BLAKE2b, not Python's ``hash()``, which is salted per process
(``PYTHONHASHSEED``): two daemons would disagree.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SHARDS = 1024
# A StatefulSet pod is named <statefulset>-<ordinal>; Kubernetes writes the
# ordinal without leading zeros, so "gpu-01" is a host name, not a pod name.
_POD_NAME = re.compile(
    r"^(?P<set>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)-(?P<ordinal>0|[1-9][0-9]*)$", re.IGNORECASE
)
# Instance ids go into MQTT topics (<prefix>/instances/<id>/available) and
# metric labels: no '/', '#', '+' or NUL.
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_INSTANCE_ID_RULE = "1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"


class ClusterSettings(BaseModel):
    """How cameras are split over several daemons (the ``cluster`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard_index: int | None = Field(
        None,
        ge=0,
        description="This daemon's shard, 0..shard_count-1. Default: the ordinal at the end of the "
        "host name (a StatefulSet pod monitor-3 is shard 3); not read when shard_count is 1.",
    )
    shard_count: int = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        description="Number of daemons the cameras are split over; the StatefulSet's replicas.",
    )
    instance_id: str | None = Field(
        None,
        description="Names this daemon in MQTT topics and events. Default: the host name when the "
        "shard comes from it, else shard-<index>.",
    )

    @field_validator("instance_id")
    @classmethod
    def _instance_id(cls, value: str | None) -> str | None:
        if value is not None and not INSTANCE_ID.match(value):
            raise ValueError(f"must be {_INSTANCE_ID_RULE} (it is used in MQTT topics), got {value!r}")
        return value

    @model_validator(mode="after")
    def _index_in_range(self) -> ClusterSettings:
        if self.shard_index is not None and self.shard_index >= self.shard_count:
            raise ValueError(
                f"cluster.shard_index ({self.shard_index}) must be less than "
                f"cluster.shard_count ({self.shard_count})"
            )
        return self


@dataclass(frozen=True, slots=True)
class Shard:
    """This daemon's place in the cluster.

    Attributes:
        index: Which shard, ``0 <= index < count``.
        count: How many shards the cameras are split over.
        instance_id: Names this daemon in MQTT topics and events.
    """

    index: int
    count: int
    instance_id: str

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ValueError(f"count must be 1..{MAX_SHARDS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"index must be 0..{self.count - 1} (count {self.count}), got {self.index}")
        if not INSTANCE_ID.match(self.instance_id):
            raise ValueError(f"instance_id must be {_INSTANCE_ID_RULE}, got {self.instance_id!r}")


def shard_index_from_hostname(hostname: str) -> int:
    """The ordinal at the end of a StatefulSet pod name: ``monitor-3`` -> 3.

    A fully qualified name (``monitor-3.monitor-headless.monitoring.svc``) is
    read by its first label.

    Raises:
        ValueError: The host name does not end in ``-<ordinal>``; the message names it.
    """
    label = hostname.strip().split(".", 1)[0]
    match = _POD_NAME.match(label)
    if match is None:
        raise ValueError(
            f"host name {hostname!r} does not end in a StatefulSet ordinal "
            "(expected <name>-<N> such as monitor-3, N without leading zeros): "
            "set cluster.shard_index (MONITOR_CLUSTER__SHARD_INDEX) instead"
        )
    return int(match["ordinal"])


def resolve(settings: ClusterSettings, hostname: str) -> Shard:
    """This daemon's shard, from the settings and, unless ``shard_index`` is set, the host name.

    A single shard (``shard_count`` 1) is index 0 whatever the host name is.

    Raises:
        ValueError: The index comes from the host name and the host name has no
            ordinal, or its ordinal is not below ``shard_count`` (the StatefulSet
            has more replicas than ``MONITOR_CLUSTER__SHARD_COUNT`` says).
    """
    count = settings.shard_count
    if settings.shard_index is not None or count == 1:
        index = settings.shard_index or 0
        return Shard(index, count, settings.instance_id or f"shard-{index}")
    index = shard_index_from_hostname(hostname)
    if index >= count:
        raise ValueError(
            f"host name {hostname!r} gives shard index {index}, but cluster.shard_count is {count}: "
            "set MONITOR_CLUSTER__SHARD_COUNT to the StatefulSet's replicas"
        )
    return Shard(index, count, settings.instance_id or hostname.strip().split(".", 1)[0])


def _weight(camera: str, shard: int) -> int:
    # NUL cannot occur in a camera name, so "a" + "12" and "a1" + "2" differ.
    digest = hashlib.blake2b(f"{camera}\0{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"shard count must be 1..{MAX_SHARDS}, got {count}")


def owners(cameras: Iterable[str], count: int) -> dict[str, int]:
    """Each camera's shard, ``0 <= shard < count``: rendezvous hashing with bounded loads.

    Cameras are placed one by one, in an order given by their own hash (not by
    their names or the input order), each on the shard of highest weight that
    still has room; a shard holds at most ``ceil(n / count)`` cameras. Plain
    rendezvous hashing is balanced only on average (400 cameras over 7 shards
    end up more than 1.5x apart about a third of the time); the bound makes
    every split even to one camera, at the price of a camera's shard depending
    on the other cameras (every daemon reads the same camera list, so they
    still agree; adding one camera moves a handful of others).

    Raises:
        ValueError: ``count`` is not 1..1024.
    """
    _check_count(count)
    names = list(dict.fromkeys(cameras))
    room = math.ceil(len(names) / count)
    load = [0] * count
    placed: dict[str, int] = {}
    for camera in sorted(names, key=lambda name: (_weight(name, -1), name)):
        # Ties (a 64-bit collision) go to the higher index, the same on every daemon.
        ranked = sorted(range(count), key=lambda shard: (_weight(camera, shard), shard), reverse=True)
        shard = next(s for s in ranked if load[s] < room)
        load[shard] += 1
        placed[camera] = shard
    return placed


def assign(cameras: Iterable[str], count: int) -> dict[int, list[str]]:
    """Every shard ``0..count-1`` (empty ones too) and its cameras, in the order given.

    Raises:
        ValueError: ``count`` is not 1..1024.
    """
    names = list(cameras)
    placed = owners(names, count)
    shards: dict[int, list[str]] = {index: [] for index in range(count)}
    for camera in names:
        shards[placed[camera]].append(camera)
    return shards


def mine(cameras: Iterable[str], shard: Shard) -> list[str]:
    """The cameras ``shard`` runs, in the order given."""
    return assign(cameras, shard.count)[shard.index]
