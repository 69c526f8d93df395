"""Every snippet of README.md and docs/ holds: Python blocks run in order (querying.md against a real job's output,
local and s3://; python.md and the README's from a copy of jobs/), raypose command lines parse as the CLI takes them,
YAML blocks are valid job specs or fragments of one, the README's quickstart and output tree are what a run gives."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import REPO, s3_bucket
from job_output import DOG_SCHEMA, NESTED_KEY, shared_job

from raypose.imaging.keypoint_schemas import COCO17, SCHEMAS

DOC = REPO / "docs" / "querying.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def blocks(text: str, language: str) -> list[str]:
    """The fenced blocks of one language (`""` for untagged ones)."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def run_blocks(path, ns: dict) -> dict:
    """Run a page's Python blocks in order in `ns`, naming the block that fails."""
    for i, block in enumerate(python_blocks(path.read_text())):
        try:
            exec(compile(block, f"{path.name} block {i + 1}", "exec"), ns)
        except Exception as exc:
            raise AssertionError(f"block {i + 1} of {path.name} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    return ns


@pytest.fixture(scope="module")
def job(ray_session, tmp_path_factory, coco_folder, tiny_checkpoint):
    return shared_job(tmp_path_factory, coco_folder, tiny_checkpoint)


@pytest.fixture(scope="module")
def s3_output(job, s3_server):
    """The job's output copied into a bucket on the session's moto S3 server (127.0.0.1)."""
    s3fs = pytest.importorskip("s3fs")
    options = s3_bucket(s3_server, "raypose-docs")
    s3fs.S3FileSystem(**options).put(str(job.output), "raypose-docs/labels/run1", recursive=True)
    return s3_server, "s3://raypose-docs/labels/run1"


def test_the_page_has_every_recipe_the_issue_asks_for():
    text = DOC.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 8
    code = "\n".join(blocks)
    for needle in ("import duckdb", "import polars", "import pandas", "keypoint_schemas.json", 'metadata[b"raypose"]',
                   "annotation_id", "wrist", "ERRORS", "s3://", "register_filesystem", "instance_doubt", "flip_oks",
                   "keypoint_flip_error"):
        assert needle in code, needle
    # names come from the data, never typed in (comments may show them)
    code = re.sub(r"#.*$", "", code, flags=re.MULTILINE)
    for name in COCO17.keypoints:
        assert f'"{name}"' not in code and f"'{name}'" not in code, name
    assert "range(1, 18)" not in code and "17" not in code and "coco17" not in code


def test_every_snippet_runs_against_a_real_output(job, s3_output, monkeypatch, capsys):
    endpoint, s3_url = s3_output
    monkeypatch.setenv("RAYPOSE_OUTPUT", str(job.output))
    monkeypatch.setenv("RAYPOSE_COCO_JSON", str(job.gt))
    monkeypatch.setenv("RAYPOSE_S3_OUTPUT", s3_url)
    # the S3 recipe uses the default credential chain: give it moto's endpoint through the environment
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.chdir(job.output.parent)

    ns: dict = {"__name__": "querying_md"}
    for i, block in enumerate(python_blocks(DOC.read_text())):
        try:
            exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), ns)
        except Exception as exc:  # name the failing block
            raise AssertionError(f"block {i + 1} of {DOC.name} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    capsys.readouterr()

    table = pq.read_table(job.output / "keypoints")
    rows = table.to_pylist()
    errors = pq.read_table(job.output / "errors").to_pylist()
    n_per_image = Counter(r["image_key"] for r in rows)
    # expected per-name means and low wrists, computed here from the schemas in raypose itself
    expected_means = {}
    low = []
    for schema_name in sorted({r["keypoint_schema"] for r in rows}):
        names = SCHEMAS[schema_name].keypoints
        scores = np.array([r["keypoint_score"] for r in rows if r["keypoint_schema"] == schema_name])
        for k, name in enumerate(names):
            expected_means[(schema_name, k, name)] = scores[:, k].mean()
        wrist = [k for k, name in enumerate(names) if name in ("left_wrist", "right_wrist")]
        low += [(r["image_key"], r["instance_index"]) for r in rows if r["keypoint_schema"] == schema_name
                and wrist and min(r["keypoint_score"][k] for k in wrist) < 0.3]
    low.sort()
    assert {r["keypoint_schema"] for r in rows} == {"coco17", DOG_SCHEMA}

    assert sorted(ns["schemas"]) == ["ap10k17", "coco17"]
    assert ns["keypoint_names"].num_rows == 34
    assert ns["wrists"] == {"coco17": [9, 10], "ap10k17": []}
    assert ns["meta"]["job_id"] == rows[0]["job_id"]

    def means(frame, key="mean_score"):
        columns = zip(frame["keypoint_schema"], frame["k"], frame["keypoint"], frame[key])
        return {(s, int(k), n): v for s, k, n, v in columns}

    def close(got, want):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)

    # DuckDB
    per_image = ns["per_image"]
    assert dict(zip(per_image["image_key"], per_image["instances"])) == n_per_image
    assert len(n_per_image) == 4 and n_per_image[NESTED_KEY] == 1
    close(means(ns["mean_by_name"]), expected_means)
    assert sorted(zip(ns["low_wrists"]["image_key"], ns["low_wrists"]["instance_index"])) == low
    by_reason = ns["errors_by_reason"]
    assert by_reason["n"].sum() == len(errors) == 3
    assert Counter(dict(zip(by_reason["stage"], by_reason["n"]))) == Counter(e["stage"] for e in errors)

    # Polars
    per_image_pl = ns["per_image_pl"]
    assert dict(zip(per_image_pl["image_key"].to_list(), per_image_pl["instances"].to_list())) == n_per_image
    close(means(ns["mean_by_name_pl"].to_dict(as_series=False)), expected_means)
    low_pl = ns["low_wrists_pl"]
    assert sorted(zip(low_pl["image_key"].to_list(), low_pl["instance_index"].to_list())) == low
    assert ns["errors_pl"]["n"].sum() == len(errors)

    # pandas
    assert ns["per_image_pd"]["instances"].to_dict() == n_per_image
    close(means(ns["mean_by_name_pd"], "score"), expected_means)
    assert sorted(zip(ns["low_wrists_pd"]["image_key"], ns["low_wrists_pd"]["instance_index"])) == low
    assert ns["errors_pd"]["n"].sum() == len(errors)

    # the flip columns (the shared job runs with pose.uncertainty: flip)
    assert all(r["instance_doubt"] is not None for r in rows)
    doubt = sorted(((-r["instance_doubt"], r["image_key"], r["instance_index"]) for r in rows))
    assert list(zip(ns["to_review"]["image_key"], ns["to_review"]["instance_index"])) == [d[1:] for d in doubt[:50]]
    assert sorted(zip(ns["confident_but_inconsistent"]["image_key"], ns["confident_but_inconsistent"]["instance_index"])) \
        == sorted((r["image_key"], r["instance_index"]) for r in rows if r["instance_score"] > 0.5 and r["flip_oks"] < 0.8)
    expected_medians = {}
    for schema_name in sorted({r["keypoint_schema"] for r in rows}):
        errors_k = np.array([r["keypoint_flip_error"] for r in rows if r["keypoint_schema"] == schema_name])
        for k, name in enumerate(SCHEMAS[schema_name].keypoints):
            expected_medians[(schema_name, k, name)] = np.median(errors_k[:, k])
    close(means(ns["disagreement_by_name"], "median_flip_error"), expected_medians)
    assert len(ns["trusted"]) == sum(r["instance_score"] > 0.5 and r["flip_oks"] > 0.9 for r in rows)

    # join back to the GT by annotation id
    joined = ns["joined"]
    gt_by_id = {a["id"]: a for a in job.coco["annotations"]}
    image_of = {im["id"]: im["file_name"] for im in job.coco["images"]}
    assert sorted(joined["annotation_id"]) == sorted(r["annotation_id"] for r in rows)
    for _, row in joined.iterrows():
        assert image_of[gt_by_id[row["annotation_id"]]["image_id"]] == row["image_key"]
    assert sorted(ns["joined_duck"]["annotation_id"]) == sorted(joined["annotation_id"])
    assert len(ns["unlabeled"]) == 3  # the broken image, the missing image and the zero-width box
    oks = ns["oks_per_instance"]
    assert len(oks) == len(rows) and ((oks >= 0) & (oks <= 1)).all()
    # COCOeval uses COCO's sigmas for every category: compare the coco17 rows
    person = sorted(r["annotation_id"] for r in rows if r["keypoint_schema"] == "coco17")
    np.testing.assert_allclose(oks[person].to_numpy(), pycocotools_oks(job, rows)[person].to_numpy(),
                               rtol=1e-4, atol=1e-6)

    # S3
    assert tuple(ns["s3_counts"]) == (len(rows), 4)
    assert len(ns["s3_df"]) == len(rows) and ns["s3_pl"].height == len(rows)
    assert ns["s3_schemas"] == ns["schemas"]


