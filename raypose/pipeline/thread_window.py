"""A moving window of threads: work on a stream of items, results in order, a bounded number in flight."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Result = TypeVar("Result")


def in_order(work: Callable[..., Result], items: Iterable[tuple], threads: int) -> Iterator[Result]:
    """`work(*item)` for each item, results in order; with threads > 1 up to `threads` run at once.

    Pillow's decoder and numpy's large-array loops release the GIL, so a pose actor's otherwise
    idle cores decode and cut its next images in parallel. Items are drawn only as the window
    moves on; a decoded image lives only while its task runs, so at most `threads` at a time.
    """
    if threads <= 1:
        yield from (work(*item) for item in items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="crops") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(work, *item))
            if len(window) >= 4 * threads:  # room to go on past a large photo
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
