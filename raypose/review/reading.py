"""Reading a job's output back: local paths and any fsspec URL (s3://, gs://, memory://, ...).

Shared by `raypose export`, `raypose render` and `raypose inspect`. Everything is read
through one fsspec filesystem; Parquet goes through pyarrow.dataset, so only the columns
and rows asked for are read, batch by batch.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from raypose.errors import OutputError
from raypose.inputs.storage import open_url
from raypose.output.writer import JOB_FILE, KEYPOINTS_DIR, MANIFEST_FILE, SCHEMAS_FILE
from raypose.schema import KEYPOINTS_SCHEMA

if TYPE_CHECKING:
    from ray.data import Dataset


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings (values read as YAML, like `--set`) -> fsspec storage options."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OutputError(f"--storage-option: expected key=value, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError as exc:
            raise OutputError(f"--storage-option {key}: cannot read {value!r} as YAML: {exc}") from exc
    return options


def open_fs(url: str, storage_options: dict[str, Any] | None, what: str):
    """(filesystem, path) for a URL or local path; an unusable URL is an OutputError."""
    return open_url(url, storage_options, what, error=OutputError)


@dataclass
class JobOutput:
    """One job's output folder: manifest, keypoint schemas, and its two Parquet tables."""

    url: str
    fs: Any
    root: str
    manifest: dict[str, Any] | None
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> "JobOutput":
        fs, root = open_fs(url, storage_options, "OUTPUT")
        root = root.rstrip("/") or root
        try:
            manifest = _read_json(fs, posixpath.join(root, MANIFEST_FILE))
            has_keypoints = fs.exists(posixpath.join(root, KEYPOINTS_DIR))
        except OutputError:
            raise
        except Exception as exc:  # credentials, endpoints, permissions: one line naming the path
            raise OutputError(f"OUTPUT: cannot read {url}: {type(exc).__name__}: {exc}") from exc
        if manifest is None and not has_keypoints:
            raise OutputError(
                f"OUTPUT: {url} is not a raypose output (no {MANIFEST_FILE} and no {KEYPOINTS_DIR}/); "
                "give the job's output.path"
            )
        output = cls(url=str(url), fs=fs, root=root, manifest=manifest)
        output.schemas = output._load_schemas()
        return output

    @property
    def complete(self) -> bool:
        """manifest.json is written last: without it the job did not finish (or is still running)."""
        return self.manifest is not None

    @property
    def experts(self) -> dict[str, dict[str, Any]]:
        """Expert -> {model, revision, keypoint_schema, input_size, ...}, as the manifest records them."""
        return {name: dict(e) for name, e in (self.manifest or {}).get("experts", {}).items()}

    @property
    def image_column(self) -> str:
        """The Parquet column images were read from (`images.image_column`), for images inside Parquet files."""
        return ((self.manifest or {}).get("spec") or {}).get("images", {}).get("image_column") or "image"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def parquet_files(self, table: str = KEYPOINTS_DIR) -> list[str]:
        """The keypoints (or errors) table's Parquet files, sorted; [] when the folder is absent."""
        folder = self.path(table)
        if not self.fs.exists(folder):
            return []
        return sorted(p for p in self.fs.find(folder) if p.endswith(".parquet")
                      and not posixpath.basename(p).startswith(("_", ".")))

    def dataset(self, table: str = KEYPOINTS_DIR) -> ds.Dataset | None:
        """The keypoints (or errors) Parquet files as a dataset; None when there are none."""
        files = self.parquet_files(table)
        return ds.dataset(files, filesystem=self.fs, format="parquet") if files else None

    def batches(self, columns: list[str], table: str = KEYPOINTS_DIR, filter=None) -> Iterator[pa.RecordBatch]:
        dataset = self.dataset(table)
        if dataset is None:
            return
        for batch in dataset.to_batches(columns=columns, filter=filter):
            if batch.num_rows:
                yield batch

    def read(self, columns: list[str] | None = None, table: str = KEYPOINTS_DIR, filter=None) -> pa.Table | None:
        dataset = self.dataset(table)
        if dataset is None:
            return None
        return dataset.to_table(columns=columns, filter=filter)

    def schema(self, name: str) -> dict[str, Any]:
        """Keypoint names, skeleton (0-based pairs), flip pairs and sigmas of one keypoint schema."""
        try:
            return self.schemas[name]
        except KeyError:
            raise OutputError(
                f"OUTPUT: keypoint schema {name!r} is used in the table but described neither in "
                f"{SCHEMAS_FILE} nor in the Parquet metadata"
            ) from None

    def runs(self) -> list[dict[str, Any]]:
        """The runs that built the output, oldest first, as `_job.json` records them (append and resume runs)."""
        return list((_read_json(self.fs, self.path(JOB_FILE)) or {}).get("runs") or [])

    def _load_schemas(self) -> dict[str, dict[str, Any]]:
        sidecar = _read_json(self.fs, self.path(SCHEMAS_FILE))
        if sidecar is not None:
            return sidecar
        dataset = self.dataset()  # an unfinished job: the Parquet metadata carries the same description
        metadata = (dataset.schema.metadata or {}) if dataset is not None else {}
        if b"raypose" in metadata:
            return json.loads(metadata[b"raypose"]).get("keypoint_schemas", {})
        return {}