def pycocotools_oks(job, rows):
    """Each row's OKS to its own GT annotation, computed by COCOeval itself (the docs claim to match it)."""
    import pandas as pd
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(job.gt))
    dets = []
    for i, r in enumerate(rows):
        flat = [v for x, y in zip(r["keypoint_x"], r["keypoint_y"]) for v in (float(x), float(y), 1.0)]
        image_id = next(im["id"] for im in job.coco["images"] if im["file_name"] == r["image_key"])
        category_id = next(c["id"] for c in job.coco["categories"] if c["name"] == r["category"])
        dets.append({"image_id": image_id, "category_id": category_id, "keypoints": flat, "score": 1.0 - i / 100,
                     "raypose_annotation_id": r["annotation_id"]})
    evaluator = COCOeval(gt, gt.loadRes(dets), iouType="keypoints")
    evaluator._prepare()
    out = {}
    for (image_id, category_id), dts in evaluator._dts.items():
        ious = evaluator.computeOks(image_id, category_id)
        dts = sorted(dts, key=lambda d: -d["score"])
        gts = evaluator._gts[image_id, category_id]
        for d, det in enumerate(dts):
            g = next(j for j, a in enumerate(gts) if a["id"] == det["raypose_annotation_id"])
            out[det["raypose_annotation_id"]] = ious[d, g]
    return pd.Series(out)


