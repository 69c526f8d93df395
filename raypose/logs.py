"""The CLI's log output: text or JSON lines on stderr, `--quiet`, and Ray's own console output in line.

The job's start and finish are structured records (`pipeline.run_job` logs them with `extra=`):

    event=job_started   job_id, images, boxes, output, ...
    event=job_finished  job_id, status, images, boxes, instances, errors, errors_by_stage,
                        crops_per_second, seconds, output

The text format shows their message; the JSON format writes one object per record, with
`ts`, `level`, `logger`, `message` and every extra field. In JSON mode Ray's own console
loggers (`ray`, `ray.data`) are given the same formatter, Ray Data's progress bars are turned
off (they are terminal drawings, not lines) and Python warnings are routed through logging,
so that every line on stderr parses as JSON.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from datetime import datetime, timezone
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that Ray configures with their own console handler (propagate=False).
RAY_CONSOLE_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, and the record's `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in data:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at emit time (so test runners that swap it see the lines)."""

    _raypose = True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(fmt: LogFormat = "text", quiet: bool = False) -> None:
    """Configure the root logger for the CLI: INFO (WARNING when quiet) on stderr in `fmt`.

    Like `logging.basicConfig`, this adds no handler when the program embedding raypose (or a
    test runner) already configured the root logger. In JSON mode on the process's real stderr,
    lines that bypass Python logging (Ray's C++ core, libraries printing to the stream) are
    wrapped as JSON objects too (see `_JsonStderr`).
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_raypose", False)]
    if not ours and not root.handlers:
        handler = _StderrHandler()
        root.addHandler(handler)
        ours = [handler]
    level = logging.WARNING if quiet else logging.INFO
    for handler in ours:
        handler.setFormatter(formatter(fmt))
        handler.setLevel(level)
    if ours:
        root.setLevel(level)
    if fmt == "json" and ours:
        logging.captureWarnings(True)
        if sys.stderr is sys.__stderr__:
            _JsonStderr.install()


def quiet_ray(fmt: LogFormat = "text", quiet: bool = False, data: bool = True) -> None:
    """Bring Ray's console output in line with the CLI's: same format and level, no progress bars.

    Ray's `ray` and `ray.data` loggers print through their own console handlers, and ray.init
    resets those handlers' format; in JSON or quiet mode they are removed and the loggers
    propagate to the root logger instead; in text mode they are kept, writing to the current
    sys.stderr. With `data` (running a job, not only submitting one) Ray Data is imported, which
    installs its console handler, and in JSON or quiet mode its progress is turned off.
    """
    import ray  # installs the `ray` logger's console handler

    if data:
        import ray.data
    for name in RAY_CONSOLE_LOGGERS:
        logger = logging.getLogger(name)
        console = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        for handler in console:
            if fmt == "json" or quiet:
                logger.removeHandler(handler)
            elif type(handler).__name__ == "PlainRayHandler":
                # Meant to write to sys.stderr as it is at emit time, it keeps the stream it was
                # made with (Ray 2.60): after a run inside a program that swaps sys.stderr (a test
                # runner, a notebook), that stream may be closed. Make it follow sys.stderr.
                handler.stream = _CURRENT_STDERR
        if console and (fmt == "json" or quiet):
            logger.propagate = True
    if fmt == "json" or quiet:
        if data:
            ray.data.DataContext.get_current().enable_progress_bars = False
            # ...which Ray Data then announces as a WARNING on every run: not a problem, so not shown.
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class _CurrentStderr:
    """A stream that is whatever sys.stderr is when written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_CURRENT_STDERR = _CurrentStderr()

_CORE_LEVELS = {"D": "DEBUG", "I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_CORE_LINE = re.compile(r"^\[[^\]]*? ([DIWEF]) \d+ \d+\]")


def as_json_line(line: str) -> str:
    """A JSON object line as it is; anything else wrapped as {"ts", "level", "logger": "stderr", "message"}."""
    stripped = line.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            if isinstance(json.loads(stripped), dict):
                return stripped
        except ValueError:
            pass
    core = _CORE_LINE.match(stripped)
    return json.dumps({
        "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "level": _CORE_LEVELS[core.group(1)] if core else "INFO",
        "logger": "ray.core" if core else "stderr",
        "message": stripped,
    })


class _JsonStderr:
    """Replace file descriptor 2 with a pipe whose lines are re-emitted as JSON on the real stderr.

    Ray's C++ core and some libraries write to the stream directly, not through Python logging;
    this keeps `--log-format json` one JSON object per line for whatever collects the log.
    """

    _installed: "_JsonStderr | None" = None

    @classmethod
    def install(cls) -> None:
        if cls._installed is None:
            cls._installed = cls()

    def __init__(self) -> None:
        sys.stderr.flush()
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._out = open(self._real, "w", encoding="utf-8", errors="replace", closefd=False)
        self._pump = threading.Thread(target=self._copy, args=(read_end,), name="raypose-json-stderr", daemon=True)
        self._pump.start()
        atexit.register(self.close)

    def _copy(self, read_end: int) -> None:
        with open(read_end, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    self._out.write(as_json_line(line) + "\n")
                    self._out.flush()

    def close(self) -> None:
        """Put the real stderr back and let the pump finish what is in the pipe."""
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        os.dup2(self._real, 2)  # drops this process's write end; the pump reads to EOF
        self._pump.join(timeout=2)
        _JsonStderr._installed = None
