"""The CLI's log output: text or JSON lines on stderr, `--quiet`, and Ray's own console output in line.

The job's start and finish are structured records (`pipeline.run_job` logs them with `extra=`):

    event=job_started   job_id, images, boxes, output, ...
    event=job_finished  job_id, status, images, boxes, instances, errors, errors_by_stage,
                        crops_per_second, seconds, output

The text format shows their message; the JSON format writes one object per record
(`json_record`: `ts`, `level`, `logger`, `message` and every extra field), and Python warnings
are routed through logging, so that every line on stderr parses as JSON. Ray's own console
loggers are brought in line by `pipeline.runtime.quiet_ray`.
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

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def json_record(level: str, logger: str, message: str, created: float | None = None, **fields) -> str:
    """The one JSON log line: ts, level, logger, message, then any other fields."""
    ts = datetime.fromtimestamp(created, timezone.utc) if created is not None else datetime.now(timezone.utc)
    data = {"ts": ts.isoformat(timespec="milliseconds"), "level": level, "logger": logger, "message": message}
    data.update({key: value for key, value in fields.items() if key not in data})
    return json.dumps(data, default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (`json_record`), with the record's `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {key: value for key, value in vars(record).items()
                 if key not in _STANDARD_ATTRS and not key.startswith("_")}
        if record.exc_info:
            extra["exception"] = self.formatException(record.exc_info)
        return json_record(record.levelname, record.name, record.getMessage(), created=record.created, **extra)


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
    return json_record(_CORE_LEVELS[core.group(1)] if core else "INFO", "ray.core" if core else "stderr", stripped)


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
