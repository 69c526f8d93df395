"""The CLI: `raypose validate JOB.yaml`, `raypose submit JOB.yaml [--set key=value ...]`."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import typer

from raypose import __version__
from raypose.errors import RayposeError

app = typer.Typer(
    help="Batch pose annotation on Ray: images + boxes + ViTPose -> Parquet keypoint tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JobArg = Annotated[str, typer.Argument(help="Job YAML (see jobs/ and the README's job reference).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a spec field: --set pose.batch_size=64 (repeatable)."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"raypose {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """raypose: label images with keypoints at dataset scale."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def validate(job: JobArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Check a job without running it: spec, model config, images, boxes, output path."""
    from raypose.pipeline import plan_job
    from raypose.spec import load_job_spec

    with _errors_as_exit(debug):
        plan = plan_job(load_job_spec(job, set_ or []))
    c = plan.counts
    typer.echo(
        f"ok: {c['images_listed']} images ({c['images_with_boxes']} with boxes, {c['images_without_boxes']} without), "
        f"{c['boxes']} boxes, model {plan.model.model_id} "
        f"({plan.model.num_keypoints} keypoints, input {plan.model.input_size[0]}x{plan.model.input_size[1]}), "
        f"output {plan.spec.output.path}"
    )


@app.command()
def submit(job: JobArg, set_: SetOpt = None, debug: DebugOpt = False) -> None:
    """Run a job on an embedded local Ray (or the cluster in RAY_ADDRESS) and write its Parquet."""
    from raypose.pipeline import plan_job, run_job
    from raypose.spec import load_job_spec

    with _errors_as_exit(debug):
        plan = plan_job(load_job_spec(job, set_ or []))
        c = plan.counts
        typer.echo(
            f"job {plan.job_id}: {c['images_with_boxes']} images, {c['boxes']} boxes "
            f"({c['images_without_boxes']} images without boxes skipped)",
            err=True,
        )
        result = run_job(plan)
    c = result.counts
    typer.echo(
        f"done: {c['images_with_boxes']} images, {c['instances']} instances, {c['errors']} errors, "
        f"{result.crops_per_second:.1f} crops/s -> {result.output_path}"
    )


class _errors_as_exit:
    """Print a RayposeError as one line and exit with its code (traceback with --debug)."""

    def __init__(self, debug: bool):
        self.debug = debug

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or not isinstance(exc, RayposeError):
            return False
        if self.debug:
            return False
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code)


if __name__ == "__main__":
    sys.exit(app())
