"""The CLI: `raypose validate|submit JOB.yaml`, and `raypose export coco|render|inspect OUTPUT` over a job's output."""

from __future__ import annotations

import sys
from enum import Enum
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
    from raypose.logs import setup_logging

    setup_logging("text")  # INFO lines on stderr; `submit --log-format json/--quiet` changes them


@app.command()
def validate(
    job: JobArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Check that the job can resume its output (output.mode=resume), without running it.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: accept changed settings, as submit --force does.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Check a job without running it: spec, model config and weights, images, boxes, output path."""
    from raypose.job import Job

    with _errors_as_exit(debug):
        check = Job.from_yaml(job, set_ or []).validate(resume=resume, force=force)
    typer.echo(check.describe())


class LogFormat(str, Enum):
    text = "text"
    json = "json"


@app.command()
def submit(
    job: JobArg,
    set_: SetOpt = None,
    address: Annotated[
        Optional[str],
        typer.Option("--address", help="Run on the Ray cluster whose Jobs API (dashboard) is here, e.g. http://HEAD:8265."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="With --address: follow the job's log to its end, or print its id and return.")
    ] = True,
    runtime_env_json: Annotated[
        Optional[str],
        typer.Option("--runtime-env-json", help="With --address: JSON merged into the job's runtime_env, e.g. '{\"py_modules\": []}'."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or log lines: only the summary line (problems still on stderr).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also Ray's own output: Ray Data's progress bars per stage, Ray's notices.")
    ] = False,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="text, or json: one JSON object per line (for scheduled runs).")
    ] = LogFormat.text,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish an interrupted job: keep its committed shards (output.mode=resume).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="With --resume: resume even if the spec or the models changed.")
    ] = False,
    break_lease: Annotated[
        bool, typer.Option("--break-lease", help="Take the output from a run that still seems to write it "
                                                 "(only when that run is gone for good).")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a job on an embedded local Ray (or the cluster in RAY_ADDRESS, or at --address) and write its Parquet."""
    set_ = [*(set_ or []), *(["output.mode=resume"] if resume else [])]
    from raypose.logs import setup_logging

    fmt = LogFormat(log_format).value
    setup_logging(fmt, quiet, pump_stderr=True)
    with _submit_errors_as_exit(debug, fmt):
        if address is not None:
            from raypose.pipeline.cluster import run_remote

            code = run_remote(job, set_ or [], address, wait=wait, runtime_env_json=runtime_env_json,
                              quiet=quiet, log_format=fmt, debug=debug, force=force, break_lease=break_lease,
                              echo=typer.echo)
            raise typer.Exit(code)
        _submit_local(job, set_ or [], quiet, fmt, wait=wait, runtime_env_json=runtime_env_json, force=force,
                      verbose=verbose, break_lease=break_lease)


def _submit_local(job: str, overrides: list[str], quiet: bool, fmt: str, *, wait: bool,
                  runtime_env_json: Optional[str], force: bool = False, verbose: bool = False,
                  break_lease: bool = False) -> None:
    import json

    from raypose.errors import SpecError
    from raypose.job import Job
    from raypose.logs import flush_stderr
    from raypose.pipeline.runtime import quiet_ray

    if not wait or runtime_env_json is not None:
        raise SpecError(f"{'--no-wait' if not wait else '--runtime-env-json'}: only with --address (a cluster)")
    to_run = Job.from_yaml(job, overrides)  # a bad spec fails here, before Ray is imported
    quiet_ray(fmt, quiet, verbose=verbose)
    progress = "off" if quiet else "json" if fmt == "json" else "auto"
    result = to_run.run(progress=progress, force=force, break_lease=break_lease)
    flush_stderr()  # the summary is the last line
    c = result.counts
    if fmt == "json":
        typer.echo(json.dumps({
            "event": "job_summary", "job_id": result.job_id, "status": result.manifest.get("status"),
            "images": c["images"], "instances": c["instances"], "errors": c["errors"],
            "crops_per_second": result.crops_per_second, "output": result.output_path,
        }))
        return
    added = f" ({c['images_this_run']} this run)" if c["images_this_run"] != c["images"] else ""
    typer.echo(
        f"done: {c['images']} images{added}, {c['instances']} instances, {c['errors']} errors, "
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


class _submit_errors_as_exit(_errors_as_exit):
    """As _errors_as_exit; with --log-format json the error is one JSON object on stderr."""

    def __init__(self, debug: bool, fmt: str):
        super().__init__(debug)
        self.fmt = fmt

    def __exit__(self, kind, exc, tb):
        if self.fmt != "json" or exc is None or not isinstance(exc, RayposeError) or self.debug:
            return super().__exit__(kind, exc, tb)
        from raypose.logs import json_record

        typer.echo(json_record("ERROR", "raypose.cli", f"error: {exc}", event="job_error", exit_code=exc.exit_code),
                   err=True)
        raise typer.Exit(exc.exit_code)


@app.command("schema")
def schema_command(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the job spec's reference page (docs/job-spec.md) instead.")
    ] = False,
) -> None:
    """Print the JSON Schema of a job file, for editors and checkers (docs/job-spec.schema.json)."""
    from raypose.config.reference import job_json_schema_text, job_spec_markdown

    typer.echo(job_spec_markdown() if markdown else job_json_schema_text(), nl=False)


# --- Reading a job's output back: export, render, inspect (raypose/review/) ---

OutputArg = Annotated[str, typer.Argument(help="A job's output.path (local path or fsspec URL such as s3://b/out).")]
StorageOpt = Annotated[
    Optional[list[str]],
    typer.Option("--storage-option", help="fsspec option for reading OUTPUT, images and files: key=value (repeatable)."),
]
CorrectionsOpt = Annotated[
    str, typer.Option("--corrections", help="use: reviewed instances from corrections/ (raypose import); skip: predictions only.")
]
export_app = typer.Typer(help="Export a job's output to other formats.", no_args_is_help=True)


def _use_corrections(value: str) -> bool:
    """--corrections use|skip as a flag; anything else is an OutputError (inside `_errors_as_exit`)."""
    from raypose.review.reading import OutputError

    if value not in ("use", "skip"):
        raise OutputError(f"--corrections: expected use or skip, got {value!r}")
    return value == "use"
app.add_typer(export_app, name="export")


@export_app.command("coco")
def export_coco_command(
    output: OutputArg,
    to: Annotated[Optional[str], typer.Option("--to", help="Write the COCO keypoints dataset here.")] = None,
    results: Annotated[Optional[str], typer.Option("--results", help="Write COCO results (for COCOeval) here.")] = None,
    gt: Annotated[Optional[str], typer.Option("--gt", help="COCO file the boxes came from: image and category ids.")] = None,
    min_score: Annotated[float, typer.Option("--min-score", help="Keypoints scored above this are labeled (v=2).")] = 0.2,
    corrections: CorrectionsOpt = "use",
    storage_option: StorageOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write a COCO keypoints dataset (--to) and/or COCO results (--results) from a job's output."""
    from raypose.review.export import export_coco
    from raypose.review.reading import parse_storage_options

    with _errors_as_exit(debug):
        done = export_coco(output, to, results, gt=gt, min_score=min_score,
                          storage_options=parse_storage_options(storage_option),
                          corrections=_use_corrections(corrections))
    written = [p for p in (done["to"], done["results_path"]) if p]
    corrected = f", {done['corrected']} from reviewers' corrections" if done["corrected"] else ""
    if done["stale"]:
        typer.echo(f"warning: {done['stale']} corrections left out: their images were relabelled since the review",
                   err=True)
    typer.echo(f"exported: {done['images']} images, {done['annotations']} annotations{corrected}, "
               f"{done['categories']} categories -> {', '.join(written)}")


SampleOpt = Annotated[int, typer.Option("--sample", help="How many images.")]
OrderOpt = Annotated[str, typer.Option("--order", help="worst (lowest --by score first), best, name or random.")]
ByOpt = Annotated[str, typer.Option("--by", help="What worst and the score range go by: instance_score, flip_oks or instance_doubt (highest is worst).")]
MinScoreOpt = Annotated[Optional[float], typer.Option("--min-score", help="Only images with an instance whose --by score is at least this.")]
MaxScoreOpt = Annotated[Optional[float], typer.Option("--max-score", help="Only images with an instance whose --by score is at most this.")]
ExpertOpt = Annotated[Optional[str], typer.Option("--expert", help="Only images with an instance of this expert.")]
CategoryOpt = Annotated[Optional[str], typer.Option("--category", help="Only images with an instance of this category.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of --order random.")]


@export_app.command("label-studio")
def export_label_studio_command(
    output: OutputArg,
    out: Annotated[str, typer.Option("--out", help="Folder for tasks.json, label_config.xml (and images/).")],
    sample: SampleOpt = 100,
    order: OrderOpt = "worst",
    by: ByOpt = "instance_score",
    min_score: MinScoreOpt = None,
    max_score: MaxScoreOpt = None,
    expert: ExpertOpt = None,
    category: CategoryOpt = None,
    seed: SeedOpt = 0,
    keypoint_min_score: Annotated[float, typer.Option("--keypoint-min-score", help="Keypoints scored above this are shown (as export coco labels them).")] = 0.2,
    copy_images: Annotated[bool, typer.Option("--copy-images", help="Copy each image under OUT/images/ (tar members and Parquet rows too).")] = False,
    url_prefix: Annotated[str, typer.Option("--url-prefix", help="With --copy-images: the tasks' image URL before the file name.")] = "/data/local-files/?d=images/",
    storage_option: StorageOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Label Studio tasks with raypose's predictions for the chosen images, and the labeling config (skeleton included)."""
    from raypose.review.labelstudio import export_label_studio
    from raypose.review.reading import parse_storage_options
    from raypose.review.selection import Selection

    selection = Selection(sample=sample, order=order, by=by, min_score=min_score, max_score=max_score, expert=expert,
                          category=category, seed=seed)
    with _errors_as_exit(debug):
        done = export_label_studio(output, out, selection=selection, min_score=keypoint_min_score,
                                   copy_images=copy_images, url_prefix=url_prefix,
                                   storage_options=parse_storage_options(storage_option))
    for problem in done["problems"]:
        typer.echo(f"warning: {problem}", err=True)
    typer.echo(f"exported: {done['tasks']} tasks ({done['instances']} instances) of {done['matching']} matching images "
               f"-> {out.rstrip('/')}/tasks.json, label_config.xml")


@export_app.command("cvat")
def export_cvat_command(
    output: OutputArg,
    out: Annotated[str, typer.Option("--out", help="Folder for cvat_labels.json, annotations/ (and images/).")],
    sample: SampleOpt = 100,
    order: OrderOpt = "worst",
    by: ByOpt = "instance_score",
    min_score: MinScoreOpt = None,
    max_score: MaxScoreOpt = None,
    expert: ExpertOpt = None,
    category: CategoryOpt = None,
    seed: SeedOpt = 0,
    keypoint_min_score: Annotated[float, typer.Option("--keypoint-min-score", help="Keypoints scored above this are labeled (v=2).")] = 0.2,
    corrections: CorrectionsOpt = "use",
    copy_images: Annotated[bool, typer.Option("--copy-images", help="Copy each image under OUT/images/ to create the CVAT task from.")] = False,
    storage_option: StorageOpt = None,
    debug: DebugOpt = False,
) -> None:
    """CVAT: COCO Keypoints 1.0 annotations for the chosen images, and the skeleton labels to create first."""
    from raypose.review.cvat import export_cvat
    from raypose.review.reading import parse_storage_options
    from raypose.review.selection import Selection

    selection = Selection(sample=sample, order=order, by=by, min_score=min_score, max_score=max_score, expert=expert,
                          category=category, seed=seed)
    with _errors_as_exit(debug):
        done = export_cvat(output, out, selection=selection, min_score=keypoint_min_score,
                           corrections=_use_corrections(corrections), copy_images=copy_images,
                           storage_options=parse_storage_options(storage_option))
    for problem in done["problems"]:
        typer.echo(f"warning: {problem}", err=True)
    typer.echo(f"exported: {done['images']} images, {done['annotations']} annotations of {done['matching']} matching "
               f"images -> {out.rstrip('/')}/cvat_labels.json, annotations/person_keypoints_default.json")


import_app = typer.Typer(help="Take reviewers' corrections back into a job's output (its corrections/ table).",
                         no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("label-studio")
def import_label_studio_command(
    output: OutputArg,
    export: Annotated[str, typer.Argument(help="A Label Studio project's JSON export (tasks with annotations).")],
    storage_option: StorageOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Add a Label Studio export's annotations to OUTPUT/corrections/ (importing one export twice changes nothing)."""
    from raypose.review.labelstudio import import_label_studio
    from raypose.review.reading import parse_storage_options

    with _errors_as_exit(debug):
        done = import_label_studio(output, export, storage_options=parse_storage_options(storage_option))
    for problem in done["problems"]:
        typer.echo(f"not placed: {problem}", err=True)
    typer.echo(f"imported: {done['annotations']} annotations of {done['tasks']} tasks, {done['instances']} instances; "
               f"{done['added']} new correction rows, {len(done['problems'])} items not placed")


@app.command("render")
def render_command(
    output: OutputArg,
    out: Annotated[str, typer.Option("--out", help="Folder for the QA page (index.html), its pictures and pages.")],
    images: Annotated[Optional[str], typer.Option("--images", help="Read images from here + image_key instead of image_uri.")] = None,
    sample: SampleOpt = 50,
    order: OrderOpt = "worst",
    by: ByOpt = "instance_score",
    min_score: MinScoreOpt = None,
    max_score: MaxScoreOpt = None,
    expert: ExpertOpt = None,
    category: CategoryOpt = None,
    keypoint_threshold: Annotated[
        float, typer.Option("--keypoint-threshold", help="Draw keypoints and limbs scored above this.")
    ] = 0.3,
    seed: SeedOpt = 0,
    storage_option: StorageOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Draw a job's images for review, worst first, with a QA page (index.html) and a page per image."""
    from raypose.review.reading import parse_storage_options
    from raypose.review.render import render_output
    from raypose.review.selection import Selection

    selection = Selection(sample=sample, order=order, by=by, min_score=min_score, max_score=max_score, expert=expert,
                          category=category, seed=seed)
    with _errors_as_exit(debug):
        rendered = render_output(output, out, images=images, selection=selection,
                                 keypoint_threshold=keypoint_threshold,
                                 storage_options=parse_storage_options(storage_option))
    problems = [r for r in rendered if r.problem]
    for r in problems:
        typer.echo(f"warning: {r.image_key}: {r.problem}", err=True)
    drawn = sum(1 for r in rendered if r.file)
    typer.echo(f"rendered: {drawn} of {len(rendered)} chosen images -> {out.rstrip('/')}/index.html")
    from raypose.review.render_video import render_video_clips

    with _errors_as_exit(debug):
        clips = render_video_clips(output, out, keypoint_threshold=keypoint_threshold,
                                   storage_options=parse_storage_options(storage_option))
    if clips:  # an output of videos: a short clip each, skeletons drawn, a colour per track
        for clip in clips:
            if clip.problem:
                typer.echo(f"warning: {clip.video}: {clip.problem}", err=True)
        typer.echo(f"rendered: {sum(1 for c in clips if c.file)} of {len(clips)} videos as clips "
                   f"-> {out.rstrip('/')}/videos.html")


@app.command("inspect")
def inspect_command(
    output: OutputArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    storage_option: StorageOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Summarize a job: status, model, counts, errors by stage and reason, keypoint scores, speed, spec."""
    from raypose.review.reading import parse_storage_options
    from raypose.review.summary import format_json, format_text, summarize

    with _errors_as_exit(debug):
        summary = summarize(output, storage_options=parse_storage_options(storage_option))
    typer.echo(format_json(summary) if as_json else format_text(summary), nl=as_json)


# --- Making checkpoints raypose can serve (raypose/models/convert.py) ---

convert_app = typer.Typer(help="Convert checkpoints from other formats to transformers ViTPose folders.",
                          no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("vitpose-plus")
def convert_vitpose_plus(
    checkpoint: Annotated[str, typer.Argument(help="An original ViTPose++ .pth (ViTAE-Transformer/ViTPose), all six heads.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (with --all: one subfolder per dataset).")],
    dataset: Annotated[
        Optional[str], typer.Option("--dataset", help="coco, aic, mpii, ap10k, apt36k or wholebody.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Convert all six datasets into OUT/<dataset>.")] = False,
    num_heads: Annotated[
        Optional[int], typer.Option("--num-heads", help="Attention heads (default: from the embedding size, as ViTPose++-S/B/L/H).")
    ] = None,
    input_size: Annotated[str, typer.Option("--input-size", help="Model input HEIGHTxWIDTH.")] = "256x192",
    debug: DebugOpt = False,
) -> None:
    """Fold one ViTPose++ expert into a dense ViTPose with its own dataset's head (as the original model_split.py)."""
    from raypose.models.convert import DATASETS, ConvertError
    from raypose.models.convert import convert_vitpose_plus as run_convert

    with _errors_as_exit(debug):
        if all_ == (dataset is not None):
            raise ConvertError("give either --dataset NAME or --all")
        try:
            height, width = (int(v) for v in input_size.lower().split("x"))
        except ValueError:
            raise ConvertError(f"--input-size: expected HEIGHTxWIDTH such as 256x192, got {input_size!r}") from None
        written = run_convert(checkpoint, out, list(DATASETS) if all_ else [dataset], num_attention_heads=num_heads,
                              image_size=(height, width), into_subfolders=all_)
    for folder in written:
        typer.echo(f"converted: {folder} ({folder.name if all_ else dataset})")


if __name__ == "__main__":
    sys.exit(app())