PYTHON_DOC = REPO / "docs" / "python.md"


def test_the_python_page_runs_and_annotate_gives_the_jobs_rows(ray_session, tmp_path, monkeypatch, capsys):
    """docs/python.md's blocks in order, as a notebook runs them, from a folder that sees the repository's jobs/;
    what annotate kept equals the job's rows for the same instances (the Done-when, on the quickstart)."""
    import raypose

    shutil.copytree(REPO / "jobs", tmp_path / "jobs")  # a copy, not a link: a job file's paths resolve links
    monkeypatch.chdir(tmp_path)
    ns = run_blocks(PYTHON_DOC, {"__name__": "python_md"})
    printed = capsys.readouterr().out
    assert printed.startswith("ok: 4 images (4 with boxes, 0 without), 8 boxes; expert coco: ")
    job_rows = {(r["image_key"], r["instance_index"]): r for r in ns["table"].to_pylist()}
    assert ns["result"].counts["instances"] == len(job_rows) == 8
    assert ns["names"]["coco17"][:3] == ["nose", "left_eye", "right_eye"]
    kept = pq.read_table(tmp_path / "out" / "python-confident").to_pylist()
    threshold = float(re.search(r'row\["instance_score"\] >= ([0-9.]+)', PYTHON_DOC.read_text()).group(1))
    assert {key for key, row in job_rows.items() if row["instance_score"] >= threshold} == {
        (r["image_key"], r["instance_index"]) for r in kept}
    assert kept, "the example keeps no instance: its threshold says nothing"
    for row in kept:
        theirs = job_rows[(row["image_key"], row["instance_index"])]
        differ = {"box_source": "inline", "annotation_id": None}  # the example's rows carry boxes, not COCO ids
        for name, value in row.items():
            if name in theirs:
                assert value == (differ[name] if name in differ else theirs[name]), name
    assert f"{len(kept)} of {len(job_rows)} instances" in printed


# --- README.md and every page's commands and YAML --------------------------------------------------------------


