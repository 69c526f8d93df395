"""The embedded Ray ends with its driver, killed or not.

`raypose submit` starts Ray in its own process; if that process is killed (kill -9, an OOM
kill), Ray's GCS and raylet go with it, but the dashboard and runtime-env agents wait about a
minute for a GCS that is gone. This watchdog, a small process of its own, follows the
driver's process tree while it lives and, once the driver is gone, kills what is left of it.

    python -m raypose.pipeline.watchdog DRIVER_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PROC = Path("/proc")


def start(driver_pid: int) -> subprocess.Popen | None:
    """Start the watchdog for `driver_pid` (Linux only: it reads /proc); None where it cannot run."""
    if not PROC.is_dir():
        return None
    return subprocess.Popen([sys.executable, "-m", "raypose.pipeline.watchdog", str(driver_pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def watch(driver: int, poll: float = 0.5, on_poll: Callable[[set[int]], None] | None = None) -> None:
    """Until the driver is gone, remember its process tree; then kill every process of it still alive.

    `on_poll(tree)` is called with the processes remembered so far after each look (the tests wait on it).
    """
    born = _start_time(driver)
    me = os.getpid()
    tree: dict[int, str | None] = {}
    while born is not None and _start_time(driver) == born:
        for pid in descendants(driver) - {me}:
            tree.setdefault(pid, _start_time(pid))
        if on_poll is not None:
            on_poll(set(tree))
        time.sleep(poll)
    for pid, started in tree.items():
        if started is not None and _start_time(pid) == started:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
