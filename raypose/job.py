"""A job from Python: the same spec, checks and run as `raypose validate` and `raypose submit`.

    job = raypose.Job.from_yaml("jobs/quickstart.yaml", overrides={"output.path": "/tmp/out"})
    job.validate()            # everything checked, nothing started: counts, experts, shards
    result = job.run()        # on the Ray this process uses (an embedded one if none)

The CLI is a thin layer over this: the same errors (raypose.RayposeError and its subclasses, each with
the CLI's exit code) and the same results.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from raypose.config.paths import resolve_paths
from raypose.config.spec import JobSpec, apply_overrides, load_job_spec, parse_job_spec

if TYPE_CHECKING:
    from raypose.pipeline.plan import JobPlan
    from raypose.pipeline.run import JobResult

Overrides = Union[Sequence[str], Mapping[str, Any]]
# How a run reports its progress: not at all (None, "off"), a line on a terminal or log lines ("auto": a
# line redrawn in place where stderr is a terminal, else a log line every 30 s), JSON records ("json"), or a
# function called with the numbers of the moment (images done and total, instances, errors, crops/s, ETA).
ProgressOption = Union[None, Literal["off", "auto", "terminal", "log", "json"], Callable[[dict[str, Any]], None]]


@dataclass(frozen=True)
class ExpertCheck:
    """One expert as the checks found it: its checkpoint and what it takes and gives."""

    model: str
    revision: str | None
    num_keypoints: int
    input_size: tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class JobCheck:
    """What `Job.validate` found: the inputs counted, the experts and the output's shards."""

    counts: dict[str, int]
    experts: dict[str, ExpertCheck]
    output_path: str
    mode: str  # output.mode
    shards_to_write: int
    shards_kept: int  # committed by earlier runs, kept (resume, append)
    builds_on: bool  # whether the run builds on an earlier run's output (resume, append)

    def describe(self) -> str:
        """One line, as `raypose validate` prints it."""
        c = self.counts
        detect = f", {c['images_to_detect']} to detect" if c["images_to_detect"] else ""
        experts = "; ".join(f"expert {name}: {e.model} ({e.num_keypoints} keypoints, "
                            f"input {e.input_size[0]}x{e.input_size[1]})" for name, e in self.experts.items())
        earlier = ""
        if self.builds_on:
            changed = f" ({c['images_superseded']} changed since)" if c["images_superseded"] else ""
            earlier = (f"; {self.mode}: {self.shards_kept} shards committed, {c['images_kept']} images in them kept, "
                       f"{c['images']} to label in {self.shards_to_write} new shards{changed}")
        partial = "" if c.get("listing_complete", True) else (
            f"; listing: the first {c['images_listed']} images only (a run lists them all and joins the rest of "
            "the boxes as it goes)")
        videos = f"{c['videos']} videos ({c['videos_failed']} that cannot be read), their " if "videos" in c else ""
        return (f"ok: {videos}{c['images_listed']} {'frames' if videos else 'images'} ({c['images_with_boxes']} with boxes, "
                f"{c['images_without_boxes']} without{detect}), {c['boxes']} boxes; {experts}; "
                f"output {self.output_path}{earlier}{partial}")


class Job:
    """A validated job spec, ready to check (`validate`) or run (`run`)."""

    def __init__(self, spec: JobSpec):
        """Wrap a JobSpec (see `from_yaml`, `from_dict` and `from_spec`)."""
        self.spec = spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Overrides = ()) -> Job:
        """A job from a YAML file; `overrides` maps dotted keys to values (`{"pose.batch_size": 64}`) or is
        `--set` strings (`["pose.batch_size=64"]`). Relative paths: the file's relative to the file, the
        overrides' relative to the working directory."""
        return cls(load_job_spec(path, overrides))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], overrides: Overrides = (), base: str | os.PathLike | None = None
                  ) -> Job:
        """A job from plain data shaped as the YAML; relative paths are relative to `base` (default: the
        working directory)."""
        raw = copy.deepcopy(dict(data))
        resolve_paths(raw, Path(base) if base is not None else Path.cwd())
        return cls(parse_job_spec(apply_overrides(raw, overrides)))

    @classmethod
    def from_spec(cls, spec: JobSpec, overrides: Overrides = ()) -> Job:
        """A job from a JobSpec (the config objects), with optional overrides."""
        if not overrides:
            return cls(spec)
        return cls.from_dict(spec.model_dump(mode="json"), overrides)

    def validate(self, *, resume: bool = False, force: bool = False) -> JobCheck:
        """Check everything that can be checked without Ray (models, images, boxes, output) and start nothing.

        With `resume`, check that the job can resume its output (`force`: accept changed settings).
        Raises a RayposeError (SpecError, LeaseHeld, ...) naming what to fix.
        """
        from raypose.pipeline.plan import plan_job

        plan = plan_job(self._spec(resume), force=force)
        return _check_of(plan)

    def run(self, progress: ProgressOption = None, *, resume: bool = False, force: bool = False,
            break_lease: bool = False) -> JobResult:
        """Run the job on the Ray this process uses (an embedded one if none) and return what it wrote.

        `resume` keeps the shards an earlier run committed (`force`: even if settings changed);
        `break_lease` takes the output from a run that still seems to write it. Raises JobFailed when
        the run fails (every input failed, too many errors, workers died), with the shards committed so far kept.
        """
        from raypose.pipeline.plan import plan_job
        from raypose.pipeline.progress import Progress
        from raypose.pipeline.run import run_job

        reporter = Progress.of(0, progress)  # a wrong option fails here, before the plan takes the output
        plan = plan_job(self._spec(resume), force=force, run=True, break_lease=break_lease)
        reporter.total = plan.images
        reporter.planned(plan.job_id, plan.counts, len(plan.shards.to_write), len(plan.shards.reused))
        return run_job(plan, progress=reporter)

    def _spec(self, resume: bool) -> JobSpec:
        if not resume or self.spec.output.mode == "resume":
            return self.spec
        return self.spec.model_copy(update={"output": self.spec.output.model_copy(update={"mode": "resume"})})


def _check_of(plan: JobPlan) -> JobCheck:
    experts = {name: ExpertCheck(model=e.model.model_id, revision=e.model.revision,
                                 num_keypoints=e.model.num_keypoints, input_size=tuple(e.input_size))
               for name, e in plan.routing.experts.items()}
    return JobCheck(counts=dict(plan.counts), experts=experts, output_path=plan.spec.output.path,
                    mode=plan.spec.output.mode, shards_to_write=len(plan.shards.to_write),
                    shards_kept=len(plan.shards.reused), builds_on=plan.previous is not None)
