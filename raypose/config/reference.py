"""The job spec's reference, made from the spec itself: a JSON Schema for editors and docs/job-spec.md for people.

Both come from the fields' own types, defaults and descriptions (config/spec.py), so they cannot drift from
what `load_job_spec` accepts; `raypose schema [--markdown]` prints them.
"""

from __future__ import annotations

import json
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raypose.config.spec import JobSpec, section_type

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "docs/job-spec.schema.json"  # what the example jobs' `# yaml-language-server: $schema=` points at


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job file: every key, its type, default and description."""
    return {"$schema": JSON_SCHEMA_DIALECT, **JobSpec.model_json_schema()}


def job_json_schema_text() -> str:
    """The JSON Schema as the text `raypose schema` prints and docs/job-spec.schema.json holds."""
    return json.dumps(job_json_schema(), indent=2) + "\n"


MARKDOWN_HEAD = """\
# The job spec

<!-- Generated from raypose/config/spec.py by `raypose schema --markdown > docs/job-spec.md`:
edit the spec, not this page (tests/unit/config/test_reference.py fails when the two differ). -->

A job is a YAML file with the sections below; only `images.path`, `boxes` (with its `path` for
`coco` and `table` boxes), `pose.model` and `output.path` are required (`jobs/quickstart.yaml` is
a complete one). Relative local paths in a job file are relative to the file; `raypose submit
JOB.yaml --set pose.batch_size=64` overrides any key (the value is read as YAML; a relative path
given with `--set` is relative to the working directory).

`raypose schema` prints the JSON Schema of a job file (also in `docs/job-spec.schema.json`): an
editor with a YAML language server completes and checks a job file whose first line is
`# yaml-language-server: $schema=PATH/TO/docs/job-spec.schema.json`, as the files in `jobs/` do.

**Rows**: a field marked *yes* decides the output rows. Those fields make the result key, with the
models' revisions and the device, dtype and decoder the job resolved: `output.mode: resume` refuses
an output made with other values of them, naming each one that changed. The others (resources,
batch sizes, limits, the output's layout, credentials) may change between runs.
"""


def job_spec_markdown() -> str:
    """docs/job-spec.md: a table per section of the spec, with each key's type, default, whether it decides
    the rows, and its description."""
    schema = JobSpec.model_json_schema()
    parts = [MARKDOWN_HEAD]
    parts += _section_markdown(JobSpec, "", "Top level", schema)
    return "\n".join(parts)


def _section_markdown(section: type[BaseModel], prefix: str, title: str, schema: dict) -> list[str]:
    properties = _definition(section, schema)["properties"]
    rows, nested = [], []
    for name, info in section.model_fields.items():
        key = f"{prefix}{name}"
        inner = section_type(info.annotation)
        if inner is not None:
            nested.append((inner, f"{key}.", f"`{key}`"))
            continue
        rows.append(_row(key, info, properties[name], schema))
        if (mapped := _mappedsection_type(info.annotation)) is not None:
            nested.append((mapped, f"{key}.NAME.", f"`{key}.NAME`"))
    lines = []
    if rows:
        lines += [f"## {title}", ""]
        if section.__doc__ and section is not JobSpec:
            lines += [section.__doc__.strip().splitlines()[0], ""]
        lines += ["| key | type | default | rows | meaning |", "|---|---|---|---|---|", *rows, ""]
    for inner, inner_prefix, inner_title in nested:
        lines += _section_markdown(inner, inner_prefix, inner_title, schema)
    return lines


def _row(key: str, info: FieldInfo, prop: dict, schema: dict) -> str:
    decides = "yes" if (info.json_schema_extra or {}).get("decides_rows") else ""
    cells = [f"`{key}`", _type_text(prop, schema), _default_text(info), decides, info.description or ""]
    return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def _type_text(prop: dict, schema: dict) -> str:
    if "anyOf" in prop:
        kinds = [s for s in prop["anyOf"] if s != {"type": "null"}]
        text = " or ".join(_type_text(s, schema) for s in kinds)
        return text + (" or null" if len(kinds) < len(prop["anyOf"]) else "")
    if "enum" in prop:
        return " | ".join(f"`{value}`" for value in prop["enum"])
    if "$ref" in prop:
        return "section"
    kind = prop.get("type")
    if kind == "integer":
        return "integer" + (f" >= {prop['minimum']}" if "minimum" in prop else "")
    if kind == "number":
        if "maximum" in prop:
            return f"number in [{prop['minimum']}, {prop['maximum']}]"
        if "exclusiveMinimum" in prop:
            return f"number > {prop['exclusiveMinimum']}"
        return "number" + (f" >= {prop['minimum']}" if "minimum" in prop else "")
    if kind == "array":
        if prop.get("minItems") == 2 == prop.get("maxItems"):
            return "[min, max]"
        return f"list of {_type_text(prop['items'], schema)}s"
    if kind == "object":
        values = prop.get("additionalProperties")
        if isinstance(values, dict) and "$ref" in values:
            return "mapping of name -> section (below)"
        if isinstance(values, dict) and values.get("type") == "string":
            return "mapping of name -> string"
        return "mapping"
    return str(kind)


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default.model_dump(mode="json") if isinstance(info.default, BaseModel) else info.default
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=1_000).removesuffix("\n...\n").strip() + "`"


def _definition(section: type[BaseModel], schema: dict) -> dict:
    return schema if section is JobSpec else schema["$defs"][section.__name__]


def _mappedsection_type(annotation: Any) -> type[BaseModel] | None:
    """The section type of a `dict[str, Section]` field (pose.experts), else None."""
    if get_origin(annotation) is dict:
        return section_type(get_args(annotation)[1])
    return None