def shell_commands(text: str) -> list[list[str]]:
    """Each command of a page's bash blocks as argv (`a && b` gives two; comments and continuations handled)."""
    commands = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def test_the_readmes_test_command_is_what_ci_runs():
    first = shell_commands(README.read_text())[:4]
    assert [argv[:2] for argv in first] == [["pip", "install"], ["raypose", "submit"], ["pip", "install"],
                                            ["python", "-m"]]
    ci = [shlex.split(line) for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci[-1] == first[3] == ["python", "-m", "pytest", "-q"]
    assert [a for a in ci[-2] if a not in ("python", "-m", "--quiet")] == first[2]  # the same install


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_raypose_command_line_parses(page):
    """Each documented `raypose ...` line names a command and options that exist, with the arguments they take."""
    import typer.main

    from raypose.cli import app

    def parse(command, args, parent=None, name="raypose"):
        context = command.make_context(name, args, parent=parent)
        protected = getattr(context, "_protected_args", None)  # Click >= 8.2 (protected_args before)
        rest = [*(protected if protected is not None else context.protected_args), *context.args]
        if hasattr(command, "resolve_command") and rest:  # a group: on to its command
            sub_name, sub, sub_args = command.resolve_command(context, rest)
            parse(sub, sub_args, context, sub_name)

    for argv in shell_commands(page.read_text()):
        if argv[0] != "raypose":
            assert argv[0] in ("pip", "python", "hf", "kubectl"), f"{page.name}: what runs {argv[0]}?"
            continue
        args = argv[1:argv.index(">")] if ">" in argv else argv[1:]
        try:
            parse(typer.main.get_command(app), args)
        except Exception as exc:  # typer carries its own copy of Click: its exceptions are not click's
            if type(exc).__name__ == "Exit":
                continue  # --version, --help
            message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
            raise AssertionError(f"{page.name}: `{' '.join(argv)}` does not parse: {message}") from exc


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_yaml_block_is_a_job_or_a_valid_part_of_one(page):
    from raypose.config.spec import parse_job_spec

    base = yaml.safe_load((REPO / "jobs" / "quickstart.yaml").read_text())
    for block in blocks(page.read_text(), "yaml"):
        fragment = yaml.safe_load(block)
        merged = {section: {**base.get(section, {}), **values} if isinstance(values, dict) else values
                  for section, values in {**base, **fragment}.items()}
        parse_job_spec(merged)


def test_the_quickstart_shown_is_the_bundled_job():
    [shown] = blocks(README.read_text(), "yaml")
    assert shown == (REPO / "jobs" / "quickstart.yaml").read_text()


@pytest.fixture(scope="module")
def quickstart(ray_session, tmp_path_factory):
    """The README's first command, `raypose submit jobs/quickstart.yaml`, from a copy of the repository's jobs/."""
    from typer.testing import CliRunner

    from raypose.cli import app

    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "jobs", root / "jobs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["submit", "jobs/quickstart.yaml"], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root, result.stdout


def test_the_readmes_quickstart_and_python_run_as_shown(quickstart, monkeypatch, capsys):
    root, printed = quickstart
    text = README.read_text()
    example = re.search(r"It ends with a line like `(done: .*?)`", text).group(1)
    pattern = re.escape(example).replace(re.escape("..."), r"\S*")
    assert re.fullmatch(pattern, printed.strip().splitlines()[-1]), (example, printed)
    tree = next(block for block in blocks(text, "") if block.startswith("out/quickstart/"))
    for line in tree.splitlines()[1:]:
        for entry in line.split()[0].rstrip(",").split(","):
            entry = entry.strip()
            found = list((root / "out" / "quickstart").glob(entry.rstrip("/") or entry))
            assert found, f"the README's output tree shows {entry}, the quickstart wrote no such thing"
    monkeypatch.chdir(root)
    ns = run_blocks(README, {"__name__": "readme"})
    assert ns["table"].num_rows == 8 and ns["job"].spec.pose.batch_size == 4
    shown = capsys.readouterr().out
    assert "img_0003.jpg" in shown and "ok: 4 images (4 with boxes, 0 without)" in shown
    assert re.search(r"^\d+ of 8 instances scored above 0.5$", shown, flags=re.M)


# --- links between the pages ------------------------------------------------------------------------------------

LINKED_PAGES = [README, *DOCS, REPO / "benchmarks" / "README.md", REPO / "infra" / "README.md"]


def heading_anchors(path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_to_a_file_or_heading_resolves(page):
    """A page moved or a heading renamed leaves no link pointing at nothing."""
    broken = []
    for url in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", url):
            continue
        path, _, anchor = url.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in heading_anchors(target)):
            broken.append(url)
    assert not broken, f"{page.name}: {broken}"
