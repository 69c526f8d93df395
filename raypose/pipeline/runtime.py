"""Ray itself: the one `ray.init` of raypose, what the layout needs to know of the cluster, Ray's console output.

`start_ray` joins the cluster in RAY_ADDRESS (a Ray job's entrypoint, a KubeRay RayJob) or
starts an embedded single-machine Ray; `quiet_ray` brings Ray's own loggers in line with the
CLI's format and verbosity.
"""

from __future__ import annotations

import logging
import os
import sys

from raypose.config.spec import ResourcesSpec
from raypose.logs import LogFormat
from raypose.pipeline import watchdog
from raypose.pipeline.layout import ClusterShape

ACCELERATOR_PREFIX = "accelerator_type:"
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


# Ray kills a worker idle for 1 s once there are more workers than CPUs, which the pose actors
# alone are: each write task then started a fresh process (2-3 s of imports), the job's last one
# after the last pose batch. Kept a minute, an idle write (or crop) worker takes the next task.
EMBEDDED_RAY_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def start_ray(resources: ResourcesSpec) -> ClusterShape:
    """Connect to the Ray cluster this process should use, starting an embedded one if there is none; its shape."""
    import ray

    if not ray.is_initialized():
        # ray.init sets the `ray` logger's level: keep the one `quiet_ray` chose.
        level = logging.getLogger("ray").level or logging.INFO
        if os.environ.get("RAY_ADDRESS", "local") != "local":
            # On a cluster: join it without the embedded Ray's arguments (num_cpus), which ray.init refuses there.
            ray.init(log_to_driver=False, logging_level=level)
        else:
            # The embedded Ray's workers inherit this environment. glibc gives every thread that allocates an
            # arena of its own and keeps what is freed there: a pose actor labelling one image of 50,000 boxes
            # held 1.24 GiB with the default arenas, 0.71 with two (benchmarks/README.md). The cluster image
            # sets the same (infra/Dockerfile).
            os.environ.setdefault("MALLOC_ARENA_MAX", "2")
            ray.init(num_cpus=resources.num_cpus, include_dashboard=False, log_to_driver=False, logging_level=level,
                     _system_config=EMBEDDED_RAY_CONFIG)
            watchdog.start(os.getpid())  # the embedded Ray's processes end with this one, killed or not
    return cluster_shape()


def cluster_shape() -> ClusterShape:
    """The connected cluster's GPUs, its smallest CPU node, its GPU kinds and whether they (and its CPUs) run bfloat16."""
    import ray
    import torch

    alive = [node for node in ray.nodes() if node.get("Alive")]
    nodes = [node["Resources"] for node in alive]
    # Only this machine's CPU flags can be read here: a cluster with other machines is taken as without.
    here = ray.util.get_node_ip_address()
    local = bool(alive) and all(node.get("NodeManagerAddress") == here for node in alive)
    cpus = [int(resources.get("CPU", 0)) for resources in nodes]
    accelerators = sorted({name[len(ACCELERATOR_PREFIX):] for resources in nodes for name in resources
                           if name.startswith(ACCELERATOR_PREFIX)})
    return ClusterShape(
        gpus=float(ray.cluster_resources().get("GPU", 0.0)),
        node_cpus=min((c for c in cpus if c > 0), default=1),
        nodes=max(1, sum(c > 0 for c in cpus)),
        accelerators=tuple(accelerators),
        bf16=torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None,
        cpu_bf16=local and cpu_has_native_bf16(),
    )


def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU computes bfloat16 natively (AVX512-BF16 or AMX), as Linux reports it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Loggers that Ray configures with their own console handler (propagate=False).
RAY_CONSOLE_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


def quiet_ray(fmt: LogFormat = "text", quiet: bool = False, data: bool = True, verbose: bool = False) -> None:
    """Bring Ray's console output in line with the CLI's: same format and level, raypose's progress, not Ray Data's.

    Ray's `ray` and `ray.data` loggers print through their own console handlers, and ray.init
    resets those handlers' format; in JSON or quiet mode they are removed and the loggers
    propagate to the root logger instead; in text mode they are kept, writing to the current
    sys.stderr. With `data` (running a job, not only submitting one) Ray Data is imported, which
    installs its console handler, and its progress bars are turned off (raypose reports its own
    progress, `progress.py`) unless `verbose`; so is Ray's notice that token auth is on.
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
    if not verbose:
        # Ray's and Ray Data's INFO lines (the local instance started, execution plans, per-stage
        # progress) and the notice that token auth is on, printed at every embedded start: raypose's
        # own lines say what a person needs; --verbose shows them all.
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
        # A Dataset that stops logs its traceback twice; raypose says what stopped it in one line
        # (`run.pipeline_failure`), and --debug shows the traceback.
        for name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if data and (fmt == "json" or quiet or not verbose):
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
