"""The loop's process-wide setting: startup's objects out of the garbage collector's sight."""

from __future__ import annotations

import gc
import weakref

from monitor.loop import settled_heap


class _Node:
    other: object


def test_the_loop_runs_with_startup_objects_frozen_and_still_collects_its_own_cycles():
    gc.collect()
    before = len(gc.get_objects())
    with settled_heap():
        # What the process held when the loop started is not walked by a collection.
        assert gc.get_freeze_count() >= 0.9 * before  # (a collection at the start frees a few)
        assert len(gc.get_objects()) < before / 10
        node = _Node()
        node.other = node  # a cycle made while the loop runs: only the collector frees it
        gone = weakref.ref(node)
        del node
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == 0  # given back when the loop ends
    assert len(gc.get_objects()) >= before / 2


def test_a_loop_that_fails_gives_the_startup_objects_back_to_the_collector():
    try:
        with settled_heap():
            assert gc.get_freeze_count() > 0
            raise RuntimeError("the loop failed")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
