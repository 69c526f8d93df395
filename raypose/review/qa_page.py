"""The QA page of `raypose render`: index.html (the chosen images worst first, a legend, the failed
images) and a page per image with its picture at full size and its instances."""

from __future__ import annotations

import html
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from raypose.output.writer import ERRORS_DIR
from raypose.review.drawing import side_colour
from raypose.review.reading import JobOutput
from raypose.review.selection import Selection

FAILED_LISTED = 1000  # failed images listed on the page at most (the errors table has them all)

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; background: #f6f6f6; color: #111; }
h1 { font-size: 20px; margin: 0 0 .3em; } h2 { font-size: 16px; margin: 1.2em 0 .4em; }
.meta { color: #444; margin: .2em 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 10px; }
figure { margin: 0; padding: 5px; background: #fff; border: 1px solid #ddd; }
figure img { max-width: 100%; display: block; margin: auto; }
figcaption { margin-top: 4px; }
.key { font-weight: 600; overflow-wrap: anywhere; }
.stat { white-space: nowrap; margin-right: .8em; }
.worst { font-weight: 600; }
.problem { color: #b00; }
.missing { height: 120px; display: flex; align-items: center; justify-content: center; color: #b00; }
.legend { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: center; background: #fff; padding: 6px 10px;
          border: 1px solid #ddd; margin: .6em 0; }
.swatch { display: inline-block; width: 26px; height: 10px; border: 1px solid #000; vertical-align: middle;
          margin-right: 4px; }
table { border-collapse: collapse; background: #fff; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.full img { max-width: 100%; height: auto; border: 1px solid #ccc; }
"""


@dataclass
class Rendered:
    """One image as `raypose render` drew it: what its card and its page show."""

    image_key: str
    file: str | None  # relative to --out
    thumb: str | None
    instances: int
    mean_instance_score: float | None
    mean_keypoint_score: float | None
    keypoints_drawn: int
    source: str
    problem: str | None = None
    size: tuple[int, int] | None = None
    lowest_score: float | None = None
    rows: list[dict] = field(default_factory=list, repr=False)  # the image's instances, as drawn
    colours: list[tuple[int, int, int]] = field(default_factory=list, repr=False)  # one per instance


def write_pages(rendered: list[Rendered], job: JobOutput, fs, root: str, names: dict[str, str], *,
                selection: Selection, matching: int, keypoint_threshold: float) -> None:
    """index.html and view/<name>.html for every rendered image, into `root` on `fs`."""
    failed = failed_images(job)
    pages = {"index.html": index_html(rendered, job, selection=selection, matching=matching, failed=failed,
                                      names=names, keypoint_threshold=keypoint_threshold)}
    for r in rendered:
        if r.file:
            pages[f"view/{names[r.image_key]}.html"] = view_html(r, job)
    for name, page in pages.items():
        with fs.open(posixpath.join(root, name), "wb") as f:
            f.write(page.encode("utf-8"))


def failed_images(job: JobOutput) -> list[dict[str, Any]]:
    """Images the job could not label at all (read, decode, list, ...): key, stage, reason; by key."""
    table = job.read(["image_key", "instance_index", "stage", "reason"], table=ERRORS_DIR)
    if table is None or not table.num_rows:
        return []
    whole = table.filter(pc.is_null(table.column("instance_index"))).sort_by("image_key")
    return whole.select(["image_key", "stage", "reason"]).to_pylist()


def index_html(rendered: list[Rendered], job: JobOutput, *, selection: Selection, matching: int,
               failed: list[dict], names: dict[str, str], keypoint_threshold: float) -> str:
    """A self-contained page: the job, what is shown and why, a legend, the grid, the failed images."""
    e = html.escape
    manifest = job.manifest or {}
    title = f"raypose QA: {manifest.get('job_id') or job.url}"
    models = "; ".join(f"{n}: {x.get('model', '?')} @ {x.get('revision', '?')}" for n, x in job.experts.items())
    cards = "\n".join(_card(r, names) for r in rendered)
    failed_note = f"; {len(failed)} failed image{'s' if len(failed) != 1 else ''} listed below" if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{e(title)}</h1>
<p class="meta">Showing {len(rendered)} of {matching} images with instances ({e(selection.describe())}){failed_note}.</p>
<p class="meta">Models: {e(models or '?')}. Output: {e(job.url)}. Keypoints and limbs drawn above score {keypoint_threshold:g}.</p>
{_legend()}
<div class="grid">
{cards}
</div>
{_failed_section(failed)}
</body></html>
"""


def _card(r: Rendered, names: dict[str, str]) -> str:
    e = html.escape
    stats = [f'<span class="stat worst">lowest {_fmt(r.lowest_score)}</span>',
             f'<span class="stat">{r.instances} instance{"s" if r.instances != 1 else ""}</span>',
             f'<span class="stat">mean score {_fmt(r.mean_instance_score)}</span>',
             f'<span class="stat">keypoint score {_fmt(r.mean_keypoint_score)}</span>',
             f'<span class="stat">{r.keypoints_drawn} keypoints drawn</span>']
    if r.size:
        stats.append(f'<span class="stat">{r.size[0]}x{r.size[1]}</span>')
    picture = (f'<a href="view/{e(names[r.image_key])}.html"><img src="{e(r.thumb)}" alt="{e(r.image_key)}" '
               f'loading="lazy"></a>' if r.file else '<div class="missing">not rendered</div>')
    problem = f'<div class="problem">{e(r.problem)}</div>' if r.problem else ""
    return (f'<figure>{picture}<figcaption><div class="key" title="{e(r.source)}">{e(r.image_key)}</div>'
            f'{" ".join(stats)}{problem}</figcaption></figure>')


def _legend() -> str:
    sample = (255, 153, 0)
    swatch = '<span class="swatch" style="background: rgb{}"></span>'
    return ('<div class="legend"><span>Each instance has a colour of its own: its box, its label '
            '(<b>#index score</b>) and its skeleton.</span>'
            f'<span>{swatch.format(sample)}midline</span>'
            f'<span>{swatch.format(side_colour(sample, "left"))}left side (lighter)</span>'
            f'<span>{swatch.format(side_colour(sample, "right"))}right side (darker)</span></div>')


def _failed_section(failed: list[dict]) -> str:
    if not failed:
        return '<h2>Failed images</h2><p class="meta">None.</p>'
    e = html.escape
    rows = "\n".join(f'<tr><td class="key">{e(f["image_key"])}</td><td>{e(f["stage"])}</td><td>{e(f["reason"] or "")}</td></tr>'
                     for f in failed[:FAILED_LISTED])
    more = (f'<p class="meta">... and {len(failed) - FAILED_LISTED} more in the errors table.</p>'
            if len(failed) > FAILED_LISTED else "")
    return (f'<h2>Failed images ({len(failed)})</h2><table><tr><th>image</th><th>stage</th><th>reason</th></tr>\n'
            f'{rows}</table>{more}')


def view_html(r: Rendered, job: JobOutput) -> str:
    """One image at full size, with a table of its instances in their colours."""
    e = html.escape
    rows = []
    for row, colour in zip(r.rows, r.colours):
        box = ", ".join(f"{v:.1f}" for v in row["bbox"]) if row["bbox"] else "-"
        rows.append(f'<tr><td><span class="swatch" style="background: rgb{colour}"></span>#{row["instance_index"]}</td>'
                    f'<td>{e(str(row.get("category") or "-"))}</td><td>{e(str(row.get("expert") or "-"))}</td>'
                    f'<td class="num">{_fmt(row["instance_score"])}</td><td class="num">{box}</td></tr>')
    problem = f'<p class="problem">{e(r.problem)}</p>' if r.problem else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(r.image_key)}</title><style>{STYLE}</style></head>
<body>
<p><a href="../index.html">back to the QA page</a></p>
<h1 class="key">{e(r.image_key)}</h1>
<p class="meta">{e(r.source)}{f" · {r.size[0]}x{r.size[1]}" if r.size else ""}</p>{problem}
{_legend()}
<div class="full"><a href="../{e(r.file)}"><img src="../{e(r.file)}" alt="{e(r.image_key)}"></a></div>
<h2>Instances</h2>
<table><tr><th>instance</th><th>category</th><th>expert</th><th>score</th><th>box (x, y, w, h)</th></tr>
{chr(10).join(rows)}</table>
</body></html>
"""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
