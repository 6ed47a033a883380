"""Sharding cameras over N daemons: rendezvous hashing, shard identity from the host name, settings."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
from pydantic import ValidationError

from monitor.cluster import (
    ClusterSettings,
    Shard,
    assign,
    mine,
    owners,
    resolve,
    shard_index_from_hostname,
)

FARM = [
    "gate",
    "back-gate",
    "barn-east",
    "barn-west",
    "barn_loft",
    "pond",
    "orchard",
    "driveway",
    "north-fence",
    "south-fence",
    "feeder-1",
    "feeder-2",
    "paddock-a",
    "paddock-b",
    "calving-pen",
    "chicken_run",
    "creek",
    "silo",
    "well",
    "hayloft",
]
# 400 cameras named like real ones: numbered fleet cameras plus a farm's names.
CAMERAS = [f"cam-{i:03d}" for i in range(400 - len(FARM))] + FARM


def test_camera_fleet_has_400_distinct_names():
    assert len(set(CAMERAS)) == len(CAMERAS) == 400


def test_owners_are_the_same_on_every_call():
    first = owners(CAMERAS, 7)
    assert owners(CAMERAS, 7) == first
    assert all(0 <= shard < 7 for shard in first.values())


def test_assignment_does_not_depend_on_input_order():
    shuffled = CAMERAS.copy()
    random.Random(4).shuffle(shuffled)
    by_order = {shard: sorted(names) for shard, names in assign(CAMERAS, 7).items()}
    by_shuffled = {shard: sorted(names) for shard, names in assign(shuffled, 7).items()}
    assert by_order == by_shuffled


def test_assignment_keeps_the_given_order_within_a_shard():
    for names in assign(CAMERAS, 5).values():
        assert names == [camera for camera in CAMERAS if camera in set(names)]


def test_assignment_is_the_same_in_processes_with_other_hash_seeds():
    # Python's hash() of a str changes with PYTHONHASHSEED; two daemons must still agree.
    script = (
        "import json, sys; from monitor.cluster import assign; print(json.dumps(assign(sys.argv[1:], 7)))"
    )
    expected = {str(shard): names for shard, names in assign(FARM, 7).items()}
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, *FARM], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert json.loads(out) == expected


def test_adding_or_removing_one_camera_moves_only_a_few_others():
    base = owners(CAMERAS, 7)
    for fleet in ([*CAMERAS, "new-cam"], [c for c in CAMERAS if c != "pond"]):
        changed = owners(fleet, 7)
        moved = [c for c in fleet if c in base and base[c] != changed[c]]
        assert len(moved) <= 10, moved


def test_every_camera_is_run_by_exactly_one_shard():
    count = 7
    shards = [Shard(index, count, f"monitor-{index}") for index in range(count)]
    owned = [camera for shard in shards for camera in mine(CAMERAS, shard)]
    assert sorted(owned) == sorted(CAMERAS)


def test_every_shard_is_listed_even_when_empty():
    assert assign(["gate"], 4).keys() == {0, 1, 2, 3}
    assert assign([], 3) == {0: [], 1: [], 2: []}


@pytest.mark.parametrize("count", [2, 3, 7, 16])
def test_shards_get_balanced_camera_counts(count):
    # The bound: max/min <= 1.5 for 400 cameras over 7 shards. The load bound gives
    # every fleet an even split, to one camera.
    sizes = [len(names) for names in assign(CAMERAS, count).values()]
    assert max(sizes) / min(sizes) <= 1.5, sizes
    assert max(sizes) <= math.ceil(len(CAMERAS) / count)


def test_large_fleet_is_balanced_within_a_few_percent():
    cameras = [f"site-{site:02d}-cam-{i:03d}" for site in range(20) for i in range(350)]
    sizes = [len(names) for names in assign(cameras, 7).values()]
    assert max(sizes) / min(sizes) <= 1.15, sizes


@pytest.mark.parametrize("count", range(1, 9))
def test_adding_a_shard_moves_about_one_in_count_plus_one_cameras_mostly_to_the_new_shard(count):
    before, after = owners(CAMERAS, count), owners(CAMERAS, count + 1)
    moved = [camera for camera in CAMERAS if before[camera] != after[camera]]
    assert len(moved) <= 1.5 * len(CAMERAS) / (count + 1), len(moved)
    to_new = sum(after[camera] == count for camera in moved)
    assert to_new >= 0.75 * len(moved), (to_new, len(moved))


def test_removing_the_last_shard_moves_about_its_share():
    before, after = owners(CAMERAS, 5), owners(CAMERAS, 4)
    moved = {camera for camera in CAMERAS if before[camera] != after[camera]}
    assert len(moved) <= 1.5 * len(CAMERAS) / 5
    assert {camera for camera, shard in before.items() if shard == 4} <= moved


def test_single_shard_owns_everything():
    assert assign(CAMERAS, 1) == {0: CAMERAS}


@pytest.mark.parametrize("count", [0, -1, 1025])
def test_shard_count_out_of_range_is_rejected(count):
    with pytest.raises(ValueError, match=rf"shard count must be 1\.\.1024, got {count}"):
        owners(["gate"], count)
    with pytest.raises(ValueError, match="shard count must be"):
        assign(["gate"], count)


@pytest.mark.parametrize(
    ("hostname", "expected", "raises"),
    [
        ("monitor-0", 0, nullcontext()),
        ("monitor-3", 3, nullcontext()),
        ("monitor-12", 12, nullcontext()),
        ("edge-gpu-monitor-7", 7, nullcontext()),
        ("Monitor-2", 2, nullcontext()),
        ("monitor-3.monitor-headless.monitoring.svc.cluster.local", 3, nullcontext()),
        ("monitor-1\n", 1, nullcontext()),
        ("monitor", None, pytest.raises(ValueError, match="host name 'monitor' does not end in")),
        ("monitor-", None, pytest.raises(ValueError, match="host name 'monitor-' does not end in")),
        ("monitor-x", None, pytest.raises(ValueError, match="'monitor-x'")),
        ("monitor_3", None, pytest.raises(ValueError, match="'monitor_3'")),
        ("monitor-03", None, pytest.raises(ValueError, match="without leading zeros")),
        ("3", None, pytest.raises(ValueError, match="host name '3'")),
        ("-3", None, pytest.raises(ValueError, match="host name '-3'")),
        ("", None, pytest.raises(ValueError, match="host name ''")),
        ("gpu-box.lan", None, pytest.raises(ValueError, match=r"set cluster\.shard_index")),
    ],
)
def test_shard_index_from_hostname(hostname: str, expected: int | None, raises: AbstractContextManager[Any]):
    with raises:
        assert shard_index_from_hostname(hostname) == expected


@pytest.mark.parametrize(
    ("settings", "hostname", "expected"),
    [
        (ClusterSettings(), "laptop", Shard(0, 1, "shard-0")),
        (ClusterSettings(shard_count=1), "monitor-5", Shard(0, 1, "shard-0")),
        (ClusterSettings(instance_id="barn-pc"), "laptop", Shard(0, 1, "barn-pc")),
        (ClusterSettings(shard_count=2), "monitor-1", Shard(1, 2, "monitor-1")),
        (
            ClusterSettings(shard_count=2),
            "monitor-1.monitor-headless.monitoring.svc",
            Shard(1, 2, "monitor-1"),
        ),
        (ClusterSettings(shard_count=2, instance_id="monitor-1-a"), "monitor-1", Shard(1, 2, "monitor-1-a")),
        (ClusterSettings(shard_count=3, shard_index=2), "laptop", Shard(2, 3, "shard-2")),
        (ClusterSettings(shard_count=3, shard_index=0), "monitor-2", Shard(0, 3, "shard-0")),
    ],
)
def test_resolve(settings: ClusterSettings, hostname: str, expected: Shard):
    assert resolve(settings, hostname) == expected


def test_resolve_rejects_an_ordinal_beyond_the_shard_count():
    # replicas raised to 3 while MONITOR_CLUSTER__SHARD_COUNT stayed 2
    with pytest.raises(ValueError, match=r"'monitor-2' gives shard index 2, but cluster.shard_count is 2"):
        resolve(ClusterSettings(shard_count=2), "monitor-2")


def test_resolve_needs_an_ordinal_when_sharded_by_host_name():
    with pytest.raises(ValueError, match="host name 'gpu-box' does not end in a StatefulSet ordinal"):
        resolve(ClusterSettings(shard_count=2), "gpu-box")


def test_shard_owns_what_owner_says():
    shard = resolve(ClusterSettings(shard_count=3), "monitor-1")
    placed = owners(CAMERAS, 3)
    assert mine(CAMERAS, shard) == [camera for camera in CAMERAS if placed[camera] == 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index": 2, "count": 2, "instance_id": "a"}, "index must be 0..1 (count 2), got 2"),
        ({"index": -1, "count": 2, "instance_id": "a"}, "index must be 0..1"),
        ({"index": 0, "count": 0, "instance_id": "a"}, "count must be 1..1024, got 0"),
        ({"index": 0, "count": 1, "instance_id": "a/b"}, "instance_id must be"),
    ],
)
def test_invalid_shard_cannot_exist(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Shard(**kwargs)


def test_default_cluster_settings_are_one_shard():
    settings = ClusterSettings()
    assert (settings.shard_index, settings.shard_count, settings.instance_id) == (None, 1, None)


@pytest.mark.parametrize(("index", "count"), [(2, 2), (5, 3), (1, 1)])
def test_shard_index_not_below_shard_count_is_rejected_naming_both(index, count):
    with pytest.raises(ValidationError) as info:
        ClusterSettings(shard_index=index, shard_count=count)
    message = str(info.value)
    assert f"cluster.shard_index ({index}) must be less than cluster.shard_count ({count})" in message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"shard_count": 0}, "shard_count"),
        ({"shard_count": 1025}, "shard_count"),
        ({"shard_index": -1, "shard_count": 2}, "shard_index"),
        ({"instance_id": "monitor/0"}, "instance_id"),
        ({"instance_id": "#"}, "instance_id"),
        ({"instance_id": ""}, "instance_id"),
        ({"shards": 2}, "shards"),
    ],
)
def test_invalid_cluster_settings_are_rejected(data, field):
    with pytest.raises(ValidationError) as info:
        ClusterSettings.model_validate(data)
    assert [error["loc"][0] for error in info.value.errors()] == [field]


def test_cluster_settings_from_environment_strings():
    # MONITOR_CLUSTER__SHARD_COUNT arrives as a string from the StatefulSet's env.
    settings = ClusterSettings.model_validate({"shard_count": "2", "instance_id": "monitor-1"})
    assert (settings.shard_count, settings.instance_id) == (2, "monitor-1")


def test_cluster_settings_are_frozen():
    settings = ClusterSettings(shard_count=2)
    with pytest.raises(ValidationError):
        settings.shard_count = 3  # type: ignore[misc]


def test_shards_command_prints_the_assignment_of_monitor_cluster(tmp_path, capsys):
    from monitor.cli import main

    config = tmp_path / "monitor.yaml"
    cameras = {name: {"url": f"rtsp://10.0.0.1/{name}"} for name in FARM}
    cameras["well"]["enabled"] = False
    config.write_text(
        json.dumps({"model": {"path": "m.pt"}, "cluster": {"shard_count": 4}, "cameras": cameras})
    )

    def printed(argv: list[str]) -> tuple[dict[str, int], dict[int, int], str]:
        assert main(argv) == 0
        out = capsys.readouterr().out
        rows = {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)(?:\s+\(disabled\))?$", out, re.M)}
        totals = {int(m[1]): int(m[2]) for m in re.finditer(r"^shard (\d+): (\d+) camera\(s\)$", out, re.M)}
        return rows, totals, out

    for count, argv in [
        (3, ["shards", "--config", str(config), "--count", "3"]),
        (4, ["shards", "--config", str(config)]),  # cluster.shard_count
    ]:
        rows, totals, out = printed(argv)
        expected = assign(sorted(FARM), count)
        assert rows == {camera: shard for shard, names in expected.items() for camera in names}
        assert totals == {shard: len(names) for shard, names in expected.items()}
        assert out.splitlines()[0].split() == ["camera", "shard"]
        assert re.search(r"^well\s+\d+  \(disabled\)$", out, re.M), out

    assert main(["shards", "--config", str(config), "--count", "0"]) == 2
    assert "error: --count" in capsys.readouterr().err
