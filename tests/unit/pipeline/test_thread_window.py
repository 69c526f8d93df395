"""The thread window: results in the items' order, never more than its window of items drawn ahead."""

from __future__ import annotations

import threading
import time

import pytest

from raypose.pipeline.thread_window import in_order


@pytest.mark.parametrize("threads", [1, 3])
def test_results_come_in_order_with_a_bounded_window(threads):
    drawn, lock = [], threading.Lock()

    def items():
        for i in range(40):
            with lock:
                drawn.append(i)
            yield (i,)

    def work(i):
        time.sleep(0.001 * (i % 3))  # later items may finish first
        return i * i

    results = []
    for result in in_order(work, items(), threads):
        results.append(result)
        assert len(drawn) - len(results) <= 4 * threads  # drawn ahead of what was handed out
    assert results == [i * i for i in range(40)]
