"""Hub access: load a transformers checkpoint from a local directory or a hub id, failing fast offline.

Only safetensors weights are loaded and no remote code runs (`trust_remote_code` is never set).
A local checkpoint's revision is a fingerprint of its files, so reruns can tell models apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from raypose.errors import SpecError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
LOCAL_REVISION_PREFIX = "sha256:"


def load_pretrained(load, model: str, revision: str | None, field: str, *args, **kwargs):
    """Call a transformers loader; a checkpoint that cannot be fetched fails fast with a fix."""
    ref = model
    local = Path(ref).expanduser()
    if local.is_dir():
        ref = str(local)
    elif not HUB_ID.fullmatch(ref) or local.exists():
        raise SpecError(f"{field}: {ref} is not a directory (nor a hub id like 'owner/name')")
    else:
        try:
            return load(ref, *args, revision=revision, local_files_only=True, **kwargs)
        except OSError:
            pass  # not in the local cache: go to the hub
        if not hub_reachable():
            raise SpecError(
                f"{field}: cannot fetch {ref!r}: it is not a folder here (a relative path in a job file is "
                f"relative to the file; with --set, to the working directory {Path.cwd()}), the Hugging Face hub "
                "is not reachable from here and the checkpoint is not in the local cache. For a hub id, download "
                f"it where there is network (`hf download {ref} --local-dir DIR`), copy DIR here and set {field}: DIR"
            )
    try:
        return load(ref, *args, revision=revision, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"{field}: cannot load {ref!r}: {first}") from exc


def hub_revision(revision: str) -> str | None:
    """The revision to ask the hub for: none for a local checkpoint, whose revision is raypose's fingerprint."""
    return None if revision.startswith(LOCAL_REVISION_PREFIX) else revision


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub (HF_ENDPOINT) answers a TCP connection; never with HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def local_fingerprint(model: str) -> str:
    """For a local checkpoint: sha256 over its config and weight files, so reruns can tell models apart."""
    digest = hashlib.sha256()
    root = Path(model)
    for path in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return LOCAL_REVISION_PREFIX + digest.hexdigest()[:16]


def check_weights(model: str, revision: str | None, field: str, config, model_class) -> None:
    """Check a checkpoint's safetensors headers (names, shapes; no tensor is read) against what its config builds.

    Catches, before Ray starts, weights that are truncated, missing, only a pickle (which raypose
    never loads), or of another architecture than the config. A hub checkpoint whose weights are
    not in the local cache is left to the load.
    """
    files = _weight_files(model, revision, field)
    if files is None:
        return
    present: dict[str, tuple[int, ...]] = {}
    for path in files:
        present.update(safetensors_header(path, field))
    expected = _expected_tensors(config, model_class)
    wrong = sorted(n for n in set(expected) & set(present) if expected[n] != present[n])
    problems = []
    if wrong:
        name = wrong[0]
        problems.append(f"{len(wrong)} tensor(s) of another shape ({name}: {list(present[name])}, the config makes "
                        f"{list(expected[name])})")
    # transformers may rename keys between file and model, so only a different set of shapes means a
    # tensor is missing or extra.
    if Counter(expected.values()) != Counter(present.values()):
        missing = sorted(set(expected) - set(present))
        unexpected = sorted(set(present) - set(expected))
        problems.append(f"{len(expected)} tensors expected, the file has {len(present)}"
                        + (f" (missing: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})" if missing else "")
                        + (f" (unexpected: {', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
                           if unexpected else ""))
    if problems:
        raise SpecError(f"{field}: the weights of {model!r} do not fit its config: {'; '.join(problems)}")


def _expected_tensors(config, model_class) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `config` holds: each parameter once (tied ones share a file entry), persistent buffers."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    state = model.state_dict()
    every_parameter = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    kept = {name for name, _ in model.named_parameters()} | (set(state) - every_parameter)
    return {name: tuple(tensor.shape) for name, tensor in state.items() if name in kept}


def safetensors_header(path: Path, field: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors file's header; a truncated or broken file is a SpecError."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                raise ValueError(f"its header says {length} bytes, the file has {size}")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"{field}: {path} is not a readable safetensors file: {exc}") from None
    tensors = {name: meta for name, meta in header.items() if name != "__metadata__"}
    end = max((meta["data_offsets"][1] for meta in tensors.values()), default=0)
    if 8 + length + end > size:
        raise SpecError(f"{field}: {path} is truncated: {size:,} bytes, its header describes {8 + length + end:,}")
    return {name: tuple(meta["shape"]) for name, meta in tensors.items()}


def _weight_files(model: str, revision: str | None, field: str) -> list[Path] | None:
    """The checkpoint's safetensors files, local or in the hub cache; None where they are not here to check."""
    local = Path(model).expanduser()
    if local.is_dir():
        return _local_weight_files(local, field)
    try:
        from transformers.utils import cached_file

        found = [cached_file(model, name, revision=revision, local_files_only=True,
                             _raise_exceptions_for_missing_entries=False) for name in (SAFETENSORS, SAFETENSORS_INDEX)]
    except Exception:  # not cached, an offline hub: the load will say
        return None
    if found[0]:
        return [Path(found[0])]
    return None


def _local_weight_files(folder: Path, field: str) -> list[Path]:
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    if (folder / SAFETENSORS_INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise SpecError(f"{field}: {folder / SAFETENSORS_INDEX} is not a safetensors index: {exc}") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise SpecError(f"{field}: {folder} lacks weight shard(s) {', '.join(missing[:3])}")
        return [folder / name for name in shards]
    pickles = [name for name in PICKLED_WEIGHTS if (folder / name).exists()]
    if pickles:
        raise SpecError(
            f"{field}: {folder} has weights only as {pickles[0]} (a pickle, which raypose never loads); save "
            "them as safetensors: `VitPoseForPoseEstimation.from_pretrained(DIR).save_pretrained(DIR)`"
        )
    raise SpecError(f"{field}: {folder} has no weights ({SAFETENSORS} or {SAFETENSORS_INDEX})")
