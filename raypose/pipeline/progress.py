"""A job's progress as a person reads it: images done of the total, instances, errors, crops/s, ETA.

On a terminal, one status line redrawn in place; off a terminal, a log line every `interval`
seconds; with `--log-format json`, a `progress` record as often and a `shard_committed`
record per commit. Until the first rows arrive it says that the model is loading.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Callable, TextIO

from raypose.errors import SpecError

log = logging.getLogger(__name__)


class Progress:
    """Fed by the writer's counts after every batch; reports on a timer of its own."""

    def __init__(self, total_images: int, mode: str = "log", interval: float = 30.0, stream: TextIO | None = None):
        """`mode`: terminal (a line redrawn in place), log (a line every `interval` s), json (records), call
        (`self.call(status)` every `interval` s and at the end; see `of`), or off."""
        self.total = total_images
        self.mode = mode
        self.interval = 0.5 if mode == "terminal" else interval
        self.stream = stream
        self.done = self.instances = self.errors = 0
        self.started = time.monotonic()
        self.first_rows: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.call: Callable[[dict[str, Any]], None] | None = None

    @classmethod
    def of(cls, total_images: int, option: Any) -> "Progress":
        """The progress a run reports, from `Job.run`'s option (raypose.job.ProgressOption): None or "off",
        "auto" (a terminal line where stderr is one, else log lines), "terminal", "log", "json", or a function
        called with `status()` every second and once at the end."""
        if option is None or option == "off":
            return cls(total_images, "off")
        if option == "auto":
            return cls(total_images, "terminal" if sys.stderr.isatty() else "log")
        if option in ("terminal", "log", "json"):
            return cls(total_images, option)
        if callable(option):
            progress = cls(total_images, "call", interval=1.0)
            progress.call = option
            return progress
        raise SpecError(f"progress: expected None, 'off', 'auto', 'terminal', 'log', 'json' or a function, "
                        f"got {option!r}")

    def planned(self, job_id: str, counts: dict[str, int], new_shards: int, kept_shards: int) -> None:
        """Say what the run will do, before Ray starts (terminal and log modes: one line on stderr)."""
        if self.mode in ("terminal", "log"):
            kept = f", {counts['images_kept']} already labelled" if counts.get("images_kept") else ""
            stream = self.stream or sys.stderr
            stream.write(f"job {job_id}: {counts['images']} images to label, {counts['boxes']} boxes "
                         f"({counts['images_without_boxes']} images without boxes skipped{kept}); "
                         f"{new_shards} new shards, {kept_shards} kept\n")
            stream.flush()

    def start(self) -> "Progress":
        if self.mode != "off" and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="raypose-progress", daemon=True)
            self._thread.start()
        return self

    def update(self, images_done: int, instances: int, errors: int) -> None:
        with self._lock:
            if self.first_rows is None and (images_done or instances or errors):
                self.first_rows = time.monotonic()
            self.done, self.instances, self.errors = images_done, instances, errors

    def shard_committed(self, marker: dict[str, Any]) -> None:
        if self.mode == "json":
            log.info("shard %d committed", marker["shard"], extra={
                "event": "shard_committed", "shard": marker["shard"], "job_id": marker["job_id"],
                "images": marker["images"], "instances": marker["instances"], "errors": marker["errors"]})

    def finish(self) -> None:
        """Stop the timer; a terminal line is ended so the summary starts on a line of its own."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.mode == "terminal":
            self._draw(final=True)
        elif self.mode == "call":
            self.call(self.status())

    def status(self) -> dict[str, Any]:
        """The numbers of the moment: images done and total, instances, errors, crops/s, ETA (s)."""
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.started
            rate = self.instances / elapsed if elapsed > 0 else 0.0
            since = now - self.first_rows if self.first_rows is not None else 0.0
            eta = (self.total - self.done) * since / self.done if self.done and since > 0 else None
            return {"images_done": self.done, "images": self.total, "instances": self.instances,
                    "errors": self.errors, "crops_per_second": rate, "eta_seconds": eta,
                    "loading_model": self.first_rows is None}

    def line(self) -> str:
        s = self.status()
        if s["loading_model"]:
            return f"loading the model; 0/{s['images']} images ({_duration(time.monotonic() - self.started)})"
        eta = f", ETA {_duration(s['eta_seconds'])}" if s["eta_seconds"] is not None else ""
        percent = 100 * s["images_done"] / s["images"] if s["images"] else 100.0
        return (f"{s['images_done']}/{s['images']} images ({percent:.0f}%), {s['instances']} instances, "
                f"{s['errors']} errors, {s['crops_per_second']:.1f} crops/s{eta}")

    def report(self) -> None:
        """One report of the moment, as the mode has it: what the timer does every `interval` seconds."""
        if self.mode == "terminal":
            self._draw()
        elif self.mode == "json":
            s = self.status()
            log.info(self.line(), extra={"event": "progress", **s})
        elif self.mode == "call":
            self.call(self.status())
        elif self.mode == "log":
            log.info(self.line())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def _draw(self, final: bool = False) -> None:
        stream = self.stream or sys.stderr
        stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
