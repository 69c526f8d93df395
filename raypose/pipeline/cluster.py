"""`raypose submit JOB --address http://HEAD:8265`: run a job on a Ray cluster through the Ray Jobs API.

What travels, and how:

* the spec: parsed and validated here (fields only), then written, resolved (absolute paths,
  overrides applied, defaults filled), as `raypose-job.json` into a fresh directory that is the
  job's runtime_env `working_dir`. Ray zips it into the cluster's internal store; the entrypoint
  runs in its unpacked copy. Not in the entrypoint and not in an env var, because both are
  shown by the dashboard and `ray job list` to anyone who can reach the cluster;
* the code: the local `raypose` package directory as a runtime_env `py_modules` entry, so the
  cluster runs the code that submitted the job (its Python needs raypose's dependencies: use
  the image in infra/). `--runtime-env-json '{"py_modules": []}'` runs the raypose installed
  on the cluster instead;
* the entrypoint: `python -m raypose.cli submit raypose-job.json [--quiet] [--log-format json]`,
  i.e. the ordinary local run, which on the cluster finds the cluster in RAY_ADDRESS. It plans
  the job there (model config, listing, boxes, output check), because the cluster may see
  storage and credentials that this machine does not; a spec problem found there ends the job
  with exit code 2, which `submit` returns.

Exit codes: SUCCEEDED -> 0, FAILED -> the entrypoint's exit code when it is 1 or 2 (2: the spec or
its inputs are wrong), else 1; STOPPED -> 1. Nothing here prints or logs storage options.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO
from urllib.parse import urlparse

import yaml

import raypose
from raypose import __version__
from raypose.config.paths import local_paths
from raypose.config.spec import JobSpec, apply_override, load_job_spec, redact
from raypose.errors import ClusterError, SpecError
from raypose.logs import as_json_line
from raypose.output.resume import JOB_ID_ENV, new_job_id
from raypose.pipeline.runtime import quiet_ray

log = logging.getLogger(__name__)

SPEC_FILE = "raypose-job.json"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass
class Submission:
    """A job ready to go to a cluster: what runs, where, and with what."""

    spec: JobSpec
    address: str
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)


# --- building the submission (no network) ----------------------------------------------


def normalize_address(address: str) -> str:
    """`head:8265` -> `http://head:8265`; http(s) addresses pass through."""
    address = address.strip().rstrip("/")
    if not address:
        raise SpecError("--address: expected the Ray dashboard address, e.g. http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    if urlparse(address).scheme not in ("http", "https"):
        raise SpecError(
            f"--address {address!r}: expected the Ray dashboard's http(s) address (the Jobs API, "
            "port 8265 by default), e.g. http://HEAD:8265"
        )
    return address


def is_loopback(address: str) -> bool:
    """Is the cluster on this machine (so its nodes see this machine's files)?"""
    host = (urlparse(address).hostname or "").lower()
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def read_raw_spec(job: str | os.PathLike, overrides: list[str]) -> dict[str, Any]:
    """The job file as written, with --set applied: to tell which paths were relative."""
    raw = yaml.safe_load(Path(job).read_text(encoding="utf-8")) or {}
    for override in overrides:
        apply_override(raw, override)
    return raw


def has_credentials(spec: JobSpec) -> list[str]:
    """Sections whose storage_options hold credential-like values."""
    data = spec.model_dump(mode="json")
    return [
        section
        for section in ("images", "boxes", "output")
        if (data.get(section) or {}).get("storage_options")
        and redact(data[section]["storage_options"]) != data[section]["storage_options"]
    ]


def package_dir() -> str:
    """The directory of the raypose package that is running (uploaded as a py_module)."""
    return str(Path(raypose.__file__).resolve().parent)


def build_runtime_env(working_dir: str, override: dict[str, Any] | None = None) -> dict[str, Any]:
    """raypose's runtime_env, with the user's --runtime-env-json merged on top.

    `env_vars` are merged, `excludes` extended, any other key replaced; `py_modules: []` drops
    the upload (use the cluster's installed raypose). `working_dir` is raypose's: it carries the spec.
    """
    env: dict[str, Any] = {
        "working_dir": working_dir,
        "py_modules": [package_dir()],
        "excludes": ["__pycache__/", "*.pyc"],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    for key, value in (override or {}).items():
        if key == "working_dir":
            raise SpecError(
                "--runtime-env-json: working_dir is taken: raypose uses it to carry the job spec; "
                "ship extra code with py_modules"
            )
        if key == "env_vars":
            if not isinstance(value, dict):
                raise SpecError("--runtime-env-json: env_vars: expected a mapping of names to strings")
            env["env_vars"] = {**env["env_vars"], **{str(k): str(v) for k, v in value.items()}}
        elif key == "excludes":
            if not isinstance(value, list):
                raise SpecError("--runtime-env-json: excludes: expected a list of patterns")
            env["excludes"] = [*env["excludes"], *value]
        else:
            env[key] = value
    if not env.get("py_modules"):
        env.pop("py_modules", None)
    return env


def parse_runtime_env_json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"--runtime-env-json: not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise SpecError(f"--runtime-env-json: expected a JSON object, got {type(value).__name__}")
    return value


def entrypoint_command(quiet: bool = False, log_format: str = "text", debug: bool = False,
                       force: bool = False, break_lease: bool = False) -> str:
    """The command the cluster runs: the ordinary local run, on the cluster's Ray."""
    args = ["python", "-m", "raypose.cli", "submit", SPEC_FILE]
    if force:
        args.append("--force")
    if break_lease:
        args.append("--break-lease")
    if quiet:
        args.append("--quiet")
    if log_format != "text":
        args += ["--log-format", log_format]
    if debug:
        args.append("--debug")
    return shlex.join(args)


def prepare(
    job: str | os.PathLike,
    overrides: list[str],
    address: str,
    *,
    runtime_env_json: str | None = None,
    quiet: bool = False,
    log_format: str = "text",
    debug: bool = False,
    force: bool = False,
    break_lease: bool = False,
) -> tuple[Submission, dict[str, Any]]:
    """Validate the spec's fields and decide what to send; returns the submission and the spec data.

    Raises SpecError (exit 2) for a bad spec, and for paths relative to this machine when the
    cluster is elsewhere; absolute local paths on a remote cluster are allowed with a warning
    (they must be mounted at the same place on every node).
    """
    address = normalize_address(address)
    spec = load_job_spec(job, overrides)
    raw = read_raw_spec(job, overrides)
    override = parse_runtime_env_json(runtime_env_json)
    warnings = []
    if not is_loopback(address):
        paths = local_paths(raw, Path(job).resolve().parent)
        relative = [f"{name}: {value!r}" for name, value, rel in paths if rel]
        if relative:
            raise SpecError(
                f"{'; '.join(relative)}: a path relative to this machine, but the cluster at {address} "
                "runs elsewhere; use a URL (s3://...) or an absolute path that every cluster node mounts"
            )
        for name, value, _ in paths:
            warnings.append(
                f"{name} {value!r} is a local path: every node of the cluster must see it at that path"
            )
    secrets = has_credentials(spec)
    if secrets:
        warnings.append(
            f"{', '.join(s + '.storage_options' for s in secrets)} hold credentials: they travel inside the "
            "job's working_dir package, readable by anyone who can reach the cluster; prefer the cluster's "
            "own credentials (instance role, IRSA, env on the nodes)"
        )
    submission = Submission(
        spec=spec,
        address=address,
        submission_id=new_job_id(spec.name),
        entrypoint=entrypoint_command(quiet=quiet, log_format=log_format, debug=debug, force=force,
                                      break_lease=break_lease),
        runtime_env=build_runtime_env("<spec dir>", override),
        metadata={"raypose_name": spec.name, "raypose_version": __version__,
                  "raypose_spec_fingerprint": spec.fingerprint()},
        warnings=warnings,
    )
    # Every local path in the spec is absolute already (config.paths): it parses the same on the cluster.
    return submission, spec.model_dump(mode="json")


# --- talking to the cluster ----------------------------------------------------------------


def auth_headers() -> dict[str, str]:
    """Ray's token (token authentication, Ray 2.52+) as a Bearer header, found where Ray looks for it.

    RAY_AUTH_TOKEN, else the file in RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; none with
    RAY_AUTH_MODE=disabled or when there is no token. Never printed.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        try:
            token = Path(path).read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError from the version check
        message = " ".join(str(exc).split())
        if len(message) > 300:
            message = message[:297] + "..."
        raise ClusterError(f"--address {address}: cannot use the Ray Jobs API there: {message}") from exc


def submit(submission: Submission, spec_data: dict[str, Any], client=None) -> str:
    """Upload the spec and the package, start the job; returns the submission id."""
    client = client or connect(submission.address)
    spec_dir = tempfile.mkdtemp(prefix="raypose-submit-")
    try:
        Path(spec_dir, SPEC_FILE).write_text(json.dumps(spec_data, indent=2))
        runtime_env = {**submission.runtime_env, "working_dir": spec_dir}
        # The run on the cluster takes the submission id as its job_id: one id in the dashboard and the table.
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), JOB_ID_ENV: submission.submission_id}
        try:
            return client.submit_job(
                entrypoint=submission.entrypoint,
                submission_id=submission.submission_id,
                runtime_env=runtime_env,
                metadata=submission.metadata,
            )
        except Exception as exc:
            message = " ".join(str(exc).split())[:300]
            raise ClusterError(f"the cluster at {submission.address} refused the job: {message}") from exc
    finally:
        shutil.rmtree(spec_dir, ignore_errors=True)


def follow(client, submission_id: str, on_line: Callable[[str], None] | None = None, poll_s: float = 1.0,
           timeout_s: float | None = None) -> Any:
    """Pass the job's log, line by line, to `on_line` as it is written, until the job ends.

    Streams through the Jobs API's websocket (`tail_job_logs`); if that fails (a proxy that
    drops websockets), polls `get_job_logs` for what is new. Returns the job's JobDetails.
    """
    on_line = on_line or (lambda line: print(line, flush=True))
    received = 0
    pending = ""

    def feed(text: str) -> None:
        nonlocal received, pending
        received += len(text)
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            on_line(line)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            feed(chunk)

    started = time.monotonic()
    streamed = True
    try:
        asyncio.run(tail())
    except Exception as exc:  # fall back to polling from where the stream stopped
        log.debug("log stream failed (%s); polling", exc)
        streamed = False
    while True:
        status = _value(client.get_job_status(submission_id))
        if not streamed or status in TERMINAL:
            feed(client.get_job_logs(submission_id)[received:])
        if status in TERMINAL:
            break
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise ClusterError(f"job {submission_id}: still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    if pending:
        on_line(pending)
    return client.get_job_info(submission_id)


def relay(log_format: str = "text", quiet: bool = False, out: TextIO | None = None,
          err: TextIO | None = None) -> Callable[[str], None]:
    """What `submit --address` does with each line of the job's log.

    text: print it. json: print it as a JSON object (lines from Ray's job manager are wrapped).
    quiet: only the run's summary line (`done: ...` or the `job_summary` object) on stdout and
    its `error: ...` line on stderr; the full log stays on the cluster (`ray job logs ID`).
    """

    def emit(line: str) -> None:
        stream_out = out or sys.stdout
        stream_err = err or sys.stderr
        text = as_json_line(line) if log_format == "json" and line.strip() else line
        if quiet:
            if log_format == "json":
                try:
                    event = json.loads(text).get("event") if text.strip() else None
                except ValueError:
                    event = None
                target = stream_out if event == "job_summary" else stream_err if event == "job_error" else None
            else:
                target = stream_out if line.startswith("done: ") else stream_err if line.startswith("error: ") else None
            if target is None:
                return
            stream_out = target
        stream_out.write(text + "\n")
        stream_out.flush()

    return emit


def _value(status) -> str:
    return str(getattr(status, "value", status))


def exit_code(details) -> int:
    """SUCCEEDED -> 0; FAILED -> the entrypoint's 1 or 2 (2: spec/input problem), else 1; STOPPED -> 1."""
    status = _value(details.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(details, "driver_exit_code", None)
    if code is None:  # older Ray: the message says "... failed with exit code N ..."
        found = re.search(r"exit code (\d+)", details.message or "")
        code = int(found.group(1)) if found else None
    return code if code in (1, 2) else 1


def describe(details) -> str:
    status = _value(details.status)
    message = (details.message or "").split("\n", 1)[0].split(", last available logs")[0]
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{status}" + (f": {message}" if message and status != "SUCCEEDED" else "")


def run_remote(
    job: str,
    overrides: list[str],
    address: str,
    *,
    wait: bool = True,
    runtime_env_json: str | None = None,
    quiet: bool = False,
    log_format: str = "text",
    debug: bool = False,
    force: bool = False,
    break_lease: bool = False,
    out: TextIO | None = None,
    echo: Callable[[str], None] = print,
) -> int:
    """The whole `submit --address`: prepare, submit, then follow the log and return the exit code."""
    submission, spec_data = prepare(job, overrides, address, runtime_env_json=runtime_env_json,
                                    quiet=quiet, log_format=log_format, debug=debug, force=force,
                                    break_lease=break_lease)
    quiet_ray(log_format, quiet, data=False)
    for warning in submission.warnings:
        log.warning(warning, extra={"event": "submit_warning"})
    client = connect(submission.address)
    submission_id = submit(submission, spec_data, client)
    log.info(
        "submitted %s to %s", submission_id, submission.address,
        extra={"event": "job_submitted", "submission_id": submission_id, "address": submission.address,
               "entrypoint": submission.entrypoint},
    )
    if not wait:
        echo(submission_id)
        return 0
    try:
        details = follow(client, submission_id, relay(log_format, quiet, out=out))
    except KeyboardInterrupt:
        log.warning(
            "stopped following %s; it goes on running (ray job stop --address %s %s)",
            submission_id, submission.address, submission_id,
            extra={"event": "job_detached", "submission_id": submission_id},
        )
        return 130
    code = exit_code(details)
    log.log(
        logging.INFO if code == 0 else logging.ERROR,
        "job %s %s", submission_id, describe(details),
        extra={"event": "job_ended", "submission_id": submission_id,
               "status": _value(details.status), "exit_code": code},
    )
    return code