def _read_json(fs, path: str) -> dict[str, Any] | None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"OUTPUT: {posixpath.basename(path)} is not valid JSON: {exc}") from exc


def read_json_file(url: str, storage_options: dict[str, Any] | None, what: str) -> Any:
    """A JSON file's content; an OutputError naming `what` when it is missing, unreadable or not JSON."""
    fs, path = open_fs(url, storage_options, what)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise OutputError(f"{what}: {url} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{what}: {url} is not valid JSON: {exc}") from exc
    except Exception as exc:
        raise OutputError(f"{what}: cannot read {url}: {type(exc).__name__}: {exc}") from exc


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None, what: str) -> None:
    """Write one file to a local path or URL, making parent folders where that means something."""
    fs, path = open_fs(url, storage_options, what)
    parent = posixpath.dirname(path)
    try:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    except Exception as exc:
        raise OutputError(f"{what}: cannot write {url}: {type(exc).__name__}: {exc}") from exc


def read_keypoints(path: str, *, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None,
                   filter: ds.Expression | None = None, dataset: bool = False) -> pa.Table | Dataset:
    """A job's keypoints table (pyarrow), with every keypoint schema's names and skeleton in its metadata.

    The metadata key `raypose` holds JSON with `keypoint_schemas` (schema name -> keypoints, skeleton, ...),
    the models and the job id. `columns` and `filter` (a pyarrow.compute expression) read only what is asked
    for. With `dataset=True`, a lazy Ray Dataset over the same files instead, for outputs larger than memory.
    """
    output = JobOutput.open(path, storage_options)
    if dataset:
        from raypose.pipeline.datasets import keypoints_dataset

        return keypoints_dataset(output.fs, output.parquet_files(), columns, filter)
    table = output.read(columns, filter=filter)
    if table is None:  # a job whose every input failed writes no keypoint file
        table = KEYPOINTS_SCHEMA.empty_table()
        if columns is not None:
            table = table.select(columns)
    metadata = dict(table.schema.metadata or {})
    described = json.loads(metadata.get(b"raypose", b"{}"))
    described["keypoint_schemas"] = output.schemas
    return table.replace_schema_metadata({**metadata, b"raypose": json.dumps(described).encode()})


def keypoint_names(table: pa.Table) -> dict[str, list[str]]:
    """Keypoint schema -> its keypoint names, from a table `read_keypoints` gave (its `raypose` metadata)."""
    described = json.loads((table.schema.metadata or {}).get(b"raypose", b"{}"))
    return {name: list(schema["keypoints"]) for name, schema in described.get("keypoint_schemas", {}).items()}
