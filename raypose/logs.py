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


def setup_logging(fmt: LogFormat = "text", quiet: bool = False, pump_stderr: bool = False) -> None:
    """Configure the root logger for the CLI: INFO (WARNING when quiet) on stderr in `fmt`.

    Like `logging.basicConfig`, this adds no handler when the program embedding raypose (or a
    test runner) already configured the root logger. With `pump_stderr` (a run, on the process's
    real stderr), lines that bypass Python logging (Ray's C++ core, libraries printing to the
    stream) go through `_StderrPump`: known-harmless ones are dropped, and in JSON mode the rest
    are wrapped as JSON objects.
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
    if pump_stderr and ours and sys.stderr is sys.__stderr__:
        _StderrPump.install(json_lines=fmt == "json")



# Lines Ray prints on every successful run that say nothing is wrong. Ray Data creates each
# actor with refs to its DataContext and MapTransformer, which the driver holds until the job
# ends; Ray's core warns that a restarted actor could not get them back if they were lost,
# which happens only when the driver is gone, and then the job is over anyway.
HARMLESS_LINES = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' has constructor arguments "
               r"in the object store and max_restarts > 0"),
)

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


def flush_stderr(timeout: float = 2.0) -> None:
    """Wait until every line written to stderr so far is out (the pump is asynchronous): call before
    a line that must come last, such as the job's summary."""
    sys.stderr.flush()
    if _StderrPump._installed is not None:
        _StderrPump._installed.drain(timeout)


class _StderrPump:
    """Replace file descriptor 2 with a pipe whose lines are passed on to the real stderr.

    Ray's C++ core and some libraries write to the stream directly, not through Python
    logging: here `HARMLESS_LINES` are dropped and, with `json_lines`, every other line is
    wrapped as a JSON object, so `--log-format json` stays one object per line. In text mode
    anything that is not a whole line (a progress bar redrawing itself) passes at once.
    """

    _installed: "_StderrPump | None" = None
    _DRAIN = "\x1eraypose-drain\x1e"

    @classmethod
    def install(cls, json_lines: bool) -> None:
        if cls._installed is None:
            cls._installed = cls(json_lines)

    def __init__(self, json_lines: bool) -> None:
        sys.stderr.flush()
        self.json_lines = json_lines
        self._drained: list[threading.Event] = []
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._pump = threading.Thread(target=self._copy, args=(read_end,), name="raypose-stderr", daemon=True)
        self._pump.start()
        atexit.register(self.close)

    def _copy(self, read_end: int) -> None:
        pending = b""
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._emit(line.decode("utf-8", errors="replace"))
            if pending and not self.json_lines and not pending.startswith(b"["):  # not a core log line
                os.write(self._real, pending)
                pending = b""
        if pending:
            self._emit(pending.decode("utf-8", errors="replace"))
        os.close(read_end)

    def drain(self, timeout: float) -> None:
        """Return once the pump has passed on everything written to fd 2 before this call."""
        done = threading.Event()
        self._drained.append(done)
        os.write(2, (self._DRAIN + "\n").encode())
        done.wait(timeout)

    def _emit(self, line: str) -> None:
        if line == self._DRAIN:
            if self._drained:
                self._drained.pop(0).set()
            return
        if any(pattern.search(line) for pattern in HARMLESS_LINES):
            return
        if self.json_lines:
            if line.strip():
                os.write(self._real, (as_json_line(line) + "\n").encode())
        else:
            os.write(self._real, (line + "\n").encode())

    def close(self) -> None:
        """Put the real stderr back and let the pump finish what is in the pipe."""
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        os.dup2(self._real, 2)  # drops this process's write end; the pump reads to EOF
        self._pump.join(timeout=2)
        _StderrPump._installed = None
