"""Log lines: the one JSON record, lines that bypass logging wrapped as JSON, Ray's console handlers following sys.stderr."""

from __future__ import annotations

import json
import logging
import os
import sys

from raypose.logs import JsonFormatter, as_json_line


def test_json_formatter_keeps_the_extra_fields():
    record = logging.LogRecord("raypose.pipeline", logging.INFO, __file__, 1, "job %s started", ("j1",), None)
    record.event, record.images, record._private = "job_started", 3, "hidden"
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "job j1 started" and data["event"] == "job_started" and data["images"] == 3
    assert data["logger"] == "raypose.pipeline" and data["level"] == "INFO" and "ts" in data
    assert "_private" not in data and "args" not in data and "msg" not in data


def test_lines_that_bypass_logging_are_wrapped():
    core = json.loads(as_json_line("[2026-11-25 06:18:30,737 E 31824 31824] core_worker.cc:2465: Actor ..."))
    assert core["level"] == "ERROR" and core["logger"] == "ray.core"
    assert json.loads(as_json_line("plain text"))["message"] == "plain text"
    assert as_json_line('{"already": "json"}') == '{"already": "json"}'
    assert json.loads(as_json_line("[1, 2]"))["message"] == "[1, 2]"  # only objects pass as they are


def test_rays_console_handlers_follow_sys_stderr(monkeypatch):
    """Ray's console handler keeps the stream it was created with; after `quiet_ray` it writes to
    whatever sys.stderr is, so a closed stream from an earlier in-process run is never used."""
    import io

    import ray.data  # noqa: F401  (installs Ray Data's console handler)

    from raypose.pipeline.runtime import quiet_ray

    stale = io.StringIO()
    handlers = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]
    assert handlers
    for handler in handlers:
        monkeypatch.setattr(handler, "stream", stale)
    stale.close()
    quiet_ray("text", quiet=False)
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("ray.data.test").warning("hello from ray data")
    assert "hello from ray data" in now.getvalue()


def test_the_stderr_pump_drops_rays_harmless_line_and_passes_the_rest(monkeypatch):
    from raypose.logs import _StderrPump

    read_end, write_end = os.pipe()
    pump = _StderrPump.__new__(_StderrPump)
    pump.json_lines, pump._real = False, write_end
    harmless = ("[2026-12-01 21:34:34,065 E 2670 2670] core_worker.cc:2465: Actor with class name: "
                "'MapWorker(MapBatches(PoseStage))' and ID: '0f55e84237acf9a3268893c501000000' has constructor "
                "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of "
                "scope or are lost, the actor restart will fail.")
    for line in (harmless, "[2026-12-01 21:34:35,000 E 2670 2670] core_worker.cc:99: something else", "plain"):
        pump._emit(line)
    os.close(write_end)
    out = os.read(read_end, 1 << 16).decode()
    assert out == "[2026-12-01 21:34:35,000 E 2670 2670] core_worker.cc:99: something else\nplain\n"
    pump.json_lines = True
    read_end, pump._real = os.pipe()
    pump._emit(harmless)
    pump._emit("[2026-12-01 21:34:35,000 E 2670 2670] core_worker.cc:99: something else")
    os.close(pump._real)
    [record] = [json.loads(line) for line in os.read(read_end, 1 << 16).decode().splitlines()]
    assert (record["level"], record["logger"]) == ("ERROR", "ray.core")
